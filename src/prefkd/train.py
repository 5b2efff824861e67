"""The one training loop (on Accelerate) for every method.

Per step: the method's share of the batch goes to the method's step function; the `replay` share is labelled
data with cross-entropy; `lm_weight` adds the LM loss on the pretraining corpus. Then clip, step, log, and
checkpoint every `save_every` steps so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from prefkd import atomic, checkpoints, distributed, rundir, stages, trackers
from prefkd.cache import TeacherCache
from prefkd.config import opt
from prefkd.console import console, progress
from prefkd.data.collate import Example, collate
from prefkd.distributed import Term
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.logprobs import response_token_logps, token_mean_nll
from prefkd.methods import Method, MethodConfig, StepInputs
from prefkd.methods.cross_tokenizer import TeacherTokens
from prefkd.models import n_params, save_pretrained
from prefkd.rundir import RunDirError
from prefkd.teacher_client import TeacherServerError
from prefkd.teacher_logits import TeacherLogits

# save_state warns on every checkpoint that tied embeddings are stored once; that is expected and harmless.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

# train.bf16=auto on a CPU with native bf16: autocast only when every model is at least this wide (hidden size).
# Measured (docs/benchmarks.md, benchmark 6; bench/bf16_kernels.py): on a 2-core AMX Xeon an SFT step runs 0.49x
# (2x128) and 0.70x (3x192) as fast under autocast as in fp32, and 1.22x at 6x384; a DPKD step 0.75x at the demo's
# sizes and 1.22x at 6x384. Below it, fixed costs outweigh the faster matmuls: oneDNN builds a kernel for every new
# matrix shape (prefkd's batches have a new token count every step), bf16 attention's backward is 2x slower, and
# decoding under autocast is slower.
AUTO_BF16_MIN_WIDTH = 384


@dataclass
class TrainConfig:
    steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(16, "examples per step (method share + replay share)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak learning rate (AdamW)")
    scheduler: str = opt("linear", "learning-rate schedule: linear, cosine or constant (after warm-up)")
    warmup_ratio: float = opt(0.05, "share of steps with linear warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    seed: int = opt(0, "seed of initialisation, data order and sampling")
    bf16: bool | Literal["auto"] = opt(False, "bf16 autocast (CPU or GPU): true, false or auto (bf16 on a GPU that "
                                              "has it, and on a CPU with AMX or AVX-512 bf16 when every model is at "
                                              f"least {AUTO_BF16_MIN_WIDTH} wide: where it measured faster; the "
                                              "choice is logged and kept in the run's config.yaml)")
    log_every: int = opt(10, "steps per log row; each row holds the means of its steps' metrics")
    save_every: int = opt(100, "steps between resumable checkpoints (0 = never)")
    max_prompt_tokens: int = opt(256, "drop examples whose prompt is longer (MiniLLM/DPKD filter)")
    max_length: int = opt(512, "drop examples whose prompt + response is longer")
    disable_dropout: bool = opt(True, "train the student with dropout off (TRL's DPO default: log-probs of one "
                                      "sequence must not depend on the dice); the teacher always scores in eval mode")
    # Where the logs go, not what is trained: kept out of run and stage keys (config.opt's keyed).
    report_to: list[str] = opt(["tensorboard"], "experiment trackers, a list or comma string: tensorboard, wandb, "
                                                "trackio, mlflow or none (extras: pip install 'prefkd[tracking]')",
                               keyed=False)
    run_group: str = opt("", "tracker group (wandb, trackio) and MLflow experiment; compare sets it to its tag",
                         keyed=False)

    def __post_init__(self) -> None:
        self.report_to = trackers.parse(self.report_to) or ["none"]  # refuses unknown names when the config is built
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":  # the Python API; config files are checked
            raise ConfigError(f"train.bf16 must be true, false or auto, not {self.bf16!r}")  # by config.from_dict


@dataclass(frozen=True)
class Hardware:
    """What `train.bf16=auto` looks at (tests pass their own)."""

    cuda: bool
    cuda_bf16: bool = False
    amx: bool = False  # AMX tiles: bf16 matmuls on oneDNN's AMX kernels
    avx512_bf16: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()  # what train() trains on: Accelerator(cpu=not cuda)
        return cls(cuda, cuda and torch.cuda.is_bf16_supported(), _cpu_has("_is_amx_tile_supported"),
                   _cpu_has("_is_avx512_bf16_supported"))


def _cpu_has(probe: str) -> bool:
    fn = getattr(torch.cpu, probe, None)  # torch.cpu's private feature checks; a torch without them: assume not
    return bool(fn and fn())


def model_width(model: torch.nn.Module) -> int | None:
    """A model's hidden size from its config (transformers maps GPT-2's n_embd to hidden_size), or None."""
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "hidden_size", None) if cfg is not None else None
    return width if isinstance(width, int) else None


def resolve_bf16(setting: bool | str, models: Sequence[object], hardware: Hardware | None = None
                 ) -> tuple[bool, str]:
    """(bf16 autocast or not, why) for `train.bf16`: true and false as they are; auto by a fixed rule, the same on
    every process and every rerun, rather than a timing probe that a busy machine would sway. `models`: those that
    run under autocast (the student, a loaded teacher; anything that is not a torch module is left out)."""
    if isinstance(setting, bool):
        return setting, "train.bf16=" + str(setting).lower()
    hw = hardware or Hardware.detect()
    if hw.cuda:
        return (True, "bf16 autocast: a CUDA GPU with bf16") if hw.cuda_bf16 else \
            (False, "fp32: this CUDA GPU has no bf16")
    native = "AMX" if hw.amx else "AVX-512 bf16" if hw.avx512_bf16 else ""
    if not native:
        return False, "fp32: this CPU has neither AMX nor AVX-512 bf16, so bf16 matmuls would be emulated"
    widths = [model_width(m) for m in models if isinstance(m, torch.nn.Module)]
    if not widths or None in widths:
        return False, "fp32: a model's width (config.hidden_size) is unknown"
    wide = "/".join(str(w) for w in widths)
    if min(widths) < AUTO_BF16_MIN_WIDTH:
        return False, (f"fp32: CPU with {native}, but models {wide} wide (under {AUTO_BF16_MIN_WIDTH}), where bf16 "
                       "autocast measured slower than fp32 (docs/benchmarks.md, benchmark 6)")
    return True, f"bf16 autocast: CPU with {native}, models {wide} wide (at least {AUTO_BF16_MIN_WIDTH})"


class BatchStream:
    """Batch k of a deterministic, epoch-reshuffled order: resuming at step k needs no saved data position."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths, self.bs, self.seed, self.group = lengths, min(batch_size, len(lengths)), seed, group_by_length
        self.per_epoch = max(1, len(lengths) // self.bs)
        self._epoch, self._batches = -1, []

    def _order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()[: self.per_epoch * self.bs]
        if self.group:  # similar lengths together within windows of 32 batches: less padding
            win = 32 * self.bs
            perm = [i for s in range(0, len(perm), win) for i in sorted(perm[s: s + win], key=self.lengths.__getitem__)]
        batches = [perm[i: i + self.bs] for i in range(0, len(perm), self.bs)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def batch(self, k: int) -> list[int]:
        epoch = k // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._order(epoch)
        return self._batches[k % self.per_epoch]


@dataclass
class RunData:
    examples: list[Example]  # the method's data: references (sft) or prompts (distillation)
    replay: list[Example] | None = None  # labelled examples replayed with cross-entropy
    corpus: torch.Tensor | None = None  # [N, block] pretraining token blocks for the LM loss
    teacher_cache: TeacherCache | None = None  # teacher samples + log-probs (dpkd family, teacher_samples=cached)
    teacher_tokens: TeacherTokens | None = None  # the teacher's own tokens, when its tokenizer differs
    teacher_logits: TeacherLogits | None = None  # offline top-k teacher logits instead of the teacher


def _split(batch_size: int, replay: float, has_replay: bool) -> tuple[int, int]:
    n_replay = round(batch_size * replay) if has_replay else 0
    return batch_size - n_replay, n_replay


def train(method: Method, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: RunData,
          cfg: TrainConfig, method_cfg: MethodConfig, sampling: SamplingConfig, out_dir: str | Path,
          teacher: PreTrainedModel | None = None, name: str = "train",
          save: Callable[[PreTrainedModel, PreTrainedTokenizerBase, Path], None] = save_pretrained,
          diagnostics: Callable[[PreTrainedModel], dict[str, float]] | None = None,
          diagnostics_every: int = 0, strict_resume: bool = False, identity: object = None,
          run_config: dict | None = None, stop_ids: tuple[int, ...] | None = None) -> list[dict]:
    """Train `student` in place with `method`; write logs, checkpoints and the final model under `out_dir`.

    `diagnostics(student)` (e.g. `prefkd.diagnostics.HeldOutDiagnostics`) runs before the first step, every
    `diagnostics_every` steps and after the last; its rows go to `diagnostics.jsonl`. Every row of both logs also
    goes to each tracker of `cfg.report_to` (TensorBoard under `out_dir/tensorboard` by default; trackers.py), with
    `run_config` (the recipe's resolved config) as the run's config.

    Resumes from a checkpoint of the same run key (settings, data, `identity` of the models); a checkpoint of
    another key is discarded, or an error with `strict_resume` (the CLI's --resume). Under `accelerate launch`
    every process runs this; see distributed.py for how the global batch is split. `cfg.bf16` "auto" is resolved
    here if the caller has not (`prefkd sft` and `prefkd distill` do, to key their caches and record the choice)."""
    out = Path(out_dir)
    if cfg.bf16 == "auto":  # a caller of the Python API: the recipes resolve it before they key any sample cache
        choice, why = resolve_bf16(cfg.bf16, [student, teacher])
        console.print(f"{name}: train.bf16=auto: {why}")
        cfg = replace(cfg, bf16=choice)
    # Accelerate keeps one global state per process; the demo trains several models with different precisions
    # in one process, so drop the previous run's precision (the process group in PartialState is kept).
    AcceleratorState._reset_state()
    # split_batches: the global batch is split across processes, not multiplied, so the schedule steps once a step.
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if cfg.bf16 else "no",
                      dataloader_config=DataLoaderConfiguration(split_batches=True),
                      log_with=trackers.build(cfg.report_to, out, cfg.run_group, _run_name(out)) or None)
    distributed.setup(acc)  # refuses a launch Accelerate does not see as one; FSDP on CPU (see there)
    distributed.check_sampling_supported(acc, method.name, method.samples_in_training)
    main = acc.is_main_process
    torch.manual_seed(distributed.process_seed(cfg.seed, acc))  # each process samples its own stream
    if cfg.disable_dropout:
        disable_dropout(student)
    trainable = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = adamw(trainable, cfg.lr, cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.steps),
                              num_training_steps=cfg.steps)
    run_key = stages.fingerprint(method.name, stages.settings(cfg), asdict(method_cfg), asdict(sampling),
                                 _data_key(data), n_params(student), identity)
    ckpt_root, log_path, state_path = out / "checkpoint", out / "train_log.jsonl", out / "train_state.json"
    if _finished(state_path, run_key) and (out / "model").is_dir():
        if main:
            console.print(f"{name}: {out} already holds this finished run; nothing to do")
        return _read_log(log_path)
    distributed.configure(acc, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm)
    model, optimizer, scheduler = acc.prepare(student, optimizer, scheduler)
    if isinstance(teacher, torch.nn.Module):  # not a teacher server (teacher_client.py)
        teacher = distributed.place_teacher(acc, teacher)
    uses_replay = method.auxiliary_losses and data.replay is not None and method_cfg.replay > 0
    n_method, n_replay = _split(cfg.batch_size, method_cfg.replay, uses_replay)
    streams = {"method": BatchStream([len(e.prompt_ids) + len(e.response_ids) for e in data.examples], n_method,
                                     cfg.seed)}
    if n_replay:
        streams["replay"] = BatchStream([len(e.prompt_ids) + len(e.response_ids) for e in data.replay], n_replay,
                                        cfg.seed + 1)
    use_lm = method.auxiliary_losses and method_cfg.lm_weight > 0 and data.corpus is not None
    if use_lm:
        streams["lm"] = BatchStream([1] * len(data.corpus), n_method, cfg.seed + 2, group_by_length=False)
    for what, s in streams.items():
        distributed.check_batch(s.bs, acc, f"the {what} share of the batch")

    start, window, n_window = _restore(acc, ckpt_root, state_path, run_key, strict_resume, name)
    logs = [r for r in _read_log(log_path) if r["step"] <= start]
    diag_path = out / "diagnostics.jsonl"
    if main:  # logs, diagnostics and trackers are written by the main process only
        atomic.write_jsonl(log_path, logs)
        atomic.write_jsonl(diag_path, [r for r in _read_log(diag_path) if r["step"] <= start])
    # Started here, after the finished-run check, so a rerun that has nothing to do opens no tracker run.
    acc.init_trackers(trackers.PROJECT, config=trackers.flat_config(run_config or {}))
    acc.wait_for_everyone()
    per_epoch = max(1, len(data.examples) // max(1, n_method))

    def diagnose(done: int) -> None:
        if diagnostics is None:
            return
        # Every process computes them (a sharded model needs all of them for a forward); the main one writes.
        row = {"step": done, "epoch": round(done / per_epoch, 4), **diagnostics(acc.unwrap_model(model))}
        if main:
            _append(diag_path, row, acc, "diagnostics")

    # Samples drawn in training end at any end token (a chat model's end-of-turn and EOS: `Renderer.stop_ids_for`).
    pad, eos = tokenizer.pad_token_id, stop_ids or tokenizer.eos_token_id
    model.train()
    t0 = time.time()
    if start == 0:
        diagnose(0)
    with progress(disable=not main) as bar:
        task = bar.add_task(name, total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                k = step * cfg.grad_accum + micro
                with acc.autocast():
                    try:
                        loss, metrics = _micro_step(method, model, acc, teacher, data, streams, k, method_cfg,
                                                    sampling, pad, eos, (n_method, n_replay), use_lm, cfg.seed,
                                                    k / (cfg.steps * cfg.grad_accum), tokenizer)
                    except TeacherServerError as e:  # the server stays down: say what --resume will continue from
                        raise TeacherServerError(f"{e}; {_kept(ckpt_root)}, and --resume continues from it once "
                                                 "the server is back") from None
                # Every process holds the same global values, so all of them stop together.
                distributed.check_finite(step + 1, metrics, lambda: _kept(ckpt_root))
                acc.backward(loss / cfg.grad_accum)
                for key, v in metrics.items():
                    sums[key] = sums.get(key, 0.0) + v / cfg.grad_accum
            grad_norm = distributed.clip_grad_norm(acc, model, cfg.max_grad_norm)
            if grad_norm is not None:
                distributed.check_finite(step + 1, {"gradient norm": grad_norm}, lambda: _kept(ckpt_root))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            for key, v in {**sums, **({"grad_norm": grad_norm} if grad_norm is not None else {})}.items():
                window[key] = window.get(key, 0.0) + v
            n_window += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {"step": done, "lr": scheduler.get_last_lr()[0], "elapsed": round(time.time() - t0, 2),
                       **{k: round(v / n_window, 6) for k, v in window.items()}}
                window, n_window = {}, 0
                logs.append(row)
                if main:
                    _append(log_path, row, acc, "train")
            if diagnostics_every and (done % diagnostics_every == 0 or done == cfg.steps):
                diagnose(done)
            bar.update(task, advance=1, info=f"loss {sums['loss']:.3f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                checkpoints.save(acc, ckpt_root, done, {"run_key": run_key, "window": window, "n_window": n_window})
    final = distributed.gathered_copy(acc, model) if distributed.sharded(acc) else acc.unwrap_model(model)
    if main:
        save(final, tokenizer, out / "model")
        atomic.write_json(state_path, {"finished": True, "step": cfg.steps, "run_key": run_key,
                                       "processes": acc.num_processes})
        rundir.remove(ckpt_root)
    # Not acc.end_training(): it also destroys the process group, which later runs of this process still use.
    for tracker in acc.trackers:
        tracker.finish()  # main process only (Accelerate's trackers check)
    acc.wait_for_everyone()
    return logs


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused on CPU and CUDA: one kernel per parameter instead of a dozen elementwise ops each, what
    transformers' Trainer (and so TRL) uses by default since torch 2.8. The update is AdamW's up to float rounding."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of `model`: nn.Dropout modules (as TRL's `disable_dropout_in_model`) and the float
    `attention_dropout` that Llama-style attention passes to its kernel in training mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _restore(acc: Accelerator, root: Path, state_path: Path, run_key: str, strict: bool, name: str
             ) -> tuple[int, dict[str, float], int]:
    """(first step, open log window sums, steps in it) from the last checkpoint of this run key, else (0, {}, 0)."""
    path = checkpoints.latest(root)
    state = checkpoints.read_state(path) if path else _read_json(state_path)
    if state and state.get("run_key") != run_key:
        what = path or state_path
        if strict:
            raise RunDirError(f"{what} was written by a run of other data, models or settings than this one; "
                              f"--resume continues the same run only: pass --overwrite to start afresh")
        if acc.is_main_process:
            console.print(f"{name}: ignoring {what}, written by a run with other settings")
            rundir.remove(root)
        path = None
    if acc.is_main_process:
        rundir.remove(state_path)  # the run is in progress again until it saves its model
    acc.wait_for_everyone()
    if path is None:
        return 0, {}, 0
    checkpoints.load(acc, path, state)
    if acc.is_main_process:
        console.print(f"{name}: resuming from the checkpoint at step {state['step']}")
    return state["step"], state.get("window", {}), state.get("n_window", 0)


def _micro_step(method: Method, model, acc: Accelerator, teacher, data: RunData, streams: dict[str, BatchStream],
                k: int, mcfg: MethodConfig, sampling: SamplingConfig, pad: int, eos: int | tuple[int, ...],
                sizes: tuple[int, int], use_lm: bool, seed: int, progress: float = 0.0,
                tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """This process's loss for micro-batch k and the global-batch metrics (distributed.combine)."""
    examples = [data.examples[i] for i in distributed.shard(streams["method"].batch(k), acc)]
    inp = StepInputs(model, acc.unwrap_model(model), teacher, examples, sampling, mcfg, pad, eos, acc.device,
                     distributed.shared_generator(seed, k), data.teacher_cache, progress, data.teacher_tokens,
                     tokenizer, data.teacher_logits)
    res = method.step(inp)
    n_method, n_replay = sizes
    share = n_replay / (n_replay + n_method)  # of the global batch, the same on every process
    n_loss = res.loss_count if res.loss_count is not None else len(examples)
    if res.anchor_nll is not None and mcfg.kappa < 1:  # sft and seqkd are cross-entropy already: no anchor
        n_anchor = res.anchor_count if res.anchor_count is not None else len(examples)
        terms = [Term("", res.loss, n_loss, (1 - share) * mcfg.kappa),
                 Term(res.anchor_name, res.anchor_nll, n_anchor, (1 - share) * (1 - mcfg.kappa))]
    else:
        terms = [Term("", res.loss, n_loss, 1 - share)]
    if n_replay:
        batch = collate([data.replay[i] for i in distributed.shard(streams["replay"].batch(k), acc)], pad)
        token_logps, mask = response_token_logps(model, {key: v.to(acc.device) for key, v in batch.items()})
        terms.append(Term("replay_nll", token_mean_nll(token_logps, mask), mask.sum().item(), share))
    if use_lm:
        blocks = data.corpus[distributed.shard(streams["lm"].batch(k), acc)].to(acc.device)
        ones = torch.ones_like(blocks)  # every token of a corpus block is scored
        token_logps, mask = response_token_logps(model, {"input_ids": blocks, "attention_mask": ones,
                                                         "response_mask": ones})
        terms.append(Term("lm_loss", token_mean_nll(token_logps, mask), mask.sum().item(), mcfg.lm_weight))
    return distributed.combine(acc, terms, res.metrics, n_loss)


def _kept(root: Path) -> str:
    path = checkpoints.latest(root)
    if path is None:
        return "no checkpoint was written yet (train.save_every)"
    return f"the last good checkpoint (step {int(path.name.split('-')[1])}) is kept in {root}"


def _data_key(data: RunData) -> str:
    """What the run trains on, so a checkpoint is never resumed on other data (or other cached samples)."""
    h = hashlib.sha256()
    for group in (data.examples, data.replay or []):
        for e in group:
            h.update(repr((e.prompt_ids, e.response_ids, e.rejected_ids, e.chosen_score, e.rejected_score)).encode())
        h.update(b"|")
    if data.corpus is not None:
        h.update(data.corpus.numpy().tobytes())
    return h.hexdigest()[:16]


def _finished(path: Path, run_key: str) -> bool:
    state = _read_json(path)
    return bool(state and state.get("finished") and state.get("run_key") == run_key)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_name(out: Path) -> str:
    """The tracker run's name: the run directory with its parent (compare's `dpkd/seed0`, `runs/sft`)."""
    out = out.resolve()
    return f"{out.parent.name}/{out.name}" if out.parent.name else out.name


def _append(path: Path, row: dict, acc: Accelerator, group: str) -> None:
    """One row to the jsonl log and, as `group/key` at the row's step, to every tracker."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    acc.log({f"{group}/{key}": v for key, v in row.items() if key != "step" and isinstance(v, (int, float))},
            step=row["step"])


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is redone
    return rows
