"""Token-level divergences to the teacher on fixed sequences (references or cached teacher samples): KD, AKL,
TVD, skew KL, and DPKD as released (a token-level argmax preference).

Logits are computed only from the first column any sequence scores (`methods.base.shifted_logits`): the prompt
columns before it are masked in every row, so the loss and its gradients are those of the full [B, T, V] logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prefkd import losses
from prefkd.config import opt
from prefkd.data.collate import collate
from prefkd.errors import ConfigError
from prefkd.methods import data
from prefkd.methods.base import Method, MethodOutput, StepInputs, divergence_logits, nll_from_logits, to_device

if TYPE_CHECKING:
    from prefkd.methods.config import MethodConfig

Divergence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "MethodConfig"], torch.Tensor]


@dataclass
class KDConfig:
    temperature: float = opt(1.0, "kd: softmax temperature of both distributions (loss scaled by T^2)")


@dataclass
class AKLConfig:
    mu: float = opt(0.5, "akl: teacher-probability mass that defines the head (AKL paper's mu)")
    head: str = opt("official", "akl: 'official' = the released code's head (tokens while the cumulative teacher "
                                "probability including them is <= mu; top-1 always in); 'crossing' = also the "
                                "token that crosses mu")

    def __post_init__(self) -> None:
        if self.head not in ("official", "crossing"):
            raise ConfigError(f"distill.akl.head must be official or crossing, not '{self.head}'")


@dataclass
class SkewConfig:
    alpha: float = opt(0.1, "skl/srkl: skew of the mixture (DistiLLM's alpha, 0.1 there)")


def teacher_forced(divergence: Divergence):
    """A step applying a token-level divergence on the examples' sequences (reference or teacher sample)."""

    def step(inp: StepInputs) -> MethodOutput:
        batch = to_device(collate(inp.examples, inp.pad_id), inp.device)
        s, s_div, t_div = divergence_logits(inp, batch)  # the scored columns only (methods/base.py)
        loss = divergence(s_div.logits, t_div.logits, s.mask, inp.cfg)
        anchor = nll_from_logits(s)
        n = s.mask.sum().item()
        return MethodOutput(loss, anchor, {"divergence": loss.item()}, loss_count=n, anchor_count=n)

    return step


def _method(name: str, description: str, paper: str, divergence: Divergence, key_params: str = "",
            cached_logits: Callable[[MethodConfig, str], float] | None = None) -> Method:
    return Method(name, description, paper, "sequences (references, else cached teacher samples)", True,
                  data.sequences, teacher_forced(divergence), key_params, samples_before_training=True,
                  cached_logits=cached_logits)


def _akl_cached(cfg: MethodConfig, tail: str) -> float:
    if tail == "renorm":
        raise ConfigError("akl mixes in the reverse KL, which is infinite against a top-k teacher renormalised to "
                          "its k tokens (the student puts mass where that teacher has none); use "
                          "teacher.logits_tail=bucket")
    return 1.0


METHODS = [
    _method("kd", "word-level KD: (1-kappa) CE + kappa forward KL to the teacher on the sequences",
            "Hinton et al. 2015; MiniLLM's KD", lambda s, t, m, c: losses.forward_kl(s, t, m, c.kd.temperature),
            "kappa 0.5, kd.temperature 1", lambda c, tail: c.kd.temperature),
    _method("akl", "adaptive KL: head/tail-weighted mix of forward and reverse KL on the sequences",
            "AKL (Wu et al. 2024)", lambda s, t, m, c: losses.adaptive_kl(s, t, m, c.akl.mu, head=c.akl.head),
            "akl.mu 0.5, akl.head official", _akl_cached),
    _method("tvd", "total variation distance on the sequences", "DPKD baselines",
            lambda s, t, m, c: losses.total_variation(s, t, m), cached_logits=lambda c, tail: 1.0),
    _method("skl", "skew forward KL on the sequences", "DistiLLM (Ko et al. 2024)",
            lambda s, t, m, c: losses.skew_forward_kl(s, t, m, c.skew.alpha), "skew.alpha 0.1",
            lambda c, tail: 1.0),
    _method("srkl", "skew reverse KL on the sequences", "DistiLLM (Ko et al. 2024)",
            lambda s, t, m, c: losses.skew_reverse_kl(s, t, m, c.skew.alpha), "skew.alpha 0.1",
            lambda c, tail: 1.0),
    _method("dpkd-token", "DPKD as released (LMOps): token-level argmax preference on the sequences, no sampling",
            "DPKD released code", lambda s, t, m, c: losses.dpkd_token_loss(s, t, m, c.dpkd.beta),
            "dpkd.beta 0.1, kappa 0.5"),
]
