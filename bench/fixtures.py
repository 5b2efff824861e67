"""What the benchmarks run on: the demo's suite and tokenizer, a briefly trained teacher and student, sampled pairs.

Built once through the library (`prepare_data`, `run_sft`, `sample_responses`) and kept under `bench/.cache`,
keyed by their settings, so every benchmark of a run (and the next run) sees the same models and data.
Trained (not random) models matter: their samples end at EOS with varied lengths, as in real training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prefkd import atomic, stages
from prefkd.data.collate import Example, encode_prompts
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction
from prefkd.experiment_data import DollyConfig, ExperimentDataConfig, prepare_data
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.models import ModelConfig, load_model, load_tokenizer
from prefkd.recipes.common import DataConfig
from prefkd.recipes.sft import SFTRun, run_sft
from prefkd.train import TrainConfig

CACHE = Path(__file__).parent / ".cache"


@dataclass(frozen=True)
class Fixture:
    teacher_size: str = "mini"  # the demo's teacher (3x192) and student (2x128)
    student_size: str = "tiny"
    teacher_steps: int = 300
    student_steps: int = 300
    n_pairs: int = 64
    max_new_tokens: int = 128
    source: str = "suite"  # or "dolly": real instructions with long answers (needs ../shared/data/dolly)
    batch_size: int = 32  # SFT batch of both models
    # The fixtures' SFT precision: train.bf16=auto, fp32 for the suite's and Dolly's narrow models (where bf16
    # autocast is slower on a CPU: benchmark 6) and bf16 for BASE's 6x384 ones on a CPU with native bf16.
    sft_bf16: bool | str = "auto"


# Models of the MFU benchmark's size (6x384), where matmuls dominate a step: what bf16 autocast can speed up.
# Trained briefly (35 s each on the Intel Xeon). `make bench-quick` trains QUICK_BASE and QUICK_DOLLY below instead,
# shorter still, to stay under 12 minutes from a fresh clone; the suite's models, which most benchmarks share, are the
# same in both.
BASE = Fixture(teacher_size="base", student_size="base", teacher_steps=40, student_steps=40)
# `make bench-quick`'s: the same models SFT-trained 10 steps (53 s less of the quick run). Their samples still end at
# EOS after a few tokens: in 20 fp32 DPKD steps of benchmark 6, 3-10 tokens a step for the teacher and 2-9 for the
# student (the 40-step fixture's: 4-10 and 3-17); steps 2-20 took 48 s against 45 s with the 40-step fixture.
QUICK_BASE = replace(BASE, teacher_steps=10, student_steps=10)
# Dolly prompts and answers (median reference ~40 words; the models write until EOS or 128 tokens): where decoding,
# not prefill, is the work of pair generation.
DOLLY = Fixture(teacher_steps=80, student_steps=80, source="dolly", batch_size=16)
# `make bench-quick`'s: SFT 40 steps (28 s less). Side by side with DOLLY on benchmark 3's 32 quick prompts, the same
# work (4,800-5,000 new tokens a pass against 4,850-5,200; answers of 60 and 94 tokens on average instead of 77 and 76)
# and the same figure within its noise (naive / batched 4.24x and 5.01x against 4.55x and 3.58x).
QUICK_DOLLY = replace(DOLLY, teacher_steps=40, student_steps=40)
DOLLY_DATA = ExperimentDataConfig(source="dolly", dolly=DollyConfig(
    dolly="../shared/data/dolly/databricks-dolly-15k.jsonl", test="../shared/data/dolly/test-minillm-500.jsonl",
    validation="../shared/data/dolly/dev-minillm-1000.jsonl", max_train=2000, max_validation=20, max_test=20))


def data_dir(source: str = "suite") -> Path:
    if source == "suite":
        d = CACHE / "data"
        prepare_data(ExperimentDataConfig(), d)
    else:
        d = CACHE / f"data-{source}"
        prepare_data(DOLLY_DATA, d)
    return d


def models(fx: Fixture = Fixture()) -> tuple[Path, Path]:
    """Paths of the trained teacher and student (SFT on D0 + D and on D0, as the demo, with fewer steps)."""
    d = data_dir(fx.source)
    tokenizer = load_tokenizer(str(d / "tokenizer"))
    paths = []
    for name, size, steps, files in (("teacher", fx.teacher_size, fx.teacher_steps, ["d0", "d"]),
                                     ("student", fx.student_size, fx.student_steps, ["d0"])):
        key = stages.fingerprint(name, size, steps, files, fx.source, fx.batch_size, fx.sft_bf16)
        out = CACHE / f"{name}-{key}"
        if not stages.is_done(out, key):
            records = [r for f in files for r in load_instructions(d / f"{f}.jsonl")]
            tcfg = TrainConfig(steps=steps, batch_size=fx.batch_size, lr=1e-3, bf16=fx.sft_bf16, save_every=0,
                               log_every=50)
            run_sft(SFTRun(str(out), ModelConfig(size=size), str(d / "tokenizer"), DataConfig(), tcfg), records,
                    tokenizer, f"bench {name}")
            stages.mark_done(out, key)
        paths.append(out / "model")
    return paths[0], paths[1]


def balanced(records: list[Instruction], n: int) -> list[Instruction]:
    """`n` records taken round-robin over the categories: short QA answers and long profiles alike."""
    by_cat: dict[str, list[Instruction]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)
    queues = [iter(v) for _, v in sorted(by_cat.items())]
    out: list[Instruction] = []
    while len(out) < n:
        for q in queues:
            r = next(q, None)
            if r is not None and len(out) < n:
                out.append(r)
    return out


def pairs(fx: Fixture = Fixture()) -> list[Example]:
    """`n_pairs` D prompts (balanced over categories) with a teacher sample (response_ids) and a student sample
    (rejected_ids)."""
    teacher_path, student_path = models(fx)
    key = stages.fingerprint(asdict(fx))
    path = CACHE / f"pairs-{key}.json"
    if not path.is_file():
        tokenizer = load_tokenizer(str(teacher_path))
        records = balanced(load_instructions(data_dir(fx.source) / "d.jsonl"), fx.n_pairs)
        prompts = encode_prompts(tokenizer, [r.prompt for r in records])
        sampling = SamplingConfig(max_new_tokens=fx.max_new_tokens)
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        y_t = sample_responses(load_model(str(teacher_path)), prompts, sampling, pad, eos, seed=1)
        y_s = sample_responses(load_model(str(student_path)), prompts, sampling, pad, eos, seed=2)
        atomic.write_json(path, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, y_t, y_s,
                                                                                                strict=True)])
    rows = json.loads(path.read_text())
    return [Example(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
