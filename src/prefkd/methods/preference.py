"""The other preference forms of DPKD's Table 2 on the same sampled pairs (chosen = teacher sample, rejected =
student sample): DPO, IPO, CPO, SimPO. Each has its own config section, named after its paper's symbols."""

from __future__ import annotations

from dataclasses import dataclass

from prefkd import losses
from prefkd.config import opt
from prefkd.methods.base import Method
from prefkd.methods.dpkd import prompts_and_teacher_cache, refuse_baseline, sampled_pairs


@dataclass
class DPOConfig:
    beta: float = opt(0.1, "dpo: DPO's beta in -log sigmoid(beta h), summed log-probs")


@dataclass
class IPOConfig:
    beta: float = opt(0.1, "ipo: IPO's tau (TRL's beta) in (h - 1/(2 tau))^2, summed log-probs")


@dataclass
class CPOConfig:
    beta: float = opt(0.1, "cpo: CPO's beta in -log sigmoid(beta (log q(y_t) - log q(y_s)))")
    nll_weight: float = opt(1.0, "cpo: weight of the token-mean NLL of y_t inside the CPO loss; with kappa < 1 the "
                                 "CE anchor is on y_t too, so NLL(y_t) weighs kappa * nll_weight + (1 - kappa)")


@dataclass
class SimPOConfig:
    beta: float = opt(2.0, "simpo: SimPO's beta, the reward scale")
    gamma: float = opt(0.5, "simpo: SimPO's gamma, the target reward margin")


def _method(name: str, description: str, paper: str, pair_loss, key_params: str) -> Method:
    return Method(name, description, paper, "prompts (samples drawn in training)", True, prompts_and_teacher_cache,
                  sampled_pairs(pair_loss), key_params, check=refuse_baseline, samples_in_training=True,
                  cross_tokenizer=True, sequence_teacher=True)


METHODS = [
    _method("dpo", "DPKD without length normalisation: -log sigmoid(beta h) on summed log-probs",
            "DPKD Table 2 / DPO", lambda qt, qs, pt, ps, nt, ns, c: losses.dpo_loss(qt, qs, pt, ps, c.dpo.beta),
            "dpo.beta 0.1"),
    _method("ipo", "(h - 1/(2 tau))^2 on summed log-probs", "DPKD Table 2 / IPO",
            lambda qt, qs, pt, ps, nt, ns, c: losses.ipo_loss(qt, qs, pt, ps, c.ipo.beta), "ipo.beta 0.1"),
    _method("cpo", "reference-free preference + NLL of the teacher sample", "DPKD Table 2 / CPO",
            lambda qt, qs, pt, ps, nt, ns, c: losses.cpo_loss(qt, qs, nt, c.cpo.beta, c.cpo.nll_weight),
            "cpo.beta 0.1, cpo.nll_weight 1"),
    _method("simpo", "reference-free, length-normalised preference with a target margin", "DPKD Table 2 / SimPO",
            lambda qt, qs, pt, ps, nt, ns, c: losses.simpo_loss(qt, qs, nt, ns, c.simpo.beta, c.simpo.gamma),
            "simpo.beta 2, simpo.gamma 0.5"),
]
