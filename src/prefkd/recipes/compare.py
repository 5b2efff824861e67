"""`prefkd compare` (and `prefkd demo`): a methods x seeds matrix, from data to a report, one resumable stage each.

Stages (each reused on a rerun with the same --out when its inputs are unchanged):
  data                 shards, corpora and tokenizer (experiment_data.py)
  <role>_pretrain      optional LM pretraining of a model built from scratch (teacher, student)
  teacher              SFT of the larger model on D0 and D references (it knows more)
  sft                  SFT of the student on D0 only
  sft_continued/seedS  control: the SFT student trained further on D0 with the distillation steps
  <name>/seedS         distillation of the SFT student on D's prompts, for every method or variant and seed
  eval/<name>/<run>    sampled generation on the evaluation split, per-prompt scores
then results.json (means, bootstrap intervals, differences from sft, gap recovered) and report.md / report.html.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefkd import atomic, config, rundir, stages, trackers
from prefkd.cards import write_card
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.loaders import load_instructions
from prefkd.diagnostics import DiagnosticsConfig
from prefkd.errors import ConfigError, PrefkdError
from prefkd.eval_files import read_responses
from prefkd.evaluate import EvalConfig, groups
from prefkd.experiment_data import (
    ExperimentDataConfig,
    large_split_file,
    prepare_data,
    prepare_teacher_tokenizer,
)
from prefkd.generation import SamplingConfig
from prefkd.jobs import Job, run_jobs
from prefkd.judges import JudgeConfig, preferences
from prefkd.methods import METHODS, MethodConfig
from prefkd.methods.dpkd import prompts_and_teacher_cache
from prefkd.models import ModelConfig, load_tokenizer
from prefkd.recipes.common import DataConfig, write_run_config
from prefkd.recipes.distill import DistillRun, TeacherConfig
from prefkd.recipes.evaluate import EvaluateRun
from prefkd.recipes.sft import SFTRun, run_sft
from prefkd.report import results_table, verdict, write_report
from prefkd.stats import bootstrap, difference, gap_recovered, mean_score
from prefkd.train import TrainConfig

CONTROL = "sft_continued"
BASELINES = ("sft", CONTROL)  # every other row is compared with these, paired on prompts
METRICS = ("rougeL", "exact_match")


@dataclass
class ExperimentConfig:
    out: str = opt("runs/compare", "output directory; a rerun reuses its finished stages")
    tag: str = opt("", "names results-TAG.json / report-TAG.md, so several comparisons share one out directory "
                       "and its trained stages (teacher, SFT student, runs with the same settings)")
    data: ExperimentDataConfig = section(ExperimentDataConfig)
    methods: list[str] = opt(["dpkd"], "methods (see `prefkd methods`) or variant names, each distilled from the "
                                       "SFT student")
    variants: Any = opt({}, "named settings of a method: {name: {method: dpkd, set: ['distill.kappa=1', ...]}}; "
                            "`set` takes the keys of `prefkd distill`")
    seeds: list[int] = opt([0], "training seeds of every distillation run and of the control")
    continued_sft: bool = opt(True, "also continue the SFT student on D0 with distill_train's settings: the "
                                    "control that separates more training from what the teacher adds")
    # mini (3x192) trained 2,400 steps beat small (4x256) trained 1,200 steps in the same time: 64.9 vs 53.2 Rouge-L.
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(size="mini"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(size="tiny"))
    pretrain_block_size: int = opt(256, "tokens per pretraining block")
    teacher_pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=0, batch_size=16, lr=1e-3))
    student_pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=0, batch_size=16, lr=1e-3))
    # bf16 auto: fp32 for the demo's 3x192 teacher, where bf16 autocast ran an SFT step 0.70x as fast on an AMX Xeon
    # (docs/benchmarks.md, benchmark 6); bf16 for a teacher at least 384 wide.
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2400, batch_size=32, lr=1e-3, bf16="auto", save_every=400))
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=32, lr=1e-3, save_every=500))
    # lr 1e-3 chosen on the validation split (configs/suite/tune.yaml): kd 53.4 -> 63.1, dpkd 53.2 -> 60.9 Rouge-L.
    distill_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=600, batch_size=16, lr=1e-3, save_every=100))
    distill: MethodConfig = section(MethodConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=160))
    diagnostics: DiagnosticsConfig = section(DiagnosticsConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(  # MiniLLM's protocol, 160 new tokens at most
        seeds=[10, 20, 30], sampling=SamplingConfig(max_new_tokens=160, batch_size=64, no_repeat_ngram_size=6)))
    eval_split: str = opt("test", "'test' for final numbers, 'validation' while tuning; with the embedded suite, "
                                  "'test_large' (607 prompts, test's 173 first) and 'validation_large' (316) for "
                                  "paired differences of about a point; or a records file of your own (any format "
                                  "prefkd reads, conversations included) every model is evaluated on")
    judge: JudgeConfig = section(JudgeConfig, "optional judge of every evaluated response against the references "
                                              "(win rates, PLaD's view); judge.path=teacher uses OUT/teacher/model")
    bootstrap: int = opt(2000, "bootstrap replicates of every interval")
    contrasts: list[str] = opt([], "further rows every other row is compared with, paired on prompts like sft "
                                   "(e.g. [kd]: does dpkd beat kd?); differences in results.json, verdicts in the "
                                   "report")
    workers: int = opt(1, "processes running the control, distillation and evaluation stages side by side (each "
                          "with its share of the torch threads; on a GPU they share it); 1 runs them in order")


@dataclass(frozen=True)
class Run:
    label: str  # "" for a single model (teacher, sft), "seed0" ... for the matrix
    model_dir: Path
    key: str


def resolve(cfg: ExperimentConfig, name: str, base: DistillRun) -> DistillRun:
    """The DistillRun of a method or a variant (a method with `set` overrides)."""
    variants = cfg.variants or {}
    if not isinstance(variants, dict):
        raise ConfigError("variants must be a mapping {name: {method: ..., set: [...]}}")
    if name in variants:
        spec = variants[name]
        if not isinstance(spec, dict) or spec.get("method") not in METHODS or set(spec) - {"method", "set"}:
            raise ConfigError(f"variant '{name}' needs 'method' (one of `prefkd methods`) and optional 'set' (a list "
                              f"of key=value overrides); got {spec!r}")
        overrides = spec.get("set") or []
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"variant '{name}': 'set' must be a list of 'key=value' strings")
        run = replace(base, method=spec["method"])
        return config.from_dict(DistillRun, config.apply_overrides({}, list(overrides)), base=run)
    if name not in METHODS:
        raise ConfigError(f"'{name}' is neither a method (`prefkd methods`) nor a variant ({', '.join(variants)})")
    return replace(base, method=name)


def run_experiment(cfg: ExperimentConfig) -> dict:
    t0 = time.time()
    if cfg.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {cfg.workers}")
    if unknown := [c for c in cfg.contrasts if c not in (*cfg.methods, *BASELINES, "teacher")]:
        raise ConfigError(f"contrasts {unknown} are not rows of this comparison: name methods, variants, sft or "
                          f"{CONTROL}")
    check_teacher_tokenizer(cfg)
    out = Path(cfg.out)
    cfg = with_run_group(cfg)
    write_run_config(out, cfg)
    data = out / "data"
    keys = {"data": prepare_data(cfg.data, data)}
    teacher_tok_key = prepare_teacher_tokenizer(cfg.data, data, keys["data"])
    runs: dict[str, list[Run]] = {}

    for role, model, pre, tcfg, files in (("teacher", cfg.teacher, cfg.teacher_pretrain, cfg.teacher_train,
                                           ["d0", "d"]),
                                          ("sft", cfg.student, cfg.student_pretrain, cfg.student_train, ["d0"])):
        # A teacher with its own tokenizer is pretrained and trained with it, and saves it with its model: every
        # later stage (distillation, evaluation, the judge) reads the teacher in its own tokens from there.
        own = role == "teacher" and teacher_tok_key is not None
        tok = str(data / ("tokenizer_teacher" if own else "tokenizer"))
        tokenizer = load_tokenizer(tok)
        base_key, init = keys["data"], model
        if own:  # the shared tokenizer keeps the key it always had
            base_key = stages.fingerprint(keys["data"], "teacher_tokenizer", teacher_tok_key)
        if pre.steps:
            base_key = stages.fingerprint(base_key, asdict(model), stages.settings(pre), cfg.pretrain_block_size)
            pdir = out / f"{role}_pretrain"
            if not stages.is_done(pdir, base_key):
                docs = [d for d in (data / "pretrain.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
                if not docs:
                    raise ConfigError(f"{role}_pretrain.steps > 0 needs data.pretrain_corpus")
                run_sft(SFTRun(str(pdir), model, tok, DataConfig(), pre, block_size=cfg.pretrain_block_size),
                        tokenizer=tokenizer, name=f"{role} pretrain", corpus=docs)
                stages.mark_done(pdir, base_key)
            init = ModelConfig(path=str(pdir / "model"))
        # = the demo's key without pretraining
        keys[role] = stages.fingerprint(base_key, asdict(model), stages.settings(tcfg))
        if not stages.is_done(out / role, keys[role]):
            records = [r for f in files for r in load_instructions(str(data / f"{f}.jsonl"))]
            logs = run_sft(SFTRun(str(out / role), init, tok, DataConfig(), tcfg), records, tokenizer, role)
            stages.mark_done(out / role, keys[role], {"final": logs[-1] if logs else {}})
        runs[role] = [Run("", out / role / "model", keys[role])]

    student = ModelConfig(path=str(out / "sft" / "model"))
    tok = str(data / "tokenizer")
    train_jobs: list[Job] = []
    if cfg.continued_sft:
        runs[CONTROL] = []
        for seed in cfg.seeds:
            tcfg = replace(cfg.distill_train, seed=seed)
            d, key = out / CONTROL / f"seed{seed}", stages.fingerprint(keys["sft"], stages.settings(tcfg))
            train_jobs.append(Job(f"{CONTROL} seed{seed}", SFTRun(str(d), student, tok, DataConfig(), tcfg), d, key,
                                  records=str(data / "d0.jsonl")))
            runs[CONTROL].append(Run(f"seed{seed}", d / "model", key))

    corpus = data / "corpus.txt"
    # Teacher samples shared by every method's runs: one absolute directory inside this experiment's --out (a
    # relative distill.cache_dir would be taken inside each run's own directory).
    shared_cache = str(rundir.inside(out, cfg.distill.cache_dir or "cache", "distill.cache_dir").resolve())
    for name in cfg.methods:
        runs[name] = []
        for seed in cfg.seeds:
            d = out / name / f"seed{seed}"
            base = DistillRun(str(d), name, student, TeacherConfig(path=str(out / "teacher" / "model")),
                              DataConfig(prompts=str(data / "d_prompts.jsonl"), replay=str(data / "d0.jsonl"),
                                         corpus=str(corpus) if corpus.read_text(encoding="utf-8").strip() else "",
                                         heldout=str(data / "validation.jsonl")),
                              replace(cfg.distill_train, seed=seed),
                              replace(cfg.distill, cache_dir=shared_cache),
                              cfg.sampling, diagnostics=cfg.diagnostics)
            run = resolve(cfg, name, base)
            key = stages.fingerprint(keys["teacher"], keys["sft"], {**stages.settings(run), "out": ""})
            train_jobs.append(Job(f"{name} seed{seed}", run, d, key))
            runs[name].append(Run(f"seed{seed}", d / "model", key))
    run_jobs(train_jobs, cfg.workers, out / "logs")

    split, split_name, split_key = eval_records_file(cfg.eval_split, data)
    records = load_instructions(str(split))
    judge = replace(cfg.judge, path=str(out / "teacher" / "model")) if cfg.judge.path == "teacher" else cfg.judge
    metrics = (*METRICS, "win_rate", "judge_score") if judge.path else METRICS
    eval_jobs: dict[str, list[Job]] = {}
    for name, rs in runs.items():
        eval_jobs[name] = []
        for r in rs:
            eval_dir = out / "eval" / split_name / name / (r.label or "model")
            key = stages.fingerprint(r.key, asdict(cfg.eval), split_key, *([asdict(judge)] if judge.path else []))
            run = EvaluateRun(model=str(r.model_dir), data=str(split), out=str(eval_dir), eval=cfg.eval, judge=judge)
            eval_jobs[name].append(Job(f"eval {name} {r.label}".strip(), run, eval_dir, key, records=str(split)))
    run_jobs([j for js in eval_jobs.values() for j in js], cfg.workers, out / "logs")
    for name, js in eval_jobs.items():  # each evaluated model's card gains its results table
        for r, j in zip(runs[name], js, strict=True):
            write_card(r.model_dir.parent, eval_dir=j.stage_dir, name=f"{name} {r.label}".strip())
    scores: dict[str, dict[str, np.ndarray]] = {}  # name -> metric -> [runs, seeds, prompts]
    for name, js in eval_jobs.items():
        per_run = [json.loads((j.stage_dir / "prompt_scores.json").read_text(encoding="utf-8")) for j in js]
        scores[name] = {m: np.array([p[m] for p in per_run], dtype=np.float64) for m in metrics}
    texts = {name: [read_responses(j.stage_dir, records) for j in js] for name, js in eval_jobs.items()}
    ts_metric = "judge_score" if judge.path else "rougeL"
    ts = teacher_win_rates({k: v[ts_metric] for k, v in scores.items()}, texts, judge.tie_tolerance)

    results = summarize(scores, records, cfg, ts)
    results.update(wall_seconds=round(time.time() - t0, 1), torch_threads=torch.get_num_threads(), workers=cfg.workers)
    atomic.write_json(out / results_name(cfg.tag), results)
    write_report(out, results)
    return results


def check_teacher_tokenizer(cfg: ExperimentConfig) -> None:
    """Before any stage: with the teacher's own tokenizer (`data.teacher_tokenizer.vocab_size`), every method and
    variant must distil across tokenizers; the token-level ones that compare distributions over one vocabulary are
    refused here, by name, rather than after the teacher and the other runs have trained."""
    if not cfg.data.teacher_tokenizer.vocab_size:
        return
    if cfg.teacher.path:
        raise ConfigError("data.teacher_tokenizer.vocab_size builds a tokenizer for a teacher built from scratch; "
                          f"teacher.path ('{cfg.teacher.path}') is a model with its own tokenizer: set one or the "
                          "other")
    base = DistillRun(method="dpkd")
    refused = {}
    for name in cfg.methods:
        run = resolve(cfg, name, replace(base, distill=cfg.distill))
        method = METHODS[run.method]
        if method.needs_teacher and not method.cross_tokenizer:
            refused[name] = f"{run.method} compares the two models' distributions over one vocabulary"
        elif method.prepare is prompts_and_teacher_cache and run.distill.dpkd.anchor != "ce":
            refused[name] = f"distill.dpkd.anchor={run.distill.dpkd.anchor} compares token distributions"
    if refused:
        across = ", ".join(n for n, m in METHODS.items() if n != "sft" and (m.cross_tokenizer or not m.needs_teacher))
        raise ConfigError("data.teacher_tokenizer.vocab_size gives the teacher its own tokenizer, and these rows "
                          f"need the student's tokenizer in the teacher: "
                          f"{'; '.join(f'{n} ({why})' for n, why in refused.items())}. Methods that distil across "
                          f"tokenizers: {across} (dpkd family with distill.dpkd.anchor=ce); or set "
                          "data.teacher_tokenizer.vocab_size=0")


TRAIN_SECTIONS = ("teacher_pretrain", "student_pretrain", "teacher_train", "student_train", "distill_train")


def with_run_group(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every stage's trackers in one group (wandb, Trackio) / experiment (MLflow): the tag, else the out directory's
    name; a run_group set in the config wins. Fails here, before any stage, when a tracker is not installed."""
    trackers.check_installed(*(getattr(cfg, s).report_to for s in TRAIN_SECTIONS))
    group = cfg.tag or Path(cfg.out).resolve().name
    return replace(cfg, **{s: replace(getattr(cfg, s), run_group=getattr(cfg, s).run_group or group)
                           for s in TRAIN_SECTIONS})


def results_name(tag: str = "") -> str:
    return f"results-{tag}.json" if tag else "results.json"


def run_compare(cfg: ExperimentConfig) -> dict:
    """Run the comparison, then print its table, the verdicts against sft and the control, and where it wrote."""
    results = run_experiment(cfg)
    console.print(results_table(results))
    for m in cfg.methods:
        for baseline in BASELINES:
            for group in ("all", "kind:D"):
                if line := verdict(results, m, baseline, group):
                    console.print(line)
    report = f"report{'-' + cfg.tag if cfg.tag else ''}"
    console.print(f"wrote {cfg.out}/{results_name(cfg.tag)}, {report}.md and {report}.html in "
                  f"{results['wall_seconds']:.0f} s")
    return results


def rebuild_report(run_dir: str, tag: str = "") -> Path:
    """`prefkd report`: report.md and report.html of a finished comparison, from its results file."""
    path = Path(run_dir) / results_name(tag)
    if not path.is_file():
        raise PrefkdError(f"{path} not found: pass the output directory of `prefkd compare` or `prefkd demo`")
    return write_report(run_dir, json.loads(path.read_text(encoding="utf-8")))


def teacher_win_rates(scores: dict[str, np.ndarray], texts: dict[str, list[dict[int, list[str]]]],
                      tie_tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """PLaD's teacher-over-student win rate (T-S WR) of every row but the teacher, from the evaluation's own scores.

    `scores[name]` is [runs, seeds, prompts] of one judge's score per response (Rouge-L against the references, or
    a judge's score), `texts[name]` one {seed: responses} per run. Each eval seed of a row meets the teacher's
    response of the same seed: 100 if the teacher's scores higher, 0 if lower, 50 for a tie (within
    `tie_tolerance`, or the same text). Returns name -> [runs, seeds, prompts]; 50 = the student is as good."""
    if "teacher" not in scores:
        return {}
    t_scores, (t_texts,) = scores["teacher"][0], texts["teacher"]
    out = {}
    for name, s in scores.items():
        if name == "teacher":
            continue
        out[name] = np.array([[preferences(t_scores[k], s[r, k], t_texts[seed], run_texts[seed], tie_tolerance)
                               for k, seed in enumerate(run_texts)] for r, run_texts in enumerate(texts[name])])
    return out


def eval_records_file(eval_split: str, data: Path) -> tuple[Path, str, str]:
    """(the records file, the name of its evaluation directory, what its stage keys hold): a split of the data stage,
    or a user's file, keyed by its content so that an edited file is evaluated again."""
    if eval_split in ("test", "validation"):
        return data / f"{eval_split}.jsonl", eval_split, eval_split  # = the key of runs from before user files
    if eval_split in ("test_large", "validation_large"):
        path = large_split_file(data, eval_split)
        return path, eval_split, hashlib.sha256(path.read_bytes()).hexdigest()
    path = Path(eval_split)
    if not path.is_file():
        raise ConfigError(f"eval_split '{eval_split}' is neither test, validation, test_large, validation_large nor "
                          "an existing records file")
    return path, f"file-{path.stem}", hashlib.sha256(path.read_bytes()).hexdigest()


def summarize(scores: dict[str, dict[str, np.ndarray]], records: list, cfg: ExperimentConfig,
              ts: dict[str, np.ndarray] | None = None) -> dict:
    """Means, spreads and bootstrap intervals per row and prompt group; differences from sft and gap recovered;
    the teacher-over-student win rate where `ts` (from `teacher_win_rates`) has the row.

    Each metric array is [runs, eval seeds, prompts]. Spreads (std, per_seed) are over the runs' eval seeds; the
    intervals come from `prefkd.stats.bootstrap` on per-prompt scores averaged over eval seeds ([runs, prompts])."""
    ts = ts or {}
    by_group = groups(records)
    bases = (*BASELINES, *(c for c in cfg.contrasts if c not in BASELINES))
    rows = []
    for name, metrics in scores.items():
        row: dict[str, Any] = {"name": name, "runs": int(metrics["rougeL"].shape[0]), "breakdown": {}}
        for group, idx in by_group.items():
            entry: dict[str, Any] = {"n": len(idx)}
            for m in metrics:
                cells = metrics[m][:, :, idx].mean(-1)  # [runs, seeds]
                # name -> [runs, prompts]: per-prompt scores averaged over eval seeds
                prompts = {k: v[m].mean(1)[:, idx] for k, v in scores.items() if k in (name, "teacher", *bases)}
                ci = bootstrap(mean_score(name), {name: prompts[name]}, cfg.bootstrap, seed=0)
                stat = {"mean": float(cells.mean()), "std": float(cells.std(ddof=1)) if cells.size > 1 else 0.0,
                        "per_seed": cells.mean(0).tolist(), "per_run": cells.mean(1).tolist(),
                        "ci95": [ci.low, ci.high]}
                stat["vs"] = {}
                for base in bases:
                    if base in prompts and name not in (base, "teacher"):
                        diff = bootstrap(difference(name, base), prompts, cfg.bootstrap, seed=1)
                        stat["vs"][base] = {"diff": diff.value, "ci95": [diff.low, diff.high],
                                            "significant": diff.excludes_zero}
                if "sft" in prompts and "teacher" in prompts and name not in ("sft", "teacher"):
                    gap = bootstrap(gap_recovered(name), prompts, cfg.bootstrap, seed=2)
                    stat["gap_recovered"] = {"value": gap.value, "ci95": [gap.low, gap.high]}
                entry[m] = stat
            if name in ts:
                cells = ts[name][:, :, idx].mean(-1)
                ci = bootstrap(mean_score(name), {name: ts[name].mean(1)[:, idx]}, cfg.bootstrap, seed=3)
                entry["ts_win_rate"] = {"mean": float(cells.mean()), "per_seed": cells.mean(0).tolist(),
                                        "per_run": cells.mean(1).tolist(), "ci95": [ci.low, ci.high]}
            row["breakdown"][group] = entry
        row.update({m: row["breakdown"]["all"][m] for m in (*metrics, "ts_win_rate") if m in row["breakdown"]["all"]})
        rows.append(row)
    return {"tag": cfg.tag, "judge": cfg.judge.path or None, "split": cfg.eval_split, "seeds": cfg.eval.seeds,
            "train_seeds": cfg.seeds, "rows": rows, "methods": cfg.methods, "n_prompts": len(records),
            "contrasts": list(cfg.contrasts), "ts_judge": (cfg.judge.path or "rouge") if ts else None,
            "bootstrap": cfg.bootstrap}
