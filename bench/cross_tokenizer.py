"""Benchmark 7: the cost of distilling across tokenizers, a DPKD step with a teacher of another tokenizer vs one with
the student's.

Both teachers have the same architecture and size (the demo's mini GPT-2) and are trained the same way, on the same
records; the other one's byte-level BPE is trained on the same texts in reverse order with a vocabulary 1.5x the
student's, so texts split differently. `prefkd distill --method dpkd` (the real loop, fresh samples every step:
Algorithm 1) runs 8 prompts per step, no replay or LM term, alternating between the two teachers; step times come
from the training logs. Across tokenizers a step also decodes every sample, re-encodes it with the other tokenizer,
and runs the teacher on its own (longer or shorter) token sequences; the ratio of median step times is that cost.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench import common, fixtures
from prefkd import stages
from prefkd.data.loaders import load_instructions
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig
from prefkd.models import ModelConfig, train_tokenizer
from prefkd.recipes.common import DataConfig
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.recipes.sft import SFTRun, run_sft
from prefkd.train import TrainConfig

PROMPTS = 32
BATCH = 8


def other_teacher(fx: fixtures.Fixture = fixtures.Fixture()) -> Path:
    """The fixture's teacher, trained the same way with a tokenizer of its own."""
    d = fixtures.data_dir(fx.source)
    key = stages.fingerprint("other-tokenizer teacher", fx.teacher_size, fx.teacher_steps, fx.source, fx.batch_size,
                             fx.sft_bf16)
    out = fixtures.CACHE / f"teacher-other-{key}"
    if not stages.is_done(out, key):
        records = [r for f in ("d0", "d") for r in load_instructions(d / f"{f}.jsonl")]
        texts = [r.prompt + r.references[0] for r in records][::-1]
        tokenizer = train_tokenizer(texts, vocab_size=3072)
        tcfg = TrainConfig(steps=fx.teacher_steps, batch_size=fx.batch_size, lr=1e-3, bf16=fx.sft_bf16,
                           save_every=0, log_every=50)
        run_sft(SFTRun(str(out), ModelConfig(size=fx.teacher_size), "", DataConfig(), tcfg), records, tokenizer,
                "bench teacher (other tokenizer)")
        stages.mark_done(out, key)
    return out / "model"


def _step_times(logs: list[dict]) -> list[float]:
    elapsed = [row["elapsed"] for row in logs]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed, strict=True)]


def _run(out: Path, teacher: Path, student: Path, seed: int, prompts) -> list[dict]:
    cfg = DistillRun(out=str(out), method="dpkd", student=ModelConfig(path=str(student)),
                     teacher=ModelConfig(path=str(teacher)), data=DataConfig(),
                     train=TrainConfig(steps=PROMPTS // BATCH, batch_size=BATCH, lr=5e-5, log_every=1, save_every=0,
                                       seed=seed),
                     distill=MethodConfig(replay=0.0, lm_weight=0.0), sampling=SamplingConfig(max_new_tokens=128))
    return run_distill(cfg, prompts=prompts)


def run(quick: bool) -> dict:
    rounds = 2 if quick else 4
    same, student = fixtures.models()
    other = other_teacher()
    prompts = fixtures.balanced(load_instructions(fixtures.data_dir() / "d_prompts.jsonl", require_references=False),
                                PROMPTS)
    times: dict[str, list[float]] = {"same": [], "cross": []}
    lengths: dict[str, list[float]] = {"same": [], "cross": []}
    teacher_lengths: dict[str, list[float]] = {"same": [], "cross": []}
    load_before = common.load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, teacher in (("same", same), ("cross", other)):
                logs = _run(Path(tmp) / f"{name}{r}", teacher, student, r, prompts)
                times[name] += _step_times(logs)[1:]  # the first step of a run also warms up
                lengths[name] += [row["len_student"] for row in logs]
                teacher_lengths[name] += [row["len_teacher"] for row in logs]
    ratio = round(common.median(times["cross"]) / common.median(times["same"]), 2)
    figures = {"dpkd_cross_tokenizer_step_cost": ratio}
    settings = {"method": "dpkd", "teacher_samples": "fresh", "prompts": PROMPTS, "batch": BATCH, "runs": rounds,
                "max_new_tokens": 128, "replay": 0, "lm_weight": 0, "teacher": "gpt2 mini, 300 SFT steps",
                "other tokenizer": "byte-level BPE, 3072 tokens, same texts reversed", "student": "gpt2 tiny",
                "threads": torch.get_num_threads()}
    details = {"median_step_s": {k: round(common.median(v), 3) for k, v in times.items()},
               "mean_student_sample_tokens": {k: round(sum(v) / len(v), 1) for k, v in lengths.items()},
               "mean_teacher_sample_student_tokens": {k: round(sum(v) / len(v), 1) for k, v in
                                                      teacher_lengths.items()},
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("cross_tokenizer", figures, settings, details)
    common.table("7. DPKD step with a teacher of another tokenizer vs the student's", [
        ("step time, other tokenizer / same", f"{ratio}x", "report"),
        ("median step s (same, other)", f"{details['median_step_s']['same']}, {details['median_step_s']['cross']}",
         ""),
        ("mean student sample tokens (same, other)", f"{details['mean_student_sample_tokens']['same']}, "
                                                     f"{details['mean_student_sample_tokens']['cross']}", ""),
        ("mean teacher sample, student tokens (same, other)",
         f"{details['mean_teacher_sample_student_tokens']['same']}, "
         f"{details['mean_teacher_sample_student_tokens']['cross']}", "")])
    return figures
