"""The verbs' work, shared by the CLI and the demo: SFT, distillation and evaluation runs on record files.

Each run writes its resolved config next to its outputs (`config.yaml`), trains with the one loop and saves
the model with `save_pretrained` under `OUT/model`.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd import atomic, config, rundir
from prefkd.cache import TeacherCache, cache_key, generate_cached, model_identity, read_cache, teacher_cache_key
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.collate import Example, encode_examples, encode_prompts
from prefkd.data.corpus import token_blocks
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction, read_records
from prefkd.diagnostics import DiagnosticsConfig, HeldOutDiagnostics
from prefkd.distributed import process_state
from prefkd.errors import ConfigError, DataError, PrefkdError
from prefkd.eval_files import read_records_of, read_responses, write_evaluation
from prefkd.evaluate import PROTOCOL, EvalConfig, breakdown, prompt_scores, summarize, unscorable
from prefkd.generation import SamplingConfig
from prefkd.judges import JudgeConfig, check_reference_free, head_to_head, judge_against_references, make_judge
from prefkd.lora import LoRAConfig, apply_lora, save_trained
from prefkd.methods import ANCHORS, Method, MethodConfig, get_method
from prefkd.models import ModelConfig, load_model, load_tokenizer, model_from_config, n_params, resolve_device
from prefkd.scoring import embedding_f1
from prefkd.train import RunData, TrainConfig, train
from prefkd.vllm_backend import VLLMConfig, VLLMSampler


@dataclass
class DataConfig:
    train: str = opt("", "SFT: jsonl records with references")
    prompts: str = opt("", "distillation: jsonl records whose prompts the method uses (references unused "
                           "unless the method needs them)")
    replay: str = opt("", "jsonl records with references replayed with cross-entropy (distill.replay share)")
    corpus: str = opt("", "plain-text pretraining corpus for the LM loss; documents separated by blank lines")
    heldout: str = opt("", "distillation: jsonl records whose prompts form the fixed diagnostics batch (e.g. the "
                           "validation split); default: the first distillation prompts")


@dataclass
class SFTRun:
    out: str = opt("runs/sft", "output directory")
    model: ModelConfig = section(ModelConfig)
    tokenizer: str = opt("", "tokenizer path or hub id; default: the model's")
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters via peft (lora.r 0 = train all weights)")
    block_size: int = opt(256, "pretraining (data.corpus without data.train): tokens per corpus block")


@dataclass
class DistillRun:
    out: str = opt("runs/distill", "output directory")
    method: str = opt("dpkd", "distillation method (see `prefkd methods`)")
    student: ModelConfig = section(ModelConfig, "the student, usually an SFT checkpoint (student.path)")
    teacher: ModelConfig = section(ModelConfig, "the frozen teacher (teacher.path)")
    data: DataConfig = section(DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))
    distill: MethodConfig = section(MethodConfig)
    sampling: SamplingConfig = section(SamplingConfig, "sampling of teacher/student responses during training")
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters via peft (lora.r 0 = train all weights)")
    diagnostics: DiagnosticsConfig = section(DiagnosticsConfig, "implicit reward and KL to the teacher on a fixed "
                                                                "held-out batch during training")
    vllm: VLLMConfig = section(VLLMConfig, "vLLM for the sample caches built before training (GPU only)")


@dataclass
class GenerateRun:
    model: str = opt("", "model path or hub id")
    data: str = opt("", "jsonl records whose prompts are sampled")
    out: str = opt("", "jsonl cache file; a rerun with the same settings reuses it, an interrupted one resumes")
    seed: int = opt(0, "sampling seed (each batch is seeded from it and its first index)")
    overwrite: bool = opt(False, "replace a cache file written with other settings")
    sampling: SamplingConfig = section(SamplingConfig)
    vllm: VLLMConfig = section(VLLMConfig, "sample with vLLM on GPUs instead of transformers")


def run_generate(cfg: GenerateRun, existing: str = "auto") -> list[dict]:
    """`existing` (see rundir.py) says what to do with a file already at `out`: the CLI refuses unless told."""
    model_path, out = _need(cfg.model, "model"), _need(cfg.out, "out")
    records = read_records(_need(cfg.data, "data"))
    key = cache_key(model_identity(model_path), records, cfg.sampling, cfg.seed, _backend(cfg.vllm))
    if existing == "refuse" and Path(out).exists():
        raise rundir.RunDirError(f"{out} already holds {_describe_cache(Path(out), key)}; pass --resume to complete "
                                 f"or reuse it, or --overwrite to sample it afresh")
    if existing == "overwrite":
        rundir.remove(Path(out))  # even a readable cache of these settings: --overwrite samples afresh
    sampler = VLLMSampler(model_path, cfg.vllm) if cfg.vllm.enabled else None
    return generate_cached(None if sampler else load_model(model_path), load_tokenizer(model_path), records,
                           cfg.sampling, out, key, cfg.seed, overwrite=cfg.overwrite, sampler=sampler)


def _backend(cfg: VLLMConfig) -> str:
    return "vllm" if cfg.enabled else "hf"


def _describe_cache(path: Path, key: str) -> str:
    try:
        header, rows = read_cache(path)
    except PrefkdError as e:
        return f"a file that is not a readable sample cache ({e})"
    if header.get("cache_key") != key:
        return "samples of other settings (model, prompts, sampling or seed)"
    return f"{len(rows)} of {header['n']} samples of these settings"


@dataclass
class EvaluateRun:
    model: str = opt("", "model path or hub id")
    data: str = opt("", "records with references: prefkd jsonl, Dolly, MiniLLM, csv, parquet or a hub dataset id")
    out: str = opt("", "output directory (scores.json, predictions.json, per_prompt.jsonl, ...); default: MODEL/eval, "
                       "or the directory being re-scored")
    eval: EvalConfig = section(EvalConfig)
    rescore: str = opt("", "an earlier evaluation directory (or its predictions.json): score its predictions again "
                           "without generating; model= is then not needed, data= defaults to its records.jsonl")
    judge: JudgeConfig = section(JudgeConfig, "optional judge: win rates of the predictions against the references")
    device: str = opt("auto", "auto (the GPU if there is one), cpu, cuda, cuda:1, ...")


@dataclass
class WinRateRun:
    a: str = opt("", "responses A (e.g. the teacher): a model path or hub id (sampled here), an evaluation "
                     "directory or its predictions.json, or a sample cache .jsonl")
    b: str = opt("", "responses B (e.g. the student), same forms as a")
    data: str = opt("", "the prompts (e.g. the distillation set); references only needed by the rouge judge")
    out: str = opt("", "json file for the result; default: print only")
    judge: JudgeConfig = section(JudgeConfig, "the judge (judge.path is required)")
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(seeds=[10]),
                             metadata={"help": "how a model given as a or b is sampled"})
    device: str = opt("auto", "auto (the GPU if there is one), cpu, cuda, ...")


def check_run(out: Path, cfg: object, existing: str) -> bool:
    """Before any work: may this run use `out` (rundir.claim, on every process)? Returns whether to clear it."""
    return rundir.claim(out, config.to_dict(cfg), existing)


def begin_run(out: Path, cfg: object, clear: bool) -> None:
    """Once the inputs are read and checked: the main process clears `out` if asked and writes the config, so a
    run that fails on bad input leaves nothing behind."""
    state = process_state()
    state.wait_for_everyone()
    if state.is_main_process:
        if clear:
            rundir.clear(out)
        write_run_config(out, cfg)
    state.wait_for_everyone()


def write_run_config(out: Path, cfg: object) -> None:
    """The resolved config and the code version, next to the run's outputs."""
    data = config.to_dict(cfg)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    data["_git_commit"] = commit or "unknown"
    atomic.write_text(out / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def reference_examples(tokenizer: PreTrainedTokenizerBase, records: list[Instruction], cfg: TrainConfig,
                       source: str) -> list[Example]:
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


def run_sft(cfg: SFTRun, records: list[Instruction] | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
            name: str = "sft", corpus: list[str] | None = None, existing: str = "auto") -> list[dict]:
    """SFT on reference responses; with a corpus instead (`data.corpus`, no `data.train`), LM pretraining on its
    token blocks (every token scored). `existing`: what to do with a run already in `cfg.out` (rundir.py); "auto"
    resumes the same settings."""
    out = Path(cfg.out)
    clear = check_run(out, cfg, existing)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model.path)
    if corpus is None and not records and cfg.data.corpus and not cfg.data.train:
        corpus = _read_corpus(cfg.data.corpus)
    model = model_from_config(cfg.model, tokenizer, cfg.train.seed)
    what = f"{cfg.model.path or f'{cfg.model.arch}-{cfg.model.size}'}, {n_params(model) / 1e6:.2f}M parameters"
    if corpus is not None:
        examples = [Example([], block) for block in token_blocks(tokenizer, corpus, cfg.block_size).tolist()]
        console.print(f"[bold]{name}[/]: {what}, pretraining on {len(examples)} blocks of {cfg.block_size} tokens")
        stage = "pretraining"
    else:
        records = records or read_records(_need(cfg.data.train, "data.train"), require_references=True)
        console.print(f"[bold]{name}[/]: {what}, SFT on {len(records)} records")
        examples = reference_examples(tokenizer, records, cfg.train, cfg.data.train or name)
        stage = "SFT"
    begin_run(out, cfg, clear)
    return train(get_method("sft"), apply_lora(model, cfg.lora), tokenizer, RunData(examples), cfg.train,
                 MethodConfig(), SamplingConfig(), out, name=f"{name} {stage}",
                 save=lambda m, tok, path: save_trained(m, tok, path, cfg.lora), strict_resume=existing == "resume",
                 identity=model_identity(cfg.model.path) if cfg.model.path else None)


def check_same_vocabulary(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
                          method: str) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise PrefkdError(f"method '{method}' is white-box: it scores the same token ids with teacher and student, "
                          f"but their tokenizers differ (student '{student_tok.name_or_path}': {len(student_tok)} "
                          f"tokens; teacher '{teacher_tok.name_or_path}': {len(teacher_tok)} tokens). Use a teacher "
                          f"with the student's tokenizer, or a black-box method such as seqkd or plad.")


def check_method_config(d: MethodConfig, method: Method) -> None:
    """Refuse impossible option values before any work."""
    choices = {"teacher_samples": ("fresh", "cached"), "baseline": ("none", "loo"), "anchor": ANCHORS}
    for key, allowed in choices.items():
        if getattr(d.dpkd, key) not in allowed:
            raise ConfigError(f"distill.dpkd.{key} must be one of {', '.join(allowed)}, not '{getattr(d.dpkd, key)}'")
    if d.dpkd.student_samples < 1:
        raise ConfigError("distill.dpkd.student_samples must be at least 1")
    if d.dpkd.baseline == "loo" and (method.name != "dpkd" or d.dpkd.student_samples < 2):
        raise ConfigError("distill.dpkd.baseline=loo needs --method dpkd and distill.dpkd.student_samples >= 2")


def run_distill(cfg: DistillRun, prompts: list[Instruction] | None = None, replay: list[Instruction] | None = None,
                corpus: list[str] | None = None, name: str | None = None, existing: str = "auto",
                samples_only: bool = False) -> list[dict]:
    """`existing`: what to do with a run already in `cfg.out` (rundir.py); "auto" resumes the same settings.
    `samples_only`: build the method's sample caches and stop (e.g. with vLLM, before a multi-GPU launch)."""
    out = Path(cfg.out)
    method = get_method(cfg.method)
    check_method_config(cfg.distill, method)
    rundir.inside(out, cfg.distill.cache_dir or "cache", "distill.cache_dir")  # fail before any work
    # With samples_only, `out` is not claimed: the caches are keyed files under cache_dir, not a run.
    clear = check_run(out, cfg, existing) if not samples_only else False
    student_path = _need(cfg.student.path, "student.path")
    tokenizer = load_tokenizer(student_path, cfg.student.trust_remote_code)
    student = load_model(student_path, cfg.student.trust_remote_code, cfg.student.dtype)
    teacher = None
    if method.needs_teacher:
        teacher_path = _need(cfg.teacher.path, "teacher.path")
        check_same_vocabulary(tokenizer, load_tokenizer(teacher_path, cfg.teacher.trust_remote_code), cfg.method)
        if not (samples_only and cfg.vllm.enabled):  # vLLM loads its own copy; a 13B teacher is not loaded twice
            teacher = load_model(teacher_path, cfg.teacher.trust_remote_code, cfg.teacher.dtype)
    elif cfg.diagnostics.every and cfg.teacher.path and not samples_only:  # black-box: only for diagnostics
        teacher_tok = load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code)
        if teacher_tok.get_vocab() == tokenizer.get_vocab():
            teacher = load_model(cfg.teacher.path, cfg.teacher.trust_remote_code, cfg.teacher.dtype)
        else:
            console.print("diagnostics off: they score the student's tokens with the teacher, whose tokenizer differs")
    prompts = prompts or read_records(_need(cfg.data.prompts, "data.prompts"),
                                      require_references=method.data == "references")
    if replay is None and cfg.data.replay and cfg.distill.replay > 0:
        replay = read_records(cfg.data.replay, require_references=True)
    if corpus is None and cfg.data.corpus and cfg.distill.lm_weight > 0:
        corpus = _read_corpus(cfg.data.corpus)
    if cfg.distill.replay > 0 and not replay:
        console.print("no replay data (data.replay): running without replay")
    with process_state().main_process_first():  # the main process samples the caches, the others then read them
        examples = method_examples(method, cfg, prompts, tokenizer, student, teacher)
    if samples_only:
        console.print(f"{cfg.method}: sample caches ready for {len(examples)} prompts under "
                      f"{rundir.inside(out, cfg.distill.cache_dir or 'cache', 'distill.cache_dir')}")
        return []
    data = RunData(examples,
                   replay=reference_examples(tokenizer, replay, cfg.train, cfg.data.replay or "replay") if replay
                   else None,
                   corpus=token_blocks(tokenizer, corpus, cfg.distill.lm_block_size) if corpus else None)
    if method.data == "prompts" and cfg.distill.dpkd.teacher_samples == "cached":
        data.teacher_cache = teacher_cache(cfg, examples)
    d = cfg.distill
    console.print(f"[bold]{cfg.method}[/]: {len(data.examples)} prompts, kappa {d.kappa}, replay "
                  f"{d.replay if data.replay else 0}, lm_weight {d.lm_weight if data.corpus is not None else 0}")
    diagnostics = held_out_diagnostics(cfg, teacher, tokenizer, prompts)
    model = apply_lora(student, cfg.lora)
    begin_run(out, cfg, clear)
    identity = [model_identity(student_path), model_identity(cfg.teacher.path) if teacher is not None else None]
    return train(method, model, tokenizer, data, cfg.train, cfg.distill, cfg.sampling, out, teacher,
                 name=name or cfg.method, save=lambda m, tok, path: save_trained(m, tok, path, cfg.lora),
                 diagnostics=diagnostics, diagnostics_every=cfg.diagnostics.every, strict_resume=existing == "resume",
                 identity=identity)


def held_out_diagnostics(cfg: DistillRun, teacher: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                         prompts: list[Instruction]) -> HeldOutDiagnostics | None:
    if not cfg.diagnostics.every or teacher is None:
        return None
    records = read_records(cfg.data.heldout) if cfg.data.heldout else prompts
    ids = [p for p in encode_prompts(tokenizer, [r.prompt for r in records]) if len(p) <= cfg.train.max_prompt_tokens]
    return HeldOutDiagnostics(teacher, ids[: cfg.diagnostics.prompts], cfg.sampling, cfg.distill.dpkd.beta,
                              tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.diagnostics.seed)


def method_examples(method: Method, cfg: DistillRun, prompts: list[Instruction], tokenizer: PreTrainedTokenizerBase,
                    student: PreTrainedModel, teacher: PreTrainedModel | None = None) -> list[Example]:
    """What the method trains on: references, prompts, cached teacher samples or cached pairs."""
    source = cfg.data.prompts or "prompts"
    lengths = [len(p) for p in encode_prompts(tokenizer, [r.prompt for r in prompts])]
    kept = [r for r, n in zip(prompts, lengths, strict=True) if n <= cfg.train.max_prompt_tokens]
    if len(kept) < len(prompts):  # as MiniLLM/DPKD: long prompts are dropped before anything is sampled for them
        console.print(f"{source}: dropped {len(prompts) - len(kept)} of {len(prompts)} prompts over "
                      f"{cfg.train.max_prompt_tokens} tokens")
    if not kept:
        raise DataError(f"no prompt is left under train.max_prompt_tokens={cfg.train.max_prompt_tokens}", source)
    prompts = kept
    if method.data == "references":
        return reference_examples(tokenizer, prompts, cfg.train, source)
    if method.data == "prompts":  # dpkd family: y_t sampled in training (teacher_samples=cached keeps it)
        return prompt_examples(tokenizer, prompts, cfg.train)
    if (method.data == "sequences" and cfg.distill.responses == "auto" and all(r.references for r in prompts)):
        return reference_examples(tokenizer, prompts, cfg.train, source)
    sampling = cfg.sampling
    if method.data == "pairs":
        sampling = replace(cfg.sampling, temperature=cfg.distill.plad.temperature)
    chosen = sample_cache(cfg, "teacher", _need(cfg.teacher.path, "teacher.path"), prompts, sampling, tokenizer,
                          teacher)
    if method.data != "pairs":
        return [Example(p, r) for p, r, _ in chosen]
    # PLaD: y+ from the teacher, y- from the initial student, both sampled once (temperature plad.temperature).
    rejected = sample_cache(cfg, "student", cfg.student.path, prompts, sampling, tokenizer, student)
    emb = student.get_input_embeddings().weight
    out = []
    for rec, (p, pos, _), (_, neg, _) in zip(prompts, chosen, rejected, strict=True):
        ref = encode_prompts(tokenizer, [rec.references[0] if rec.references else rec.instruction])[0]
        out.append(Example(p, pos, neg, embedding_f1(emb, pos, ref), embedding_f1(emb, neg, ref)))
    same = sum(e.response_ids == e.rejected_ids for e in out)
    if same:
        console.print(f"{same} of {len(out)} pairs have identical responses (no ranking gradient from them)")
    return out


def teacher_cache(cfg: DistillRun, examples: list[Example]) -> TeacherCache:
    """The run's cache of teacher samples and log-probs, keyed by teacher, prompts, sampling, seed and precision."""
    key = teacher_cache_key(model_identity(cfg.teacher.path), [e.prompt_ids for e in examples], cfg.sampling,
                            cfg.train.seed, cfg.train.bf16)
    cache_dir = rundir.inside(cfg.out, cfg.distill.cache_dir or "cache", "distill.cache_dir")
    return TeacherCache(cache_dir / f"dpkd-teacher-{key}.jsonl", key, cfg.train.seed)


def sample_cache(cfg: DistillRun, role: str, model_path: str, prompts: list[Instruction], sampling: SamplingConfig,
                 student_tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
                 ) -> list[tuple[list[int], list[int], str]]:
    """(student prompt ids, student-tokenised response + EOS if finished, text) per prompt, from a keyed cache.

    The response text is re-tokenised with the student's tokenizer, so this works when the teacher's differs
    (black-box methods)."""
    key = cache_key(model_identity(model_path), prompts, sampling, cfg.train.seed, _backend(cfg.vllm))
    # A relative cache_dir lies inside the run directory; an absolute one (shared by runs) is the user's choice.
    path = rundir.inside(cfg.out, cfg.distill.cache_dir or "cache", "distill.cache_dir") / f"{role}-{key}.jsonl"
    spec = cfg.teacher if role == "teacher" else cfg.student
    sampler = VLLMSampler(model_path, cfg.vllm, spec.trust_remote_code) if cfg.vllm.enabled else None
    if sampler is None and model is None:  # a loaded teacher is not loaded twice
        model = load_model(model_path, spec.trust_remote_code, spec.dtype)
    if model is not None:
        model.to(process_state().device)  # sample on this process's GPU, where training would put the model anyway
    rows = generate_cached(model, load_tokenizer(model_path, spec.trust_remote_code), prompts, sampling, path, key,
                           cfg.train.seed, name=f"{role} samples", sampler=sampler)
    if sampler is not None:
        sampler.close()
    prompt_ids = encode_prompts(student_tokenizer, [r.prompt for r in prompts])
    eos = student_tokenizer.eos_token_id
    return [(p, encode_prompts(student_tokenizer, [row["response"]])[0] + ([eos] if row["finished"] else []),
             row["response"]) for p, row in zip(prompt_ids, rows, strict=True)]


def run_evaluate(cfg: EvaluateRun, records: list[Instruction] | None = None, name: str = "eval") -> dict:
    """Sample (or re-read) predictions, score them, judge them if asked; write the evaluation directory.

    Samples go through keyed caches under OUT/samples (one per seed), so an interrupted evaluation resumes and a
    rerun with the same model, data and settings regenerates nothing."""
    t0 = time.time()
    device = resolve_device(cfg.device)
    judge = make_judge(cfg.judge, device)
    if judge is not None:
        check_reference_free(judge)  # before spending time on generation
    if cfg.rescore:
        src = Path(cfg.rescore)
        src_dir = src if src.is_dir() else src.parent
        out = Path(cfg.out) if cfg.out else src_dir
        records = records or (load_instructions(cfg.data) if cfg.data else read_records_of(src_dir))
        preds = read_responses(src, records)
        old = src_dir / "settings.json"
        generation = json.loads(old.read_text(encoding="utf-8")).get("generation") if old.is_file() else None
        generation = {**(generation or {}), "rescored_from": str(src)}
        console.print(f"[bold]{name}[/]: re-scoring {src} ({len(records)} records, seeds {list(preds)})")
    else:
        model_path = _need(cfg.model, "model")
        out = Path(cfg.out) if cfg.out else Path(model_path) / "eval"
        records = records or load_instructions(_need(cfg.data, "data"))
        generation = {"model": model_path, "model_identity": model_identity(model_path), "seeds": cfg.eval.seeds,
                      "sampling": asdict(cfg.eval.sampling), "device": device}
        s = cfg.eval.sampling
        console.print(f"[bold]{name}[/]: {model_path} on {len(records)} records ({cfg.data or 'given records'}); "
                      f"seeds {cfg.eval.seeds}, temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, "
                      f"max_new_tokens {s.max_new_tokens}, no_repeat_ngram_size {s.no_repeat_ngram_size}, "
                      f"batch_size {s.batch_size}, device {device}")
        preds, finished = _sample_predictions(model_path, records, cfg.eval, out / "samples", device, name)
        generation["ended_with_eos"] = finished
        generation["generation_seconds"] = round(time.time() - t0, 1)
    metrics = prompt_scores(records, preds)
    judged: dict = {}
    if judge is not None:
        judged = judge_against_references(judge, records, preds, cfg.judge.tie_tolerance)
        metrics.update({k: judged[k] for k in ("win_rate", "judge_score")})
    scores = breakdown(records, metrics)
    bad = unscorable(records)
    if bad:
        console.print(f"[yellow]{bad} of {len(records)} records have no reference with an ASCII letter or digit: the "
                      "protocol's Rouge-L tokenizer keeps none of their words, so they score 0 whatever the answer")
    settings = {"data": cfg.data or "(records given by the caller)", "n_records": len(records),
                "seeds": list(preds), "generation": generation, "protocol": PROTOCOL,
                "unscorable_references": bad,
                "judge": {"name": judge.name, **asdict(cfg.judge)} if judge is not None else None,
                "win_rate_rule": "100 x mean over prompts of 1 (judge prefers the prediction to the best-scoring "
                                 "reference), 0.5 (tie: identical text or |difference| <= tie_tolerance), 0"
                                 if judge is not None else None,
                "versions": _versions(), "wall_seconds": round(time.time() - t0, 1)}
    write_run_config(out, cfg)
    write_evaluation(out, records, preds, scores, metrics, settings,
                     {"judge_reference": judged["judge_reference"]} if judged else None)
    return scores


def _sample_predictions(model_path: str, records: list[Instruction], cfg: EvalConfig, cache_dir: Path, device: str,
                        name: str) -> tuple[dict[int, list[str]], float]:
    """Responses per seed through keyed, resumable caches; and the share of them that ended with EOS."""
    model = load_model(model_path).to(device)
    tokenizer = load_tokenizer(model_path)
    identity = model_identity(model_path)
    preds, ended = {}, []
    for seed in cfg.seeds:
        key = cache_key(identity, records, cfg.sampling, seed)
        rows = generate_cached(model, tokenizer, records, cfg.sampling, cache_dir / f"seed-{seed}.jsonl", key, seed,
                               name=f"{name} seed {seed}", overwrite=True)
        preds[seed] = [row["response"] for row in rows]
        ended += [row["finished"] for row in rows]
    return preds, round(sum(ended) / max(len(ended), 1), 4)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("prefkd", "torch", "transformers", "rouge-score"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def run_winrate(cfg: WinRateRun) -> dict:
    """Win rate of A's responses over B's on the same prompts under one judge (PLaD's T-S WR when A is the teacher
    and B the student on the distillation set)."""
    device = resolve_device(cfg.device)
    judge = make_judge(cfg.judge, device)
    if judge is None:
        raise PrefkdError("set judge.path=... (a reward model, a causal LM, or 'rouge')")
    records = load_instructions(_need(cfg.data, "data"), require_references=judge.needs_references)
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Samples of a model side are cached next to `out` (a rerun reuses them), else thrown away afterwards.
        root = Path(cfg.out).with_name(Path(cfg.out).stem + "-samples") if cfg.out else Path(tmp)
        for side in ("a", "b"):
            source = _need(getattr(cfg, side), side)
            if _is_model(source):
                sides[side] = _sample_predictions(source, records, cfg.eval, root / side, device, f"{side}")[0]
            else:
                sides[side] = read_responses(source, records)
    result = head_to_head(judge, records, sides["a"], sides["b"], cfg.judge.tie_tolerance)
    summary = {"a": cfg.a, "b": cfg.b, "data": cfg.data, "n": len(records), "judge": judge.name,
               "rule": "100 x mean over prompts of 1 (judge prefers A), 0.5 (tie: identical text or "
                       f"|difference| <= {cfg.judge.tie_tolerance}), 0 (prefers B)",
               "seeds_a": list(sides["a"]), "seeds_b": list(sides["b"]),
               "win_rate": summarize(result["win_rate"]),
               "ties_percent": float(100 * (result["win_rate"] == 50).mean()),
               "mean_score_a": float(result["score_a"].mean()), "mean_score_b": float(result["score_b"].mean()),
               "per_prompt": [{"id": r.id, "win_rate": float(w), "score_a": float(a), "score_b": float(b)}
                              for r, w, a, b in zip(records, result["win_rate"].mean(0), result["score_a"].mean(0),
                                                    result["score_b"].mean(0), strict=True)]}
    if cfg.out:
        atomic.write_json(cfg.out, summary)
    return summary


def _is_model(source: str) -> bool:
    """A model directory, or a hub id (not an existing path); anything else is a file of responses."""
    p = Path(source)
    if p.is_dir():
        return (p / "config.json").is_file()
    return not p.exists() and not p.suffix and not source.startswith(("/", ".", "~"))


def _read_corpus(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError("corpus file not found", path)
    return [d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def _need(value: str, key: str) -> str:
    if not value:
        raise PrefkdError(f"set {key}=... (on the command line or in --config)")
    return value
