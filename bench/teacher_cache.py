"""Benchmark 4: DPKD step time in epoch 2 vs epoch 1 with `distill.dpkd.teacher_samples=cached`.

`prefkd distill --method dpkd` (through `run_distill`, the real loop) on 64 D prompts, 8 prompts per step, no
replay or LM term, for two epochs. In epoch 1 each step samples y_t from the teacher and scores y_t and y_s with
it, storing y_t and log p(y_t); in epoch 2 a step samples only y_s and the teacher scores only y_s. Step times come
from the training log (one row per step); both epochs are in the same run, so the ratio is side by side. The full
run also times `teacher_samples=fresh` (Algorithm 1: new y_t every step) in alternation, for reference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench import common, fixtures
from prefkd.data.loaders import load_instructions
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig
from prefkd.methods.dpkd import DPKDConfig
from prefkd.models import ModelConfig
from prefkd.recipes.common import DataConfig
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.train import TrainConfig

PROMPTS = 64
BATCH = 8


def _step_times(logs: list[dict]) -> list[float]:
    elapsed = [row["elapsed"] for row in logs]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed, strict=True)]


def _run(out: Path, mode: str, seed: int, prompts) -> list[float]:
    t_path, s_path = fixtures.models()
    per_epoch = PROMPTS // BATCH
    cfg = DistillRun(out=str(out), method="dpkd", student=ModelConfig(path=str(s_path)),
                     teacher=ModelConfig(path=str(t_path)), data=DataConfig(),
                     train=TrainConfig(steps=2 * per_epoch, batch_size=BATCH, lr=5e-5, log_every=1, save_every=0,
                                       seed=seed),
                     distill=MethodConfig(replay=0.0, lm_weight=0.0, dpkd=DPKDConfig(teacher_samples=mode)),
                     sampling=SamplingConfig(max_new_tokens=128))
    return _step_times(run_distill(cfg, prompts=prompts))


def run(quick: bool) -> dict:
    rounds = 2 if quick else 3
    prompts = fixtures.balanced(load_instructions(fixtures.data_dir() / "d_prompts.jsonl", require_references=False),
                                PROMPTS)
    per_epoch = PROMPTS // BATCH
    epoch1, epoch2, fresh = [], [], []
    load_before = common.load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            times = _run(Path(tmp) / f"cached{r}", "cached", r, prompts)
            epoch1 += times[1:per_epoch]  # the first step of a run also warms up
            epoch2 += times[per_epoch:]
            if not quick:
                fresh += _run(Path(tmp) / f"fresh{r}", "fresh", r, prompts)[1:]
    figures = {"teacher_cache_speedup": round(common.median(epoch1) / common.median(epoch2), 2)}
    settings = {"method": "dpkd", "prompts": PROMPTS, "batch": BATCH, "epochs": 2, "runs": rounds,
                "max_new_tokens": 128, "replay": 0, "lm_weight": 0, "teacher": "gpt2 mini", "student": "gpt2 tiny",
                "threads": torch.get_num_threads()}
    details = {"median_step_s": {"epoch1": round(common.median(epoch1), 3), "epoch2": round(common.median(epoch2), 3)},
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    rows = [("epoch-1 / epoch-2 step time (cached)", f"{figures['teacher_cache_speedup']}x", "report"),
            ("median step s epoch 1, epoch 2", f"{details['median_step_s']['epoch1']}, "
                                               f"{details['median_step_s']['epoch2']}", "")]
    if fresh:
        details["median_step_s"]["fresh"] = round(common.median(fresh), 3)
        details["fresh_vs_cached_epoch2"] = round(common.median(fresh) / common.median(epoch2), 2)
        rows.append(("fresh (Algorithm 1) / cached epoch-2 step time", f"{details['fresh_vs_cached_epoch2']}x",
                     "report"))
    common.save("teacher_cache", figures, settings, details)
    common.table("4. DPKD with cached teacher samples + log-probs: epoch 2 vs epoch 1", rows)
    return figures
