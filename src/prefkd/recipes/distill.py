"""`prefkd distill`: distil a teacher into a student with one method (see `prefkd methods`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from prefkd import config, trackers
from prefkd.cache import model_identity
from prefkd.cards import HubConfig, check_push, publish
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.chat import Renderer, renderer_for, same_tokens
from prefkd.data.corpus import token_blocks
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction
from prefkd.diagnostics import DiagnosticsConfig, HeldOutDiagnostics
from prefkd.distributed import process_state
from prefkd.errors import ConfigError, DataError
from prefkd.generation import SamplingConfig
from prefkd.lora import LoRAConfig, apply_lora, save_trained
from prefkd.losses.top_k import TAIL_MODES
from prefkd.methods import METHODS, Method, MethodConfig, get_method
from prefkd.methods.data import PrepareContext, cache_dir, reference_examples
from prefkd.models import ModelConfig, load_model, load_tokenizer
from prefkd.recipes.common import (
    DataConfig,
    begin_run,
    check_run,
    check_same_vocabulary,
    need,
    read_corpus,
    resolve_train,
)
from prefkd.teacher_client import ServerConfig, TeacherServer, connect
from prefkd.teacher_logits import TeacherLogits
from prefkd.train import RunData, TrainConfig, train
from prefkd.vllm_backend import VLLMConfig


@dataclass
class TeacherConfig(ServerConfig, ModelConfig):
    """The teacher: a model to load (ModelConfig's keys), a server to ask (teacher.url, teacher_client.py), or its
    offline logits (teacher.logits)."""

    # --- offline teacher logits (`prefkd teacher-logits`) ---------------------------------------------------------
    logits: str = opt("", "a `prefkd teacher-logits` directory: kd, akl, tvd, skl, srkl and gkd (lmbda 0) train "
                          "from the teacher's cached top-k log-probs with no teacher loaded")
    logits_tail: str = opt("renorm", "how top-k log-probs become the teacher's distribution (docs/methods.md): "
                                     "renorm (the top-k renormalised) or bucket (the rest's mass as one extra "
                                     "category, the student's tail merged likewise)")

    def __post_init__(self) -> None:
        if self.logits and self.url:
            raise ConfigError("teacher.logits and teacher.url are two ways to stand in for the teacher: set one")
        if self.logits_tail not in TAIL_MODES:
            raise ConfigError(f"teacher.logits_tail must be one of {', '.join(TAIL_MODES)}, not "
                              f"'{self.logits_tail}'")


@dataclass
class DistillRun:
    out: str = opt("runs/distill", "output directory")
    method: str = opt("dpkd", "distillation method (see `prefkd methods`)")
    student: ModelConfig = section(ModelConfig, "the student, usually an SFT checkpoint (student.path)")
    teacher: TeacherConfig = section(TeacherConfig, "the frozen teacher (teacher.path), its server (teacher.url) or "
                                                    "its offline logits (teacher.logits)")
    data: DataConfig = section(DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))
    distill: MethodConfig = section(MethodConfig)
    sampling: SamplingConfig = section(SamplingConfig, "sampling of teacher/student responses during training")
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters via peft (lora.r 0 = train all weights)")
    diagnostics: DiagnosticsConfig = section(DiagnosticsConfig, "implicit reward and KL to the teacher on a fixed "
                                                                "held-out batch during training")
    vllm: VLLMConfig = section(VLLMConfig, "vLLM for the sample caches built before training (GPU only)")
    # Where the model is uploaded, not how it is trained: a finished run may be resumed to push it.
    push_to_hub: str = opt("", "Hub repo id (user/name): upload OUT/model with its model card after training",
                           keyed=False)
    hub: HubConfig = section(HubConfig, keyed=False)

    def __post_init__(self) -> None:
        if type(self.teacher) is ModelConfig:  # callers of the Python API that build the teacher as a ModelConfig
            self.teacher = TeacherConfig(**asdict(self.teacher))


def run_distill(cfg: DistillRun, prompts: list[Instruction] | None = None, replay: list[Instruction] | None = None,
                corpus: list[str] | None = None, name: str | None = None, existing: str = "auto",
                samples_only: bool = False) -> list[dict]:
    """`existing`: what to do with a run already in `cfg.out` (rundir.py); "auto" resumes the same settings.
    `samples_only`: build the method's sample caches and stop (e.g. with vLLM, before a multi-GPU launch)."""
    # Set-up: the method and its options are checked, and the output claimed, before any work.
    out = Path(cfg.out)
    trackers.check_installed(cfg.train.report_to)
    method = get_method(cfg.method)
    if method.check is not None:
        method.check(cfg.distill)
    check_push(cfg.push_to_hub, cfg.hub)
    cache_dir(cfg)  # fails before any work when distill.cache_dir leaves the run directory
    # With samples_only, `out` is not claimed: the caches are keyed files under cache_dir, not a run.
    clear = check_run(out, cfg, existing) if not samples_only else False

    # Models.
    student_path = need(cfg.student.path, "student.path")
    tokenizer = load_tokenizer(student_path, cfg.student.trust_remote_code)
    renderer = renderer_for(tokenizer, cfg.data.template)
    student = load_model(student_path, cfg.student.trust_remote_code, cfg.student.dtype)
    logits = _offline_logits(cfg, method) if cfg.teacher.logits else None
    teacher, teacher_renderer = _teacher(cfg, method, renderer, samples_only) if logits is None else (None, None)
    # train.bf16=auto made true or false before the sample caches, which are keyed on it, are drawn; `cfg` keeps
    # "auto" for config.yaml, `run` holds the choice.
    train_cfg, resolved = resolve_train(out, cfg.train, [student, teacher], clear)
    run = replace(cfg, train=train_cfg) if resolved else cfg

    # Data: the method's examples (sample caches drawn here), replay references and the LM corpus.
    # References are checked by the methods that train on them, with the record that lacks one.
    prompts = prompts or load_instructions(need(cfg.data.prompts, "data.prompts"), require_references=False)
    if replay is None and cfg.data.replay and cfg.distill.replay > 0:
        replay = load_instructions(cfg.data.replay)
    if corpus is None and cfg.data.corpus and cfg.distill.lm_weight > 0:
        corpus = read_corpus(cfg.data.corpus)
    if cfg.distill.replay > 0 and not replay:
        console.print("no replay data (data.replay): running without replay")
    source = cfg.data.prompts or "prompts"
    ctx = PrepareContext(run, _short_prompts(prompts, renderer, cfg.train.max_prompt_tokens, source), source,
                         renderer, student, teacher, teacher_renderer)
    with process_state().main_process_first():  # the main process samples the caches, the others then read them
        prepared = method.prepare(ctx)
    if logits is not None:
        logits.check(renderer, prepared.examples, source)
        console.print(f"{cfg.method}: teacher logits from {cfg.teacher.logits} ({logits.manifest['model']}, "
                      f"top-{logits.k}, tail {logits.tail}); no teacher loaded")
    if samples_only:
        console.print(f"{cfg.method}: sample caches ready for {len(prepared.examples)} prompts under "
                      f"{cache_dir(cfg)}")
        return []
    data = RunData(prepared.examples,
                   replay=reference_examples(renderer, replay, cfg.train, cfg.data.replay or "replay") if replay
                   else None,
                   corpus=token_blocks(tokenizer, corpus, cfg.distill.lm_block_size) if corpus else None,
                   teacher_cache=prepared.teacher_cache, teacher_tokens=prepared.teacher_tokens,
                   teacher_logits=logits)
    d = cfg.distill
    console.print(f"[bold]{cfg.method}[/]: {len(data.examples)} prompts, kappa {d.kappa}, replay "
                  f"{d.replay if data.replay else 0}, lm_weight {d.lm_weight if data.corpus is not None else 0}")

    # Loop and save.
    # The diagnostics score the student's tokens with the teacher: one tokenizer only.
    diagnostics = held_out_diagnostics(cfg, teacher, renderer, prompts) if teacher_renderer is None else None
    model = apply_lora(student, cfg.lora)
    begin_run(out, cfg, clear, resolved)
    teacher_id = (teacher.identity if isinstance(teacher, TeacherServer) else
                  model_identity(cfg.teacher.path) if teacher is not None else
                  logits.identity if logits is not None else None)
    identity = [model_identity(student_path), teacher_id]
    logs = train(method, model, tokenizer, data, run.train, cfg.distill, cfg.sampling, out, teacher,
                 name=name or cfg.method, save=lambda m, tok, path: save_trained(m, tok, path, cfg.lora),
                 diagnostics=diagnostics, diagnostics_every=cfg.diagnostics.every, strict_resume=existing == "resume",
                 identity=identity, run_config=config.to_dict(run), stop_ids=renderer.stop_ids_for(student))
    publish(out, cfg)  # the model card (README.md) beside the saved model, then the upload if asked
    return logs


def _offline_logits(cfg: DistillRun, method: Method) -> TeacherLogits:
    """The cache of teacher.logits, opened for this method (which must be able to train from it)."""
    if method.cached_logits is None:
        able = ", ".join(m.name for m in METHODS.values() if m.cached_logits is not None)
        raise ConfigError(f"method '{cfg.method}' cannot train from offline teacher logits (teacher.logits): it "
                          f"needs the live teacher (teacher.path). Methods that can: {able}")
    temperature = method.cached_logits(cfg.distill, cfg.teacher.logits_tail)
    if cfg.teacher.logits_tail == "bucket" and temperature != 1.0:
        raise ConfigError(f"teacher.logits_tail=bucket needs the divergence's temperature 1 (it is {temperature}): "
                          "the tail's mass at another temperature is not in the cache; use "
                          "teacher.logits_tail=renorm")
    if cfg.diagnostics.every:
        console.print("diagnostics off: they run the teacher, which teacher.logits leaves unloaded")
    return TeacherLogits(cfg.teacher.logits, cfg.teacher.logits_tail, temperature)


def _teacher(cfg: DistillRun, method: Method, renderer: Renderer, samples_only: bool
             ) -> tuple[PreTrainedModel | TeacherServer | None, Renderer | None]:
    """The teacher when the method runs it in training, or for the diagnostics alone; and, when its tokenizer or
    template differs from the student's (cross-tokenizer methods only), the teacher's renderer."""
    if cfg.teacher.url:
        return _teacher_server(cfg, method, renderer)
    if method.needs_teacher:
        teacher_path = need(cfg.teacher.path, "teacher.path")
        teacher_renderer = renderer_for(load_tokenizer(teacher_path, cfg.teacher.trust_remote_code), cfg.data.template)
        differs = not same_tokens(renderer, teacher_renderer)
        if not method.cross_tokenizer:
            check_same_vocabulary(renderer, teacher_renderer, cfg.method)
        if samples_only and cfg.vllm.enabled:  # vLLM loads its own copy; a 13B teacher is not loaded twice
            return None, teacher_renderer if differs else None
        teacher = load_model(teacher_path, cfg.teacher.trust_remote_code, cfg.teacher.dtype)
        if differs:
            console.print(f"{cfg.method} across tokenizers: the teacher ({teacher_path}, "
                          f"{len(teacher_renderer.tokenizer)} tokens, {teacher_renderer.name}) reads every text in "
                          f"its own tokens")
        return teacher, teacher_renderer if differs else None
    if cfg.diagnostics.every and cfg.teacher.path and not samples_only:
        teacher_renderer = renderer_for(load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code),
                                        cfg.data.template)
        if same_tokens(renderer, teacher_renderer):
            return load_model(cfg.teacher.path, cfg.teacher.trust_remote_code, cfg.teacher.dtype), None
        console.print("diagnostics off: they score the student's tokens of the student's prompts with the teacher, "
                      "whose tokenizer or chat template differs")
    return None, None


def _teacher_server(cfg: DistillRun, method: Method, renderer: Renderer
                    ) -> tuple[TeacherServer | None, Renderer | None]:
    """The teacher behind teacher.url, for a method that needs only its samples and sequence log-probs (black-box
    methods reach it when their sample caches are drawn).

    Its texts cross tokenizers as with a local teacher of another tokenizer (TeacherTokens), except when the server's
    tokenizer reads every record as the student's does: then ids go to the server as they are, so that a run against
    the server computes what a run with the same teacher loaded does (no re-tokenised samples, no byte lengths)."""
    if cfg.teacher.path:
        raise ConfigError(f"teacher.url={cfg.teacher.url} and teacher.path={cfg.teacher.path} are both set: the "
                          "teacher is either on a server or loaded here; drop one")
    if method.needs_teacher and not method.sequence_teacher:
        served = ", ".join(m.name for m in METHODS.values() if m.sequence_teacher or not m.needs_teacher)
        raise ConfigError(f"{cfg.method} compares the teacher's next-token distributions, which a completions "
                          f"server (teacher.url) does not give: train it from offline teacher logits "
                          f"(teacher.logits=DIR) or a loaded teacher (teacher.path); teacher.url serves {served}")
    if not method.needs_teacher:
        return None, None
    server = connect(cfg.teacher, cfg.teacher.trust_remote_code)
    teacher_renderer = renderer_for(server.tokenizer, cfg.data.template)
    differs = not same_tokens(renderer, teacher_renderer)
    console.print(f"{cfg.method}: the teacher is {server.name} on {server.url}" +
                  (f", across tokenizers ({len(teacher_renderer.tokenizer)} tokens, {teacher_renderer.name})"
                   if differs else ""))
    if cfg.diagnostics.every:
        console.print("diagnostics off: they need the teacher's token distributions, which a teacher server does "
                      "not give")
    return server, teacher_renderer if differs else None


def _short_prompts(prompts: list[Instruction], renderer: Renderer, max_tokens: int,
                   source: str) -> list[Instruction]:
    """As MiniLLM/DPKD: long prompts are dropped before anything is sampled for them."""
    lengths = [len(p) for p in renderer.prompt_ids(prompts)]
    kept = [r for r, n in zip(prompts, lengths, strict=True) if n <= max_tokens]
    if len(kept) < len(prompts):
        console.print(f"{source}: dropped {len(prompts) - len(kept)} of {len(prompts)} prompts over {max_tokens} "
                      "tokens")
    if not kept:
        raise DataError(f"no prompt is left under train.max_prompt_tokens={max_tokens}", source)
    return kept


def held_out_diagnostics(cfg: DistillRun, teacher: PreTrainedModel | TeacherServer | None, renderer: Renderer,
                         prompts: list[Instruction]) -> HeldOutDiagnostics | None:
    if not cfg.diagnostics.every or not isinstance(teacher, torch.nn.Module):
        return None
    records = load_instructions(cfg.data.heldout, require_references=False) if cfg.data.heldout else prompts
    ids = [p for p in renderer.prompt_ids(records) if len(p) <= cfg.train.max_prompt_tokens]
    return HeldOutDiagnostics(teacher, ids[: cfg.diagnostics.prompts], cfg.sampling, cfg.distill.dpkd.beta,
                              renderer.tokenizer.pad_token_id, renderer.stop_ids_for(teacher), cfg.diagnostics.seed)

