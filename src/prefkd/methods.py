"""Method registry: a method is one step function plus what it needs. The training loop knows nothing else.

A step gets the method's share of the batch and returns its loss, the anchor cross-entropy it can offer (on the
teacher sample y_t) for the `kappa` mix, and metrics to log. Replay of labelled data and the LM-loss term are
added by the loop, the same way for every method.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from prefkd.config import opt
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.logprobs import response_token_logps, token_mean_nll
from prefkd.losses import dpkd_loss


@dataclass
class DPKDConfig:
    beta: float = opt(0.1, "DPKD: temperature of the implicit reward beta/|y| log q/p")
    length_normalize: bool = opt(True, "DPKD: divide rewards by response length (Eq. 9); false = Eq. 8 ablation")


@dataclass
class MethodConfig:
    kappa: float = opt(0.5, "L = (1-kappa) CE(anchor y_t) + kappa L_method; 1 = paper form (no anchor)")
    replay: float = opt(0.5, "share of each batch drawn from labelled references (CE); 0 = paper form")
    lm_weight: float = opt(0.1, "lambda: weight of the LM loss on the pretraining corpus (0 = ablation w/o LM loss)")
    lm_block_size: int = opt(128, "tokens per pretraining-corpus block")
    dpkd: DPKDConfig = field(default_factory=DPKDConfig)


@dataclass
class StepInputs:
    student: PreTrainedModel  # as prepared by Accelerate: forward with grad
    student_sampler: PreTrainedModel  # the unwrapped student, for generate()
    teacher: PreTrainedModel | None
    examples: list[Example]  # prompts; response_ids hold the reference where the method uses one
    sampling: SamplingConfig
    cfg: MethodConfig
    pad_id: int
    eos_id: int
    device: torch.device


@dataclass
class MethodOutput:
    loss: torch.Tensor
    anchor_nll: torch.Tensor | None  # CE on the teacher sample, when the method has one
    metrics: dict[str, float]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    paper: str
    needs_teacher: bool
    uses_references: bool  # consumes reference responses (else prompts only)
    step: Callable[[StepInputs], MethodOutput]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def sft_step(inp: StepInputs) -> MethodOutput:
    token_logps, mask = response_token_logps(inp.student, _to(collate(inp.examples, inp.pad_id), inp.device))
    nll = token_mean_nll(token_logps, mask)
    return MethodOutput(nll, None, {"nll": nll.item()})


def dpkd_step(inp: StepInputs) -> MethodOutput:
    """Algorithm 1 of the DPKD paper: sample y_t from the teacher and y_s from the current student every batch."""
    assert inp.teacher is not None
    prompts = [e.prompt_ids for e in inp.examples]
    y_t = sample_responses(inp.teacher, prompts, inp.sampling, inp.pad_id, inp.eos_id)
    y_s = sample_responses(inp.student_sampler, prompts, inp.sampling, inp.pad_id, inp.eos_id)
    pairs = [Example(p, r) for p, r in zip(prompts + prompts, y_t + y_s, strict=True)]
    batch = _to(collate(pairs, inp.pad_id), inp.device)  # one forward per model for chosen and rejected
    q_tok, mask = response_token_logps(inp.student, batch)
    with torch.no_grad():
        p_tok, _ = response_token_logps(inp.teacher, batch)
    b = len(prompts)
    q, p, n = q_tok.sum(-1), p_tok.sum(-1), mask.sum(-1)
    loss, r_t, r_s = dpkd_loss(q[:b], q[b:], p[:b], p[b:], n[:b], n[b:], inp.cfg.dpkd.beta,
                               inp.cfg.dpkd.length_normalize)
    anchor = token_mean_nll(q_tok[:b], mask[:b])
    n_s = n[b:].clamp(min=1)
    metrics = {
        "dpkd_loss": loss.item(), "reward_chosen": r_t.mean().item(), "reward_rejected": r_s.mean().item(),
        "margin": (r_t - r_s).mean().item(), "pref_accuracy": (r_t > r_s).float().mean().item(),
        # The teacher's per-token log-prob of the student's samples: rises as the student learns what p knows.
        "teacher_logp_student": (p[b:].detach() / n_s).mean().item(),
        "seq_rkl": ((q[b:].detach() - p[b:].detach()) / n_s).mean().item(),
        "len_teacher": n[:b].mean().item(), "len_student": n[b:].mean().item(),
    }
    return MethodOutput(loss, anchor, metrics)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sft", "token-mean cross-entropy on reference responses", "baseline", False, True, sft_step),
    Method("dpkd", "DPKD paper form: teacher sample preferred over student sample by the implicit reward "
           "beta/|y| log q/p, sampled every batch", "DPKD (2406.19774) Eq. 9, Alg. 1", True, False, dpkd_step),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint} Known: {', '.join(METHODS)} (see `prefkd methods`)")
    return METHODS[name]
