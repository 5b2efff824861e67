"""`prefkd teacher-logits`: the teacher's top-k next-token log-probs on every response token of a data set's
sequences, written once for token-level methods to train from without the teacher (`teacher.logits=DIR`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from prefkd import teacher_logits
from prefkd.cache import model_identity, read_cache
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.chat import TEMPLATE_HELP, Renderer, renderer_for
from prefkd.data.collate import Example
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction
from prefkd.distributed import process_state
from prefkd.errors import DataError
from prefkd.methods.data import reference_examples
from prefkd.models import load_model, load_tokenizer
from prefkd.recipes.common import need


@dataclass
class TeacherLogitsRun:
    model: str = opt("", "the teacher: model path or hub id")
    data: str = opt("", "the records whose sequences are scored (any format `prefkd.data.load_instructions` reads): "
                        "prompt + first reference, as `prefkd distill` builds them")
    samples: str = opt("", "a `prefkd generate` cache of these records: score its responses instead of the "
                           "references (as a distill run on teacher samples trains on them)")
    out: str = opt("", "output directory (manifest.json + safetensors shards); a rerun of the same settings "
                       "completes it")
    top_k: int = opt(32, "log-probs kept per position: the teacher's k most probable tokens, plus the tail's mass")
    dtype: str = opt("float16", "dtype of the stored log-probs: float16 (default: measured lossless enough, "
                                "docs/scaling.md), bfloat16 or float32; ids are int32, the tail mass float32")
    template: str = opt("auto", TEMPLATE_HELP)
    batch_size: int = opt(8, "sequences per teacher forward")
    shard_records: int = opt(256, "sequences per shard (the unit a killed run loses)")
    max_prompt_tokens: int = opt(256, "drop sequences whose prompt is longer (the distill run's "
                                      "train.max_prompt_tokens)")
    max_length: int = opt(512, "drop reference sequences whose prompt + response is longer (train.max_length)")
    model_dtype: str = opt("float32", "dtype of the teacher's weights: float32, bfloat16, float16 or auto")
    trust_remote_code: bool = opt(False, "allow a hub model's own code to run (off unless you trust it)")


def sequences(cfg: TeacherLogitsRun, renderer: Renderer, records: list[Instruction]) -> tuple[list[Example], int]:
    """(the sequences a distill run of the same data builds, how many records were dropped by the length limits)."""
    source = cfg.data
    kept = [r for r, p in zip(records, renderer.prompt_ids(records), strict=True) if len(p) <= cfg.max_prompt_tokens]
    if not cfg.samples:
        limits = SimpleNamespace(max_prompt_tokens=cfg.max_prompt_tokens, max_length=cfg.max_length)
        examples = reference_examples(renderer, kept, limits, source)
        return examples, len(records) - len(examples)
    # As methods/data.sample_cache: the cached text in the student's tokens, with the end token if it had ended.
    header, rows = read_cache(cfg.samples)
    if header["n"] != len(kept) or len(rows) != len(kept):
        raise DataError(f"the samples cache holds {len(rows)} of {header['n']} samples, but {source} has "
                        f"{len(kept)} records within max_prompt_tokens; give the cache of these records' prompts "
                        "(complete it with `prefkd generate --resume`)", cfg.samples)
    examples = []
    for rec, prompt, row in zip(kept, renderer.prompt_ids(kept), rows, strict=True):
        if row.get("prompt") is not None and row["prompt"] != renderer.prompt(rec):
            raise DataError(f"row {row['index']} was sampled for another prompt than record {rec.id or row['index']} "
                            f"of {source} renders to; give the cache of these records", cfg.samples)
        examples.append(Example(prompt, renderer.sample_ids(row["response"], row["finished"])))
    return examples, len(records) - len(kept)


def run_teacher_logits(cfg: TeacherLogitsRun, overwrite: bool = False) -> dict:
    model_path, out = need(cfg.model, "model"), need(cfg.out, "out")
    renderer = renderer_for(load_tokenizer(model_path, cfg.trust_remote_code), cfg.template)
    records = load_instructions(need(cfg.data, "data"), require_references=not cfg.samples)
    examples, dropped = sequences(cfg, renderer, records)
    if dropped:
        console.print(f"{cfg.data}: {dropped} of {len(records)} records dropped by the length limits")
    settings = teacher_logits.Settings(model_identity(model_path), teacher_logits.tokenizer_identity(renderer),
                                       cfg.top_k, cfg.dtype,
                                       f"samples {Path(cfg.samples).name}" if cfg.samples else "references",
                                       cfg.shard_records)
    model = load_model(model_path, cfg.trust_remote_code, cfg.model_dtype).to(process_state().device)
    manifest = teacher_logits.build(model, renderer, examples, out, settings, cfg.batch_size, overwrite, dropped)
    console.print(f"{out}: {teacher_logits.describe(manifest)}")
    return manifest
