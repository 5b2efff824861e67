"""`prefkd evaluate`: sampled generation on a test set over several seeds (the MiniLLM protocol), scored with
Rouge-L, exact match and an optional judge; predictions saved for re-scoring."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefkd.cache import cache_key, generate_cached, model_identity
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.chat import TEMPLATE_HELP, renderer_for
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction
from prefkd.eval_files import read_records_of, read_responses, write_evaluation
from prefkd.evaluate import PROTOCOL, EvalConfig, breakdown, prompt_scores, unscorable
from prefkd.judges import JudgeConfig, check_reference_free, judge_against_references, make_judge
from prefkd.models import load_model, load_tokenizer, resolve_device
from prefkd.recipes.common import need, versions, write_run_config


@dataclass
class EvaluateRun:
    model: str = opt("", "model path or hub id")
    data: str = opt("", "records with references: prefkd jsonl, Dolly, MiniLLM, csv, parquet or a hub dataset id")
    out: str = opt("", "output directory (scores.json, predictions.json, per_prompt.jsonl, ...); default: MODEL/eval, "
                       "or the directory being re-scored")
    eval: EvalConfig = section(EvalConfig)
    rescore: str = opt("", "an earlier evaluation directory (or its predictions.json): score its predictions again "
                           "without generating; model= is then not needed, data= defaults to its records.jsonl")
    judge: JudgeConfig = section(JudgeConfig, "optional judge: win rates of the predictions against the references")
    device: str = opt("auto", "auto (the GPU if there is one), cpu, cuda, cuda:1, ...")
    template: str = opt("auto", TEMPLATE_HELP)


def run_evaluate(cfg: EvaluateRun, records: list[Instruction] | None = None, name: str = "eval") -> dict:
    """Sample (or re-read) predictions, score them, judge them if asked; write the evaluation directory.

    Samples go through keyed caches under OUT/samples (one per seed), so an interrupted evaluation resumes and a
    rerun with the same model, data and settings regenerates nothing."""
    t0 = time.time()
    device = resolve_device(cfg.device)
    judge = make_judge(cfg.judge, device)
    if judge is not None:
        check_reference_free(judge)  # before spending time on generation
    if cfg.rescore:
        src = Path(cfg.rescore)
        src_dir = src if src.is_dir() else src.parent
        out = output_dir(cfg)
        records = records or (load_instructions(cfg.data) if cfg.data else read_records_of(src_dir))
        preds = read_responses(src, records)
        old = src_dir / "settings.json"
        generation = json.loads(old.read_text(encoding="utf-8")).get("generation") if old.is_file() else None
        generation = {**(generation or {}), "rescored_from": str(src)}
        console.print(f"[bold]{name}[/]: re-scoring {src} ({len(records)} records, seeds {list(preds)})")
    else:
        model_path = need(cfg.model, "model")
        out = output_dir(cfg)
        records = records or load_instructions(need(cfg.data, "data"))
        generation = {"model": model_path, "model_identity": model_identity(model_path), "seeds": cfg.eval.seeds,
                      "sampling": asdict(cfg.eval.sampling), "device": device}
        s = cfg.eval.sampling
        console.print(f"[bold]{name}[/]: {model_path} on {len(records)} records ({cfg.data or 'given records'}); "
                      f"seeds {cfg.eval.seeds}, temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, "
                      f"max_new_tokens {s.max_new_tokens}, no_repeat_ngram_size {s.no_repeat_ngram_size}, "
                      f"batch_size {s.batch_size}, device {device}")
        preds, finished = sample_predictions(model_path, records, cfg.eval, out / "samples", device, name,
                                             cfg.template)
        generation["ended_with_eos"] = finished
        generation["generation_seconds"] = round(time.time() - t0, 1)
    metrics = prompt_scores(records, preds)
    judged: dict = {}
    if judge is not None:
        judged = judge_against_references(judge, records, preds, cfg.judge.tie_tolerance)
        metrics.update({k: judged[k] for k in ("win_rate", "judge_score")})
    scores = breakdown(records, metrics)
    bad = unscorable(records)
    if bad:
        console.print(f"[yellow]{bad} of {len(records)} records have no reference with an ASCII letter or digit: the "
                      "protocol's Rouge-L tokenizer keeps none of their words, so they score 0 whatever the answer")
    settings = {"data": cfg.data or "(records given by the caller)", "n_records": len(records),
                "seeds": list(preds), "generation": generation, "protocol": PROTOCOL,
                "unscorable_references": bad,
                "judge": {"name": judge.name, **asdict(cfg.judge)} if judge is not None else None,
                "win_rate_rule": "100 x mean over prompts of 1 (judge prefers the prediction to the best-scoring "
                                 "reference), 0.5 (tie: identical text or |difference| <= tie_tolerance), 0"
                                 if judge is not None else None,
                "versions": versions(), "wall_seconds": round(time.time() - t0, 1)}
    write_run_config(out, cfg)
    write_evaluation(out, records, preds, scores, metrics, settings,
                     {"judge_reference": judged["judge_reference"]} if judged else None)
    return scores


def sample_predictions(model_path: str, records: list[Instruction], cfg: EvalConfig, cache_dir: Path, device: str,
                       name: str, template: str = "auto") -> tuple[dict[int, list[str]], float]:
    """Responses per seed through keyed, resumable caches; and the share of them that ended with an end token."""
    model = load_model(model_path).to(device)
    renderer = renderer_for(load_tokenizer(model_path), template)
    identity = model_identity(model_path)
    prompts = [renderer.prompt(r) for r in records]
    preds, ended = {}, []
    for seed in cfg.seeds:
        key = cache_key(identity, prompts, cfg.sampling, seed)
        rows = generate_cached(model, renderer, records, cfg.sampling, cache_dir / f"seed-{seed}.jsonl", key, seed,
                               name=f"{name} seed {seed}", overwrite=True)
        preds[seed] = [row["response"] for row in rows]
        ended += [row["finished"] for row in rows]
    return preds, round(sum(ended) / max(len(ended), 1), 4)


def output_dir(cfg: EvaluateRun) -> Path:
    """Where an evaluation writes: `out`, else the directory being re-scored, else MODEL/eval."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.rescore:
        src = Path(cfg.rescore)
        return src if src.is_dir() else src.parent
    return Path(need(cfg.model, "model")) / "eval"
