"""A bf16 DPKD run of the demo's distillation pipeline at GPT-2-small shape: `prefkd distill --method dpkd` (through
`run_distill`, the real loop) with the demo's DPKD settings (16 examples per step: 8 suite prompts sampled by teacher
and student + 8 replayed D0 references, LM loss on the corpus, up to 160 new tokens, seed 0) and `train.bf16=true`,
on a random-initialised 124M-shape student and teacher (`bench/shapes.py`) saved with the suite's tokenizer.

A check that the whole loop runs at this size on the device (GPU: `bench/gpu_check.sh`), not a comparison: it
records the wall time, the steps per second and whether every logged loss is finite. Not part of `make bench`
(on CPU a step at this shape takes about a minute).

    python -m bench.distill_124m [--shape tiny|124m] [--steps N] [--fp32]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bench import common, fixtures, shapes
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig
from prefkd.models import ModelConfig, load_tokenizer
from prefkd.recipes.common import DataConfig
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.train import TrainConfig


def save_models(sh: shapes.Shape, out: Path) -> tuple[Path, Path]:
    """The shape's random student and teacher with the suite's tokenizer (the data's), as checkpoints."""
    tok = load_tokenizer(str(fixtures.data_dir() / "tokenizer"))
    sh = replace(sh, vocab=max(sh.vocab, len(tok)))  # the tiny shape's 512 rows are fewer than the suite's tokens
    paths = []
    for name, arch, seed in (("student", sh.student, 0), ("teacher", sh.teacher, 1)):
        path = out / name
        shapes.build(arch, sh, tok, seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def new_tokens(sh: shapes.Shape) -> int:
    return 160 if sh.positions >= 512 else sh.max_new_tokens  # the demo's 160; the tiny shape has 128 positions


def distill_config(sh: shapes.Shape, student: Path, teacher: Path, out: Path, steps: int, bf16: bool,
                   log_every: int) -> DistillRun:
    """The demo's DPKD settings on the shape's saved models (`save_models`); also benchmark 6's 124M-shape run."""
    d = fixtures.data_dir()
    return DistillRun(out=str(out), method="dpkd", student=ModelConfig(path=str(student)),
                      teacher=ModelConfig(path=str(teacher)),
                      data=DataConfig(prompts=str(d / "d_prompts.jsonl"), replay=str(d / "d0.jsonl"),
                                      corpus=str(d / "corpus.txt")),
                      train=TrainConfig(steps=steps, batch_size=16, lr=5e-4, log_every=log_every, save_every=0,
                                        seed=0, bf16=bf16),
                      distill=MethodConfig(), sampling=SamplingConfig(max_new_tokens=new_tokens(sh)))


def run(shape: str, steps: int, bf16: bool = True) -> dict:
    sh = shapes.SHAPES[shape]
    new = new_tokens(sh)
    with tempfile.TemporaryDirectory() as tmp:
        s_path, t_path = save_models(sh, Path(tmp))
        logs = run_distill(distill_config(sh, s_path, t_path, Path(tmp) / "run", steps, bf16, max(1, steps // 4)))
    losses = [row["loss"] for row in logs]
    figures = {shapes.key(f"dpkd_{'bf16' if bf16 else 'fp32'}_run_124m", sh): {
        "steps": steps, "wall_s": round(logs[-1]["elapsed"], 1), "steps_per_s": round(steps / logs[-1]["elapsed"], 3),
        "final_loss": round(losses[-1], 4), "losses_finite": all(math.isfinite(x) for x in losses)}}
    settings = {"shape": sh.describe(), "method": "dpkd", "batch": 16, "replay": 0.5, "lm_weight": 0.1,
                "max_new_tokens": new, "bf16": bf16, "weights": "random init", "data": "the demo suite",
                "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
    common.save(f"distill_124m_{'bf16' if bf16 else 'fp32'}", figures, settings, {"log": logs})
    common.console.print(figures)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "124m"], default="124m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fp32", action="store_true", help="train.bf16=false instead")
    a = parser.parse_args()
    common.set_threads()
    run(a.shape, a.steps, not a.fp32)
