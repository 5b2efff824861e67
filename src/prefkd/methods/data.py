"""What methods train on, prepared from the run's prompts: references, prompts, cached teacher samples.

A method's `prepare(ctx)` returns `MethodData`; the preparations several methods share live here, a method's own
(PLaD's pairs, DPKD's teacher cache) in the method's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd import rundir
from prefkd.cache import TeacherCache, cache_key, generate_cached, model_identity
from prefkd.console import console
from prefkd.data.collate import Example, encode_examples, encode_prompts
from prefkd.data.records import Instruction
from prefkd.distributed import process_state
from prefkd.errors import ConfigError, DataError
from prefkd.generation import SamplingConfig
from prefkd.models import load_model, load_tokenizer
from prefkd.vllm_backend import VLLMConfig, VLLMSampler

if TYPE_CHECKING:
    from prefkd.recipes.distill import DistillRun
    from prefkd.train import TrainConfig


@dataclass
class PrepareContext:
    run: DistillRun
    prompts: list[Instruction]  # the distillation records, already filtered to train.max_prompt_tokens
    source: str  # how errors and messages name the data
    tokenizer: PreTrainedTokenizerBase  # the student's
    student: PreTrainedModel
    teacher: PreTrainedModel | None  # loaded when the method needs it during training


@dataclass
class MethodData:
    examples: list[Example]
    teacher_cache: TeacherCache | None = None  # dpkd family, teacher_samples=cached


def reference_examples(tokenizer: PreTrainedTokenizerBase, records: list[Instruction], cfg: TrainConfig,
                       source: str) -> list[Example]:
    """Prompt + first reference per record, within the length limits (SFT, replay, `sequences` with references)."""
    missing = [i for i, r in enumerate(records) if not r.references]
    if missing:
        raise DataError("record has no reference response, which this run needs", source, missing[0] + 1,
                        "references")
    ex, dropped = encode_examples(tokenizer, [r.prompt for r in records], [r.references[0] for r in records],
                                  cfg.max_prompt_tokens, cfg.max_length)
    if dropped:
        console.print(f"{source}: dropped {dropped} of {len(records)} examples over the length limits "
                      f"(prompt > {cfg.max_prompt_tokens} or total > {cfg.max_length} tokens)")
    if not ex:
        raise DataError("no example is left after the length filters; raise train.max_prompt_tokens or "
                        "train.max_length", source)
    return ex


def prompt_examples(tokenizer: PreTrainedTokenizerBase, records: list[Instruction], cfg: TrainConfig) -> list[Example]:
    kept = [p for p in encode_prompts(tokenizer, [r.prompt for r in records]) if len(p) <= cfg.max_prompt_tokens]
    return [Example(p, [], index=i) for i, p in enumerate(kept)]


def references(ctx: PrepareContext) -> MethodData:
    return MethodData(reference_examples(ctx.tokenizer, ctx.prompts, ctx.run.train, ctx.source))


def prompts(ctx: PrepareContext) -> MethodData:
    return MethodData(prompt_examples(ctx.tokenizer, ctx.prompts, ctx.run.train))


def teacher_samples(ctx: PrepareContext) -> MethodData:
    """One cached teacher sample per prompt, in the student's tokens."""
    return MethodData([Example(p, r) for p, r, _ in sample_cache(ctx, "teacher", ctx.run.sampling)])


def sequences(ctx: PrepareContext) -> MethodData:
    """One response per prompt: the references when every prompt has one (`distill.responses=auto`), else cached
    teacher samples."""
    if ctx.run.distill.responses == "auto" and all(r.references for r in ctx.prompts):
        return references(ctx)
    return teacher_samples(ctx)


def cache_dir(run: DistillRun):
    """Where the run's sample caches live: a relative distill.cache_dir lies inside the run directory; an absolute
    one (shared by runs) is the user's choice."""
    return rundir.inside(run.out, run.distill.cache_dir or "cache", "distill.cache_dir")


def backend(cfg: VLLMConfig) -> str:
    return "vllm" if cfg.enabled else "hf"


def sample_cache(ctx: PrepareContext, role: str, sampling: SamplingConfig
                 ) -> list[tuple[list[int], list[int], str]]:
    """(student prompt ids, student-tokenised response + EOS if finished, text) per prompt, from a keyed cache of
    the teacher's (`role="teacher"`) or the initial student's samples.

    The response text is re-tokenised with the student's tokenizer, so this works when the teacher's differs
    (black-box methods)."""
    run = ctx.run
    spec = run.teacher if role == "teacher" else run.student
    if not spec.path:
        raise ConfigError(f"set {role}.path=... (on the command line or in --config)")
    key = cache_key(model_identity(spec.path), ctx.prompts, sampling, run.train.seed, backend(run.vllm))
    path = cache_dir(run) / f"{role}-{key}.jsonl"
    model = ctx.teacher if role == "teacher" else ctx.student
    sampler = VLLMSampler(spec.path, run.vllm, spec.trust_remote_code) if run.vllm.enabled else None
    if sampler is None and model is None:  # a loaded teacher is not loaded twice
        model = load_model(spec.path, spec.trust_remote_code, spec.dtype)
    if model is not None:
        model.to(process_state().device)  # sample on this process's GPU, where training would put the model anyway
    rows = generate_cached(model, load_tokenizer(spec.path, spec.trust_remote_code), ctx.prompts, sampling, path,
                           key, run.train.seed, name=f"{role} samples", sampler=sampler)
    if sampler is not None:
        sampler.close()
    prompt_ids = encode_prompts(ctx.tokenizer, [r.prompt for r in ctx.prompts])
    eos = ctx.tokenizer.eos_token_id
    return [(p, encode_prompts(ctx.tokenizer, [row["response"]])[0] + ([eos] if row["finished"] else []),
             row["response"]) for p, row in zip(prompt_ids, rows, strict=True)]
