"""The one training loop (on Accelerate) for every method.

Per step: the method's share of the batch goes to the method's step function; the `replay` share is labelled
data with cross-entropy; `lm_weight` adds the LM loss on the pretraining corpus. Then clip, step, log, and
checkpoint every `save_every` steps so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from prefkd import atomic, stages
from prefkd.config import opt
from prefkd.console import console, progress
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.logprobs import response_token_logps, token_mean_nll
from prefkd.methods import Method, MethodConfig, StepInputs
from prefkd.models import n_params, save_pretrained

# save_state warns on every checkpoint that tied embeddings are stored once; that is expected and harmless.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


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
    bf16: bool = opt(False, "bf16 autocast (CPU or GPU)")
    log_every: int = opt(10, "steps per log row; each row holds the means of its steps' metrics")
    save_every: int = opt(100, "steps between resumable checkpoints (0 = never)")
    max_prompt_tokens: int = opt(256, "drop examples whose prompt is longer (MiniLLM/DPKD filter)")
    max_length: int = opt(512, "drop examples whose prompt + response is longer")


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


def _split(batch_size: int, replay: float, has_replay: bool) -> tuple[int, int]:
    n_replay = round(batch_size * replay) if has_replay else 0
    return batch_size - n_replay, n_replay


def train(method: Method, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: RunData,
          cfg: TrainConfig, method_cfg: MethodConfig, sampling: SamplingConfig, out_dir: str | Path,
          teacher: PreTrainedModel | None = None, name: str = "train",
          save: Callable[[PreTrainedModel, PreTrainedTokenizerBase, Path], None] = save_pretrained,
          diagnostics: Callable[[PreTrainedModel], dict[str, float]] | None = None,
          diagnostics_every: int = 0) -> list[dict]:
    """Train `student` in place with `method`; write logs, checkpoints and the final model under `out_dir`.

    `diagnostics(student)` (e.g. `prefkd.diagnostics.HeldOutDiagnostics`) runs before the first step, every
    `diagnostics_every` steps and after the last; its rows go to `diagnostics.jsonl`. Every row of both logs also
    goes to TensorBoard under `out_dir/tensorboard`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Accelerate keeps one global state per process; the demo trains several models with different precisions
    # in one process, so drop the previous run's precision (the process group in PartialState is kept).
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if cfg.bf16 else "no")
    torch.manual_seed(cfg.seed)
    trainable = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.steps),
                              num_training_steps=cfg.steps)
    model, optimizer, scheduler = acc.prepare(student, optimizer, scheduler)
    if teacher is not None:
        teacher = teacher.to(acc.device).eval().requires_grad_(False)
    uses_replay = method.name != "sft" and data.replay is not None and method_cfg.replay > 0
    n_method, n_replay = _split(cfg.batch_size, method_cfg.replay, uses_replay)
    streams = {"method": BatchStream([len(e.prompt_ids) + len(e.response_ids) for e in data.examples], n_method,
                                     cfg.seed)}
    if n_replay:
        streams["replay"] = BatchStream([len(e.prompt_ids) + len(e.response_ids) for e in data.replay], n_replay,
                                        cfg.seed + 1)
    use_lm = method.name != "sft" and method_cfg.lm_weight > 0 and data.corpus is not None
    if use_lm:
        streams["lm"] = BatchStream([1] * len(data.corpus), n_method, cfg.seed + 2, group_by_length=False)

    ckpt, log_path = out / "checkpoint", out / "train_log.jsonl"
    run_key = stages.fingerprint(method.name, asdict(cfg), asdict(method_cfg), asdict(sampling),
                                 len(data.examples), len(data.replay or []), n_params(student))
    start = 0
    if (ckpt / "trainer_state.json").is_file():
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("run_key") == run_key:
            acc.load_state(str(ckpt))
            start = state["step"]
            console.print(f"{name}: resuming from the checkpoint at step {start}")
        else:
            console.print(f"{name}: ignoring {ckpt}, written by a run with other settings")
            shutil.rmtree(ckpt)
    logs = [r for r in _read_log(log_path) if r["step"] <= start]
    atomic.write_jsonl(log_path, logs)
    diag_path = out / "diagnostics.jsonl"
    atomic.write_jsonl(diag_path, [r for r in _read_log(diag_path) if r["step"] <= start])
    board = _board(out / "tensorboard")
    per_epoch = max(1, len(data.examples) // max(1, n_method))

    def diagnose(done: int) -> None:
        if diagnostics is None:
            return
        row = {"step": done, "epoch": round(done / per_epoch, 4), **diagnostics(acc.unwrap_model(model))}
        _append(diag_path, row, board, "diagnostics")

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.train()
    t0 = time.time()
    if start == 0:
        diagnose(0)
    with progress() as bar:
        task = bar.add_task(name, total=cfg.steps, completed=start, info="")
        window: dict[str, float] = {}  # metric sums since the last log row: each row is a mean over its steps
        n_window = 0
        for step in range(start, cfg.steps):
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                k = step * cfg.grad_accum + micro
                with acc.autocast():
                    loss, metrics = _micro_step(method, model, acc, teacher, data, streams, k, method_cfg, sampling,
                                                pad, eos, n_replay, use_lm)
                acc.backward(loss / cfg.grad_accum)
                for key, v in metrics.items():
                    sums[key] = sums.get(key, 0.0) + v / cfg.grad_accum
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm at step {step + 1}; last metrics {sums}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            for key, v in {**sums, "grad_norm": float(grad_norm)}.items():
                window[key] = window.get(key, 0.0) + v
            n_window += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {"step": done, "lr": scheduler.get_last_lr()[0], "elapsed": round(time.time() - t0, 2),
                       **{k: round(v / n_window, 6) for k, v in window.items()}}
                window, n_window = {}, 0
                logs.append(row)
                _append(log_path, row, board, "train")
            if diagnostics_every and (done % diagnostics_every == 0 or done == cfg.steps):
                diagnose(done)
            bar.update(task, advance=1, info=f"loss {sums['loss']:.3f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                _checkpoint(acc, ckpt, done, run_key)
    save(acc.unwrap_model(model), tokenizer, out / "model")
    shutil.rmtree(ckpt, ignore_errors=True)
    if board is not None:
        board.close()
    return logs


def _micro_step(method: Method, model, acc: Accelerator, teacher, data: RunData, streams: dict[str, BatchStream],
                k: int, mcfg: MethodConfig, sampling: SamplingConfig, pad: int, eos: int, n_replay: int,
                use_lm: bool) -> tuple[torch.Tensor, dict[str, float]]:
    examples = [data.examples[i] for i in streams["method"].batch(k)]
    inp = StepInputs(model, acc.unwrap_model(model), teacher, examples, sampling, mcfg, pad, eos, acc.device)
    res = method.step(inp)
    metrics = dict(res.metrics)
    loss = res.loss
    if res.anchor_nll is not None and mcfg.kappa < 1:  # sft and seqkd are cross-entropy already: no anchor
        loss = (1 - mcfg.kappa) * res.anchor_nll + mcfg.kappa * res.loss
        metrics["anchor_nll"] = res.anchor_nll.item()
    if n_replay:
        batch = collate([data.replay[i] for i in streams["replay"].batch(k)], pad)
        token_logps, mask = response_token_logps(model, {key: v.to(acc.device) for key, v in batch.items()})
        replay_nll = token_mean_nll(token_logps, mask)
        share = n_replay / (n_replay + len(examples))
        loss = (1 - share) * loss + share * replay_nll
        metrics["replay_nll"] = replay_nll.item()
    if use_lm:
        blocks = data.corpus[streams["lm"].batch(k)].to(acc.device)
        ones = torch.ones_like(blocks)  # every token of a corpus block is scored
        lm_loss = token_mean_nll(*response_token_logps(model, {"input_ids": blocks, "attention_mask": ones,
                                                               "response_mask": ones}))
        loss = loss + mcfg.lm_weight * lm_loss
        metrics["lm_loss"] = lm_loss.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def _checkpoint(acc: Accelerator, ckpt: Path, step: int, run_key: str) -> None:
    with atomic.directory(ckpt) as tmp:
        acc.save_state(str(tmp), safe_serialization=True)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "run_key": run_key}))


def _board(path: Path):
    """A TensorBoard writer, or None where the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _append(path: Path, row: dict, board, group: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if board is not None:
        for key, v in row.items():
            if key != "step" and isinstance(v, (int, float)):
                board.add_scalar(f"{group}/{key}", v, row["step"])
        board.flush()


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
