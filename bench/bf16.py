"""Benchmark 6: bf16 autocast vs fp32 for 50 DPKD steps from the same seed (CPU), at two model sizes.

`prefkd distill --method dpkd` (through `run_distill`) with the demo's distillation settings (16 examples per
step: 8 D prompts sampled by teacher and student + 8 replayed D0 references, LM loss on the corpus, up to 160 new
tokens) on the demo's model sizes, `train.bf16=false` vs `true`, same seed. Speed: wall time of the 50 steps
(from the training log), runs alternating fp32, bf16, ...; loss: the last log row (mean of steps 41-50).
`--quick`: 20 steps, and 15 on the 6x384 models with their fixture SFT-trained 10 steps (`fixtures.QUICK_BASE`).
The same on GPT-2 6x384 student and teacher (`fixtures.BASE`, the MFU benchmark's size): the demo's models are too
small for matmuls to dominate a step, so autocast's fixed costs outweigh its faster matmuls (`bench/bf16_kernels.py`
says which).

`bf16_speedup_124m`: the same DPKD settings on random-initialised GPT-2-small-shape student and teacher (12x768,
vocabulary 50,257: `bench/shapes.py`, the models of `bench/distill_124m.py`), whose samples run to 160 new tokens;
seconds per step after the first (kernels built, caches warm), runs alternating fp32, bf16. `--shape` picks the
shape (`make bench`: 124m, `make bench-quick`: tiny, a check that it runs); the figure of another shape carries its
name (`bf16_speedup_tiny`). Alone: `python -m bench.bf16 --shape 124m --steps 4 --rounds 1`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench import common, distill_124m, fixtures, shapes
from prefkd.data.loaders import load_instructions
from prefkd.diagnostics import DiagnosticsConfig
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig
from prefkd.models import ModelConfig
from prefkd.recipes.common import DataConfig
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.train import TrainConfig

STEPS = 50
# `--quick`: 20 steps at the demo's sizes, 15 on the 6x384 models (50 there alone would take 3.5 of bench-quick's 10
# minutes), whose fixture is `fixtures.QUICK_BASE` (SFT 10 steps, not 40). Still one fp32 and one bf16 run each; the
# loss figures then compare the last log row's steps 11-20 and 11-15.
QUICK_STEPS = 20
QUICK_BASE_STEPS = 15
# At 124M shape a CPU DPKD step takes about a minute (two 124M models sample 160 tokens each): few steps, and the
# first of each run is left out of the timing.
SHAPE_STEPS, QUICK_SHAPE_STEPS = 4, 3


def _run(out: Path, bf16: bool, fx: fixtures.Fixture, steps: int = STEPS) -> tuple[float, float]:
    t_path, s_path = fixtures.models(fx)
    d = fixtures.data_dir()
    cfg = DistillRun(out=str(out), method="dpkd", student=ModelConfig(path=str(s_path)),
                     teacher=ModelConfig(path=str(t_path)),
                     data=DataConfig(prompts=str(d / "d_prompts.jsonl"), replay=str(d / "d0.jsonl"),
                                     corpus=str(d / "corpus.txt")),
                     train=TrainConfig(steps=steps, batch_size=16, lr=5e-4, log_every=10, save_every=0, seed=0,
                                       bf16=bf16),
                     distill=MethodConfig(), sampling=SamplingConfig(max_new_tokens=160),
                     # off: the held-out diagnostics at the first and last step run outside autocast, the same
                     # fixed cost on both sides, not the steps being compared
                     diagnostics=DiagnosticsConfig(every=0))
    logs = run_distill(cfg)
    return logs[-1]["elapsed"], logs[-1]["loss"]


def _alternate(fx: fixtures.Fixture, rounds: int, steps: int = STEPS) -> tuple[dict[str, float], dict[str, float]]:
    """(median wall seconds, final loss) per precision: runs alternating fp32, bf16, fp32, ..."""
    runs: dict[str, list[tuple[float, float]]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in ("fp32", "bf16"):
                runs[name].append(_run(Path(tmp) / f"{name}{r}", name == "bf16", fx, steps))
    wall = {k: common.median([t for t, _ in v]) for k, v in runs.items()}
    loss = {k: v[0][1] for k, v in runs.items()}  # same seed: every run of a precision gives the same loss
    return wall, loss


def shape_speedup(shape: str, steps: int, rounds: int) -> dict:
    """`bf16_speedup_124m` (or `_tiny`, ...): fp32 / bf16 seconds per DPKD step at a shape of bench/shapes.py, the
    first step of each run left out; runs alternate fp32, bf16, ... Saved as benchmark `bf16_<shape>`."""
    sh = shapes.SHAPES[shape]
    load_before = common.load_avg()
    per_step: dict[str, list[float]] = {"fp32": [], "bf16": []}
    loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = distill_124m.save_models(sh, Path(tmp))
        for r in range(rounds):
            for name in ("fp32", "bf16"):
                cfg = distill_124m.distill_config(sh, student, teacher, Path(tmp) / f"{name}{r}", steps,
                                                  name == "bf16", log_every=1)
                logs = run_distill(cfg)
                per_step[name].append((logs[-1]["elapsed"] - logs[0]["elapsed"]) / (steps - 1))
                loss[name] = logs[-1]["loss"]  # same seed: every run of a precision gives the same loss
    med = {k: common.median(v) for k, v in per_step.items()}
    figures = {shapes.key("bf16_speedup_124m", sh): round(med["fp32"] / med["bf16"], 2)}
    settings = {"shape": sh.describe(), "method": "dpkd", "steps": steps, "timed_steps": steps - 1, "batch": 16,
                "replay": 0.5, "lm_weight": 0.1, "max_new_tokens": distill_124m.new_tokens(sh), "seed": 0,
                "weights": "random init", "runs_per_precision": rounds, "threads": torch.get_num_threads()}
    details = {"s_per_step": {k: [round(x, 2) for x in v] for k, v in per_step.items()}, "last_loss": loss,
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save(f"bf16_{sh.name}", figures, settings, details)
    common.table(f"6. DPKD steps at {sh.name} shape, bf16 autocast vs fp32 (same seed, CPU)", [
        (f"{sh.name}: speed bf16 / fp32, s per step after the first", f"{next(iter(figures.values()))}x", "report"),
        (f"{sh.name}: s per step fp32, bf16", f"{med['fp32']:.2f}, {med['bf16']:.2f}", ""),
    ])
    return figures


def run(quick: bool, shape: str | None = None) -> dict:
    sh = shapes.shape_for(shape, quick)
    rounds = 1 if quick else 2
    load_instructions(fixtures.data_dir() / "d_prompts.jsonl", require_references=False)  # builds the data
    base_fx = fixtures.QUICK_BASE if quick else fixtures.BASE
    fixtures.models(base_fx)  # trained before any timing starts
    load_before = common.load_avg()
    steps = QUICK_STEPS if quick else STEPS
    wall, loss = _alternate(fixtures.Fixture(), rounds, steps)
    base_steps = QUICK_BASE_STEPS if quick else STEPS
    wall_base, loss_base = _alternate(base_fx, rounds, base_steps)
    base = _base_sft_speedup(reps=2 if quick else 6)
    figures = {"bf16_speedup": round(wall["fp32"] / wall["bf16"], 2),
               "bf16_loss_rel_diff": round(abs(loss["bf16"] - loss["fp32"]) / abs(loss["fp32"]), 4),
               "bf16_speedup_base": round(wall_base["fp32"] / wall_base["bf16"], 2),
               "bf16_loss_rel_diff_base": round(abs(loss_base["bf16"] - loss_base["fp32"]) / abs(loss_base["fp32"]),
                                                4)}
    settings = {"method": "dpkd", "steps": steps, "batch": 16, "replay": 0.5, "lm_weight": 0.1,
                "max_new_tokens": 160, "student": "gpt2 tiny (2x128)", "teacher": "gpt2 mini (3x192)",
                "base": f"the *_base figures: student and teacher gpt2 base (6x384), SFT {base_fx.teacher_steps} "
                        "steps",
                "base_steps": base_steps,
                "seed": 0, "runs_per_precision": rounds, "threads": torch.get_num_threads(),
                "held_out_diagnostics": "off"}
    details = {"wall_s": {k: round(v, 1) for k, v in wall.items()}, "final_loss": loss,
               "wall_s_base": {k: round(v, 1) for k, v in wall_base.items()}, "final_loss_base": loss_base,
               "sft_step_base_model_bf16_speedup": round(base, 2),
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("bf16", figures, settings, details)
    common.table(f"6. {steps} DPKD steps, bf16 autocast vs fp32 (same seed, CPU)", [
        ("demo sizes (2x128 student, 3x192 teacher): speed bf16 / fp32", f"{figures['bf16_speedup']}x", ">= 1.6x"),
        ("demo sizes: final loss |bf16 - fp32| / fp32", f"{figures['bf16_loss_rel_diff']:.2%}", "<= 5%"),
        ("demo sizes: wall s fp32, bf16", f"{details['wall_s']['fp32']}, {details['wall_s']['bf16']}", ""),
        (f"6x384, {base_steps} steps: speed bf16 / fp32", f"{figures['bf16_speedup_base']}x", ">= 1.6x"),
        ("6x384: final loss |bf16 - fp32| / fp32", f"{figures['bf16_loss_rel_diff_base']:.2%}", "<= 5%"),
        ("6x384: wall s fp32, bf16", f"{details['wall_s_base']['fp32']}, {details['wall_s_base']['bf16']}", ""),
        ("compute-bound reference: SFT step, GPT-2 6x384, bf16 / fp32", f"{base:.2f}x", "report"),
    ])
    return {**figures, **shape_speedup(sh.name, QUICK_SHAPE_STEPS if quick else SHAPE_STEPS, rounds)}


def _base_sft_speedup(reps: int) -> float:
    """Speed of bf16 autocast vs fp32 on the MFU benchmark's SFT step (6x384 GPT-2), alternating on the same
    batches: where matmuls dominate, which the demo's tiny models are far from."""
    from bench.train_mfu import SFTBench

    bench = SFTBench()
    state = {"k": 0}

    def step(bf16: bool) -> None:
        bench.step(bench.batch(state["k"] // 2), bf16)  # both precisions see the same batches
        state["k"] += 1

    times = common.alternate({"fp32": lambda: step(False), "bf16": lambda: step(True)}, reps=reps)
    return common.median(times["fp32"]) / common.median(times["bf16"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="benchmark 6's DPKD steps at one shape of bench/shapes.py only")
    parser.add_argument("--shape", choices=["tiny", "124m"], default="124m")
    parser.add_argument("--steps", type=int, default=SHAPE_STEPS, help="steps per run, the first not timed")
    parser.add_argument("--rounds", type=int, default=1, help="runs per precision, alternating")
    a = parser.parse_args()
    common.set_threads()
    shape_speedup(a.shape, a.steps, a.rounds)
