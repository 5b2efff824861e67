"""What methods train on, prepared from the run's prompts: references, prompts, cached teacher samples.

A method's `prepare(ctx)` returns `MethodData`; the preparations several methods share live here, a method's own
(PLaD's pairs, DPKD's teacher cache) in the method's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from prefkd import rundir
from prefkd.cache import TeacherCache, cache_key, complete_cache, generate_cached, model_identity
from prefkd.console import console
from prefkd.data.chat import Renderer, renderer_for
from prefkd.data.collate import Example, encode_examples
from prefkd.data.records import Instruction
from prefkd.distributed import process_state
from prefkd.errors import ConfigError, DataError
from prefkd.generation import SamplingConfig
from prefkd.models import load_model, load_tokenizer
from prefkd.teacher_client import TeacherServer, connect
from prefkd.vllm_backend import VLLMConfig, VLLMSampler

if TYPE_CHECKING:
    from prefkd.methods.cross_tokenizer import TeacherTokens
    from prefkd.recipes.distill import DistillRun
    from prefkd.train import TrainConfig


@dataclass
class PrepareContext:
    run: DistillRun
    prompts: list[Instruction]  # the distillation records, already filtered to train.max_prompt_tokens
    source: str  # how errors and messages name the data
    renderer: Renderer  # the student's tokenizer and template
    student: PreTrainedModel
    teacher: PreTrainedModel | TeacherServer | None  # loaded (or connected) when the method needs it in training
    # The teacher's tokenizer and template, when they differ from the student's (cross-tokenizer methods).
    teacher_renderer: Renderer | None = None


@dataclass
class MethodData:
    examples: list[Example]
    teacher_cache: TeacherCache | None = None  # dpkd family, teacher_samples=cached
    teacher_tokens: TeacherTokens | None = None  # cross-tokenizer methods: the prompts in the teacher's tokens


def reference_examples(renderer: Renderer, records: list[Instruction], cfg: TrainConfig, source: str,
                       all_turns: bool = False) -> list[Example]:
    """Prompt + first reference per record, within the length limits (SFT, replay, `sequences` with references).
    `all_turns`: a conversation's earlier assistant turns are trained on too (multi-turn SFT)."""
    missing = [i for i, r in enumerate(records) if not r.references]
    if missing:
        raise DataError("record has no reference response, which this run needs", source, missing[0] + 1,
                        "references")
    if all_turns:
        prompt_ids, response_ids, masks = (list(x) for x in zip(*(renderer.conversation(r, r.references[0])
                                                                 for r in records), strict=True))
    else:
        prompt_ids, masks = renderer.prompt_ids(records), None
        response_ids = [renderer.response_ids(r, r.references[0]) for r in records]
    ex, dropped = encode_examples(prompt_ids, response_ids, cfg.max_prompt_tokens, cfg.max_length, masks)
    if dropped:
        console.print(f"{source}: dropped {dropped} of {len(records)} examples over the length limits "
                      f"(prompt > {cfg.max_prompt_tokens} or total > {cfg.max_length} tokens)")
    if not ex:
        raise DataError("no example is left after the length filters; raise train.max_prompt_tokens or "
                        "train.max_length", source)
    return ex


def prompt_examples(renderer: Renderer, records: list[Instruction], cfg: TrainConfig) -> list[Example]:
    kept = [p for p in renderer.prompt_ids(records) if len(p) <= cfg.max_prompt_tokens]
    return [Example(p, [], index=i) for i, p in enumerate(kept)]


def references(ctx: PrepareContext) -> MethodData:
    return MethodData(reference_examples(ctx.renderer, ctx.prompts, ctx.run.train, ctx.source))


def prompts(ctx: PrepareContext) -> MethodData:
    return MethodData(prompt_examples(ctx.renderer, ctx.prompts, ctx.run.train))


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


def teacher_identity(ctx: PrepareContext) -> str:
    """What cache keys know the teacher by: its weights, or the server's name for them (teacher.url)."""
    if isinstance(ctx.teacher, TeacherServer):
        return ctx.teacher.identity
    return model_identity(ctx.run.teacher.path)


def teacher_server(ctx: PrepareContext) -> TeacherServer:
    """The run's teacher server: the one the method's teacher already is, else connected now."""
    if isinstance(ctx.teacher, TeacherServer):
        return ctx.teacher
    ctx.teacher = connect(ctx.run.teacher)
    return ctx.teacher


def sample_cache(ctx: PrepareContext, role: str, sampling: SamplingConfig
                 ) -> list[tuple[list[int], list[int], str]]:
    """(student prompt ids, student-tokenised response + end token if finished, text) per prompt, from a keyed cache
    of the teacher's (`role="teacher"`) or the initial student's samples.

    The sampled model renders prompts with its own tokenizer and template (`data.template` applied to it), and
    the response text is re-tokenised with the student's, so this works when the teacher's differ (black-box
    methods)."""
    run = ctx.run
    spec = run.teacher if role == "teacher" else run.student
    if role == "teacher" and run.teacher.url:  # the teacher server samples; nothing is loaded here
        server = teacher_server(ctx)
        renderer = renderer_for(server.tokenizer, run.data.template)
        key = cache_key(server.identity, [renderer.prompt(r) for r in ctx.prompts], sampling, run.train.seed,
                        "server")
        rows = generate_cached(server, renderer, ctx.prompts, sampling, cache_dir(run) / f"{role}-{key}.jsonl", key,
                               run.train.seed, name=f"{role} samples", sampler=server.sample)
        return [(p, ctx.renderer.sample_ids(row["response"], row["finished"]), row["response"])
                for p, row in zip(ctx.renderer.prompt_ids(ctx.prompts), rows, strict=True)]
    if not spec.path:
        raise ConfigError(f"set {role}.path=... (on the command line or in --config)")
    renderer = (ctx.renderer if role == "student" else
                renderer_for(load_tokenizer(spec.path, spec.trust_remote_code), run.data.template))
    key = cache_key(model_identity(spec.path), [renderer.prompt(r) for r in ctx.prompts], sampling, run.train.seed,
                    backend(run.vllm))
    path = cache_dir(run) / f"{role}-{key}.jsonl"
    rows = complete_cache(path, key, len(ctx.prompts))
    if rows is None:  # a complete cache loads no model (a run from offline teacher logits loads no teacher)
        model = ctx.teacher if role == "teacher" else ctx.student
        sampler = VLLMSampler(spec.path, run.vllm, spec.trust_remote_code) if run.vllm.enabled else None
        if sampler is None and model is None:  # a loaded teacher is not loaded twice
            model = load_model(spec.path, spec.trust_remote_code, spec.dtype)
        if model is not None:
            model.to(process_state().device)  # sample on this process's GPU, where training would put it anyway
        rows = generate_cached(model, renderer, ctx.prompts, sampling, path, key, run.train.seed,
                               name=f"{role} samples", sampler=sampler)
        if sampler is not None:
            sampler.close()
    return [(p, ctx.renderer.sample_ids(row["response"], row["finished"]), row["response"])
            for p, row in zip(ctx.renderer.prompt_ids(ctx.prompts), rows, strict=True)]
