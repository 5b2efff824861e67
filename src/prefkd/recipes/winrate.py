"""`prefkd winrate`: the win rate of A's responses over B's on the same prompts under one judge (PLaD's T-S WR when
A is the teacher and B the student on the distillation set)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prefkd import atomic
from prefkd.config import opt, section
from prefkd.data.loaders import load_instructions
from prefkd.errors import PrefkdError
from prefkd.eval_files import read_responses
from prefkd.evaluate import EvalConfig, summarize
from prefkd.judges import JudgeConfig, head_to_head, make_judge
from prefkd.models import resolve_device
from prefkd.recipes.common import need
from prefkd.recipes.evaluate import sample_predictions


@dataclass
class WinRateRun:
    a: str = opt("", "responses A (e.g. the teacher): a model path or hub id (sampled here), an evaluation "
                     "directory or its predictions.json, or a sample cache .jsonl")
    b: str = opt("", "responses B (e.g. the student), same forms as a")
    data: str = opt("", "the prompts (e.g. the distillation set); references only needed by the rouge judge")
    out: str = opt("", "json file for the result; default: print only")
    judge: JudgeConfig = section(JudgeConfig, "the judge (judge.path is required)")
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(seeds=[10]),
                             metadata={"help": "how a model given as a or b is sampled"})
    device: str = opt("auto", "auto (the GPU if there is one), cpu, cuda, ...")


def run_winrate(cfg: WinRateRun) -> dict:
    """Win rate of A's responses over B's on the same prompts under one judge (PLaD's T-S WR when A is the teacher
    and B the student on the distillation set)."""
    device = resolve_device(cfg.device)
    judge = make_judge(cfg.judge, device)
    if judge is None:
        raise PrefkdError("set judge.path=... (a reward model, a causal LM, or 'rouge')")
    records = load_instructions(need(cfg.data, "data"), require_references=judge.needs_references)
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Samples of a model side are cached next to `out` (a rerun reuses them), else thrown away afterwards.
        root = Path(cfg.out).with_name(Path(cfg.out).stem + "-samples") if cfg.out else Path(tmp)
        for side in ("a", "b"):
            source = need(getattr(cfg, side), side)
            if _is_model(source):
                sides[side] = sample_predictions(source, records, cfg.eval, root / side, device, f"{side}")[0]
            else:
                sides[side] = read_responses(source, records)
    result = head_to_head(judge, records, sides["a"], sides["b"], cfg.judge.tie_tolerance)
    summary = {"a": cfg.a, "b": cfg.b, "data": cfg.data, "n": len(records), "judge": judge.name,
               "rule": "100 x mean over prompts of 1 (judge prefers A), 0.5 (tie: identical text or "
                       f"|difference| <= {cfg.judge.tie_tolerance}), 0 (prefers B)",
               "seeds_a": list(sides["a"]), "seeds_b": list(sides["b"]),
               "win_rate": summarize(result["win_rate"]),
               "ties_percent": float(100 * (result["win_rate"] == 50).mean()),
               "mean_score_a": float(result["score_a"].mean()), "mean_score_b": float(result["score_b"].mean()),
               "per_prompt": [{"id": r.id, "win_rate": float(w), "score_a": float(a), "score_b": float(b)}
                              for r, w, a, b in zip(records, result["win_rate"].mean(0), result["score_a"].mean(0),
                                                    result["score_b"].mean(0), strict=True)]}
    if cfg.out:
        atomic.write_json(cfg.out, summary)
    return summary


def _is_model(source: str) -> bool:
    """A model directory, or a hub id (not an existing path); anything else is a file of responses."""
    p = Path(source)
    if p.is_dir():
        return (p / "config.json").is_file()
    return not p.exists() and not p.suffix and not source.startswith(("/", ".", "~"))


def summary_line(r: dict) -> str:
    """One line for the console: the win rate with its interval, ties, the judge and the mean scores."""
    w = r["win_rate"]
    return (f"win rate of A over B: {w['mean']:.2f} (95% CI {w['ci95_bootstrap'][0]:.2f} to "
            f"{w['ci95_bootstrap'][1]:.2f}, prompts x seeds bootstrap), ties {r['ties_percent']:.1f}% of {r['n']} "
            f"prompts; judge {r['judge']}; mean score A {r['mean_score_a']:.4g}, B {r['mean_score_b']:.4g}")
