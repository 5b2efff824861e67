"""Multi-process training (`accelerate launch`): which examples a process takes, how its loss terms are weighted so
the gradient is the single-process one, and where the frozen teacher lives.

The global batch of step k is a pure function of (seed, k) (`train.BatchStream`); every process computes it and
takes its strided slice (`shard`). Each loss term is a mean over its own count on that process (response tokens
for token-mean cross-entropies and divergences, sequences for preference losses). DDP averages gradients over
the W processes, so a term with local mean m_r over n_r items is put into the local loss as m_r * W n_r / N,
with N = sum_r n_r (one all-reduce per step): the average over processes is then sum_r m_r n_r / N, the mean over
the whole global batch, exactly what one process computes on the whole batch. Logged values are those global means.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from prefkd.console import console
from prefkd.errors import ConfigError, PrefkdError

# The loss terms the methods and the loop log (methods.py, train.py); reported before diagnostics derived from them.
LOSS_TERMS = ("pref_loss", "plad_loss", "distillm2_loss", "divergence", "nll", "anchor_nll", "anchor_kl", "replay_nll",
              "lm_loss")
SEED_STRIDE = 1_000_003  # process r samples with seed + r * SEED_STRIDE: distinct streams, rank 0 = single-process


class TrainingDiverged(PrefkdError):
    """A non-finite loss term or gradient: the step is not applied and the last good checkpoint is kept."""


class LaunchMismatch(ConfigError):
    """The launcher started W processes but Accelerate runs this one as a member of another number of them."""


def process_state() -> PartialState:
    """This process's place in the launch (a single process when not launched). `cpu` must be said on a machine
    without GPUs: without it Accelerate falls back to one process even under `accelerate launch`."""
    state = PartialState(cpu=not torch.cuda.is_available())
    check_launch(state)
    if state.num_processes > 1 and not state.is_main_process:
        console.quiet = True  # one copy of every message and progress bar: the main process's
    return state


def check_launch(state: PartialState) -> None:
    """Refuse a launch whose process count (WORLD_SIZE, set by torchrun / accelerate launch) is not Accelerate's.

    Accelerate decides on its own whether a process is part of a multi-process run; when it decides "no" (e.g. its
    state was first created without cpu=True on a machine without GPUs, which gives DistributedType.NO), every
    launched process trains alone on the whole batch: W unsynchronised copies writing the same output directory."""
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world == state.num_processes:
        return
    raise LaunchMismatch(
        f"the launcher started {world} processes (WORLD_SIZE={world}) but Accelerate runs this one as "
        f"{state.num_processes} process{'es' if state.num_processes != 1 else ''} ({state.distributed_type}), so "
        f"{world} copies would train unsynchronised into the same output; start prefkd through `accelerate launch "
        f"--multi_gpu --num_processes {world} -m prefkd.cli ...` (on CPU it runs with gloo) and do not create "
        f"Accelerate's state before prefkd does, or run a single process without a launcher")


def setup(acc: Accelerator) -> None:
    """Once the Accelerator exists: refuse a launch it does not see as one (check_launch), and run FSDP on CPU.

    Accelerate 1.15 switches to FSDP only for accelerator devices (AcceleratorState: the FSDP branch is under the
    MULTI_GPU/XPU/NPU/... types); on CPU the processes are MULTI_CPU and an FSDP config silently gives DDP. torch's
    FSDP2 (`fully_shard`) runs on CPU under gloo, so with `fsdp_version: 2` this finishes what Accelerate does on
    a GPU: the FSDP distributed type and the plugin it builds from `accelerate launch`'s environment. Then
    `prepare`, `place_teacher`, checkpoints and `gathered_copy` take their FSDP paths, testable without a GPU."""
    check_launch(acc.state)
    # FSDP (without a plugin): the type a previous run in this process left in PartialState's shared state.
    if acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP) or \
            getattr(acc.state, "fsdp_plugin", None) is not None or \
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds from the environment
    if plugin.fsdp_version != 2:
        raise ConfigError("prefkd runs FSDP on CPU as FSDP2 only: set fsdp_version: 2 in "
                          "the accelerate config (see configs/accelerate/fsdp.yaml)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    # As AcceleratorState's FSDP branch does: PartialState keeps the type for the states created after this one.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if acc.is_main_process:  # says that the FSDP config took effect (Accelerate alone would have run DDP)
        console.print(f"FSDP2 on CPU: {acc.num_processes} processes (gloo) each hold a shard of the models")


def shard(indices: list[int], acc: Accelerator) -> list[int]:
    """This process's share of a global batch: every W-th example (lengths are mixed, so is the work)."""
    return indices[acc.process_index:: acc.num_processes]


def check_batch(n: int, acc: Accelerator, what: str) -> None:
    if 0 < n < acc.num_processes:
        raise ConfigError(f"{what} has {n} examples per step, fewer than the {acc.num_processes} processes; raise "
                          f"train.batch_size so that every process gets at least one")


def process_seed(seed: int, acc: Accelerator) -> int:
    """Seed of this process's sampling stream (rank 0 keeps `seed`, so one process runs exactly as before)."""
    return seed + acc.process_index * SEED_STRIDE


def shared_generator(seed: int, k: int) -> torch.Generator:
    """The same on every process: for random choices that concern the whole global batch (gkd's on-policy coin)."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + k)


@dataclass
class Term:
    name: str  # its metric name; "" for the method's own term, which the method logs under its own names
    value: torch.Tensor  # a mean over `count` items of this process's slice
    count: float
    weight: float  # its weight in the total loss


def combine(acc: Accelerator, terms: list[Term], metrics: dict[str, float], metric_count: float
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """(this process's loss to backpropagate, the global-batch value of every term and metric).

    `metrics` (the method's) are means over `metric_count` items; their global value is the count-weighted mean."""
    if acc.num_processes == 1:
        loss = sum(t.weight * t.value for t in terms)
        logged = {**metrics, **{t.name: t.value.item() for t in terms if t.name}}
        return loss, {**logged, "loss": loss.item()}
    keys = sorted(metrics)
    local = [t.count for t in terms] + [t.value.item() * t.count for t in terms] + \
        [metrics[k] * metric_count for k in keys] + [metric_count]
    total = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), reduction="sum").cpu().tolist()
    n = len(terms)
    counts, sums, metric_sums, metric_total = total[:n], total[n: 2 * n], total[2 * n: -1], total[-1]
    loss = sum(t.weight * t.value * (acc.num_processes * t.count / c if c else 1.0)
               for t, c in zip(terms, counts, strict=True))
    means = [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]
    logged = {k: s / metric_total if metric_total else 0.0 for k, s in zip(keys, metric_sums, strict=True)}
    logged.update({t.name: m for t, m in zip(terms, means, strict=True) if t.name})
    logged["loss"] = sum(t.weight * m for t, m in zip(terms, means, strict=True))
    return loss, logged


def check_finite(step: int, values: dict[str, float], kept: Callable[[], str]) -> None:
    """Stop before a non-finite loss term or gradient reaches the weights; name the first one (the total last).

    `kept()` says which checkpoint survives, e.g. "the last good checkpoint (step 40) is kept in OUT/checkpoint"."""
    order = sorted(values, key=lambda k: (k == "loss", k not in LOSS_TERMS))  # the cause first, the total last
    bad = [k for k in order if not math.isfinite(values[k])]
    if bad:
        also = f" (also non-finite: {', '.join(bad[1:])})" if len(bad) > 1 else ""
        raise TrainingDiverged(f"step {step}: {bad[0]} = {values[bad[0]]} is not finite{also}; the update was not "
                               f"applied and {kept()} (for inspection). Lower train.lr or check the data and start "
                               f"afresh with --overwrite")


def configure(acc: Accelerator, batch_size: int, grad_accum: int, max_grad_norm: float) -> None:
    """DeepSpeed takes the micro-batch and clipping from its own config, and no dataloader tells it here."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    if grad_accum != 1:
        raise ConfigError("under DeepSpeed keep train.grad_accum=1 (DeepSpeed accumulates by its own count); raise "
                          "train.batch_size instead")
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = max(1, batch_size // acc.num_processes)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * acc.num_processes
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = max_grad_norm


def clip_grad_norm(acc: Accelerator, model: torch.nn.Module, max_norm: float) -> float | None:
    """The global gradient norm before clipping; None under DeepSpeed, which clips inside its step."""
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    return None if norm is None else float(norm)


def place_teacher(acc: Accelerator, teacher: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher, for forward passes and sampling: a full copy on each device (one process, DDP); under
    DeepSpeed ZeRO-3 sharded like the student (`offload_param` puts its shards in CPU memory), under FSDP2 sharded
    by the same plugin (`fsdp_offload_params` offloads). Under ZeRO-1/2 it is replicated (they shard optimizer
    state, which a frozen teacher has none of)."""
    teacher = teacher.eval().requires_grad_(False)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed  # the `multigpu` extra; TRL keeps this recipe up to date

        return prepare_deepspeed(teacher, acc)
    if acc.distributed_type == DistributedType.FSDP:
        if acc.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("prefkd shards the teacher with FSDP2 only: set fsdp_version: 2 in the accelerate "
                              "config (see configs/accelerate/fsdp.yaml)")
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(acc, teacher)
    return teacher.to(acc.device)


def sharded(acc: Accelerator) -> bool:
    """Whether the student's weights are split across processes (then saving needs a gathered state dict)."""
    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def gathered_copy(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """A full CPU copy of a sharded (ZeRO-3 / FSDP) student on the main process, None elsewhere; every process
    must call it (gathering the shards is a collective)."""
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    unwrapped = acc.unwrap_model(model)
    with torch.device("meta"):
        copy = type(unwrapped)(unwrapped.config)
    copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()  # the gathered state dict may hold a tied head once
    return copy


def check_sampling_supported(acc: Accelerator, method: str, samples_in_training: bool) -> None:
    """Refuse on-policy methods under DeepSpeed ZeRO-3: every forward is then a collective, and prefkd's decoder
    keeps the processes in step only for FSDP2 (`generation.InStep`), the one sharding it can test here."""
    if not samples_in_training:
        return
    if acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3:
        raise ConfigError(f"method '{method}' samples from the models during training, which prefkd does not do "
                          "under DeepSpeed ZeRO-3 (each forward gathers the weights, and the processes' decoding "
                          "loops would fall out of step). Launch it with configs/accelerate/fsdp.yaml (sampling runs "
                          "in step there), ddp.yaml or DeepSpeed ZeRO-1/2, or use a method that trains on cached "
                          "samples (kd, seqkd, plad)")
