"""On-policy token-level distillation: divergences on the student's own samples (MiniLLM-style reverse KL, GKD).

As in token_kd.py, logits are computed only from the first column any sequence scores (`methods.base.shifted_logits`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prefkd import losses
from prefkd.config import opt
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.logprobs import response_token_logps, token_mean_nll
from prefkd.methods import data
from prefkd.methods.base import (
    Method,
    MethodOutput,
    StepInputs,
    divergence_logits,
    nll_from_logits,
    sample,
    to_device,
)
from prefkd.methods.token_kd import Divergence

if TYPE_CHECKING:
    from prefkd.methods.config import MethodConfig


@dataclass
class RKLConfig:
    temperature: float = opt(1.0, "rkl: softmax temperature of both distributions")


@dataclass
class GKDConfig:
    beta: float = opt(0.5, "gkd: GKD's beta, the JSD interpolation; 0 = forward KL, 1 = reverse KL (TRL's "
                           "convention)")
    lmbda: float = opt(0.5, "gkd: GKD's lambda, the probability that a batch uses student samples instead of the "
                            "sequences")
    temperature: float = opt(1.0, "gkd: softmax temperature of both distributions")


def on_policy(divergence: Divergence, student_share: Callable[[MethodConfig], float]):
    """A step applying a divergence on student samples (with probability `student_share`, else the sequences)."""

    def step(inp: StepInputs) -> MethodOutput:
        on = torch.rand((), generator=inp.shared_rng).item() < student_share(inp.cfg)
        seqs = [Example(e.prompt_ids, r) for e, r in zip(inp.examples, sample(inp.student_sampler, inp.examples, inp),
                                                          strict=True)] if on else inp.examples
        batch = to_device(collate(seqs, inp.pad_id), inp.device)
        if on and inp.teacher is None:
            raise ConfigError("on-policy steps need the live teacher (teacher.path), not offline teacher logits")
        s, s_div, t_div = divergence_logits(inp, batch)  # the scored columns only (methods/base.py)
        loss = divergence(s_div.logits, t_div.logits, s.mask, inp.cfg)
        n = s.mask.sum().item()
        anchor, n_anchor = None, None
        if inp.cfg.kappa < 1 and inp.examples[0].response_ids:
            if not on:
                anchor, n_anchor = nll_from_logits(s), n
            else:
                token_logps, mask = response_token_logps(inp.student, to_device(collate(inp.examples, inp.pad_id),
                                                                                inp.device))
                anchor, n_anchor = token_mean_nll(token_logps, mask), mask.sum().item()
        return MethodOutput(loss, anchor, {"divergence": loss.item(), "on_policy": float(on)}, loss_count=n,
                            anchor_count=n_anchor)

    return step


def _gkd_cached(cfg: MethodConfig, tail: str) -> float:
    """gkd from offline teacher logits is its off-policy part: the sequences only (lmbda = 0). A batch of student
    samples needs the teacher's distributions on tokens no cache holds; loading the teacher for those batches would
    defeat the cache, and quietly training with lmbda = 0 would be another method than the one asked for."""
    if cfg.gkd.lmbda != 0:
        raise ConfigError(f"gkd with teacher.logits trains on the cached sequences only: set distill.gkd.lmbda=0 "
                          f"(it is {cfg.gkd.lmbda}). Its on-policy share scores the student's own samples, which "
                          "need the live teacher (teacher.path without teacher.logits)")
    return cfg.gkd.temperature


METHODS = [
    Method("rkl", "on-policy token-level reverse KL on student samples (MiniLLM-style, not MiniLLM's policy "
           "gradient)", "MiniLLM (Gu et al. 2024), simplified", "student samples; anchor on the sequences", True,
           data.sequences, on_policy(lambda s, t, m, c: losses.reverse_kl(s, t, m, c.rkl.temperature),
                                     lambda c: 1.0), samples_before_training=True, samples_in_training=True),
    Method("gkd", "generalized JSD on student samples with probability lmbda, else the sequences",
           "GKD (Agarwal et al. 2024)", "student samples or the sequences", True, data.sequences,
           on_policy(lambda s, t, m, c: losses.generalized_jsd(s, t, m, c.gkd.beta, c.gkd.temperature),
                     lambda c: c.gkd.lmbda), "gkd.beta 0.5, gkd.lmbda 0.5", samples_before_training=True,
           samples_in_training=True, cached_logits=_gkd_cached),
]
