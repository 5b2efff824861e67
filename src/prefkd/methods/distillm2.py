"""DistiLLM-2 (Ko et al., ICML 2025, arXiv 2503.07067): the contrastive CALD loss on (teacher sample, student
sample) pairs, skew KL on the teacher's response and skew reverse KL on the student's. White-box: both models score
both responses over the full vocabulary.

The teacher's samples are drawn once before training; the student's are drawn again every epoch from the current
student (the paper's "batched on-policy" data), or once from the initial student (`distillm2.student_samples`);
see docs/methods.md, "DistiLLM-2".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prefkd import losses
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.logprobs import selective_log_softmax
from prefkd.losses.distillm2 import ALPHA_MIN, BETA_SCHEDULES
from prefkd.methods import data
from prefkd.methods.base import Method, MethodOutput, StepInputs, nll_from_logits, student_and_teacher_logits, to_device

ALPHA_SCHEDULES = ("fixed", "adaptive")
STUDENT_SAMPLES = ("epoch", "initial")


@dataclass
class DistiLLM2Config:
    alpha: float = opt(0.1, "distillm2: skew alpha of both terms (SKL on y_t, SRKL on y_s); the released 0.1. With "
                            "alpha_schedule=adaptive it is the paper's alpha0, the ceiling of the per-sequence alpha")
    alpha_schedule: str = opt("fixed", "distillm2: 'fixed' = alpha throughout (released code); 'adaptive' = the "
                                       "paper's curriculum alpha per sequence (Alg. 1 l.11), anchored at the batch's "
                                       "mean gap, clipped to [0.01, alpha]")
    adaptive_from: float = opt(0.0, "distillm2: fraction of training after which the adaptive alpha starts (the "
                                    "paper skips epoch 1: 1/epochs)")
    beta_schedule: str = opt("fixed", "distillm2: term weights over training: 'fixed' = (1, 1) (released); 'code' = "
                                      "the released gradual_beta, (1, 1) -> (0.5, 1.5) over the first half; 'paper' = "
                                      "2 (1 - beta, beta), beta = clip(progress, beta0, 1)")
    beta0: float = opt(0.5, "distillm2: the paper's beta0, the floor of beta in beta_schedule=paper")
    detach_mixture: bool = opt(True, "distillm2: detach Q inside SRKL's mixture, as the released code does (the "
                                     "value is the same; false = the gradient of the true SRKL)")
    temperature: float = opt(0.8, "distillm2: sampling temperature of the pair cache (official generate_vllm.py: 0.8)")
    top_p: float = opt(0.95, "distillm2: nucleus threshold of the pair cache (official generate_vllm.py: 0.95)")
    student_samples: str = opt("epoch", "distillm2: 'epoch' = y_s drawn from the current student every epoch (the "
                                        "paper's batched on-policy data: each prompt's y_s when the prompt is drawn, "
                                        "once per epoch); 'initial' = once from the initial student, cached")

    def __post_init__(self) -> None:
        if not ALPHA_MIN <= self.alpha < 1:
            raise ConfigError(f"distill.distillm2.alpha must be in [{ALPHA_MIN}, 1), not {self.alpha}")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ConfigError(f"distill.distillm2.alpha_schedule must be one of {', '.join(ALPHA_SCHEDULES)}, "
                              f"not '{self.alpha_schedule}'")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"distill.distillm2.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                              f"not '{self.beta_schedule}'")
        if not 0.0 <= self.beta0 <= 1.0:
            raise ConfigError(f"distill.distillm2.beta0 must be in [0, 1], not {self.beta0}")
        if self.student_samples not in STUDENT_SAMPLES:
            raise ConfigError(f"distill.distillm2.student_samples must be one of {', '.join(STUDENT_SAMPLES)}, "
                              f"not '{self.student_samples}'")
        if not 0.0 <= self.adaptive_from <= 1.0:
            raise ConfigError(f"distill.distillm2.adaptive_from must be in [0, 1], not {self.adaptive_from}")


def pairs(ctx: data.PrepareContext) -> data.MethodData:
    """(x, y_t, y_s): one teacher sample per prompt from the keyed sample cache at distillm2.temperature / top_p;
    with `student_samples=initial` one initial-student sample too (else y_s is drawn in training). Both come from
    the same prompt list in the same order, so a y_s is never paired with another prompt's y_t."""
    c = ctx.run.distill.distillm2
    teacher = data.sample_cache(ctx, "teacher", _sampling(ctx.run.sampling, c))
    if c.student_samples == "initial":
        student = [y_s for _, y_s, _ in data.sample_cache(ctx, "student", _sampling(ctx.run.sampling, c))]
    else:
        student = [[] for _ in teacher]
    out = [Example(p, y_t, y_s, index=i) for i, ((p, y_t, _), y_s) in enumerate(zip(teacher, student, strict=True))]
    empty = sum(not e.response_ids or (c.student_samples == "initial" and not e.rejected_ids) for e in out)
    if empty:
        console.print(f"{empty} of {len(out)} pairs have an empty response (that term skips them)")
    return data.MethodData(out)


def _sampling(sampling: SamplingConfig, c: DistiLLM2Config) -> SamplingConfig:
    return replace(sampling, temperature=c.temperature, top_p=c.top_p)


def _mean_token_logp(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean log-prob of each sequence's response tokens."""
    m = mask.float()
    return (selective_log_softmax(logits, labels) * m).sum(-1) / m.sum(-1).clamp(min=1)


def step(inp: StepInputs) -> MethodOutput:
    c = inp.cfg.distillm2
    b = len(inp.examples)
    if c.student_samples == "epoch":  # each prompt is drawn once an epoch: a new y_s from the current student
        ys = sample_responses(inp.student_sampler, [e.prompt_ids for e in inp.examples], _sampling(inp.sampling, c),
                              inp.pad_id, inp.eos_id)
        inp = replace(inp, examples=[replace(e, rejected_ids=y) for e, y in zip(inp.examples, ys, strict=True)])
    # One padded batch [y_t rows; y_s rows], so each model runs one forward; the loss splits them again.
    rows = ([Example(e.prompt_ids, e.response_ids) for e in inp.examples]
            + [Example(e.prompt_ids, e.rejected_ids) for e in inp.examples])
    batch = to_device(collate(rows, inp.pad_id), inp.device)
    # The scored columns only (methods/base.py): the columns cut are masked in every row, so each sequence's token
    # mean, and which sequences count, are those of the full logits.
    s, t = student_and_teacher_logits(inp, batch)
    s_logits, t_logits, mask = s.logits, t.logits, s.mask
    w_t, w_s = losses.distillm2_weights(inp.progress, c.beta_schedule, c.beta0)
    alpha_t: float | torch.Tensor = c.alpha
    alpha_s: float | torch.Tensor = c.alpha
    metrics: dict[str, float] = {}
    if c.alpha_schedule == "adaptive" and inp.progress >= c.adaptive_from:
        with torch.no_grad():
            lq = _mean_token_logp(s_logits, s.labels, mask).exp()
            lp = _mean_token_logp(t_logits, s.labels, mask).exp()
            # The code's "sentence-level" gap: geometric-mean token probabilities, teacher over student on y_t,
            # student over teacher on y_s; the anchor is this batch's mean gap ("mini-batch wise", App. B.3).
            gap_t, gap_s = lp[:b] - lq[:b], lq[b:] - lp[b:]
            alpha_t = losses.distillm2_adaptive_alpha(gap_t, gap_t.mean(), c.alpha)
            alpha_s = losses.distillm2_adaptive_alpha(gap_s, gap_s.mean(), c.alpha)
        metrics |= {"alpha_t": alpha_t.mean().item(), "alpha_s": alpha_s.mean().item()}
    loss, skl, srkl = losses.distillm2_loss(s_logits[:b], t_logits[:b], mask[:b], s_logits[b:], t_logits[b:],
                                            mask[b:], alpha_t, alpha_s, w_t, w_s, c.detach_mixture)
    anchor = nll_from_logits(s.rows(slice(0, b)))
    metrics |= {"distillm2_loss": loss.item(), "skl_teacher": skl.mean().item(), "srkl_student": srkl.mean().item(),
                "weight_skl": w_t, "weight_srkl": w_s}
    return MethodOutput(loss, anchor, metrics, loss_count=b, anchor_count=mask[:b].sum().item())


METHODS = [
    Method("distillm2", "DistiLLM-2 CALD: skew KL to the teacher on its samples y_t + skew reverse KL on the "
           "student's samples y_s (released form: alpha 0.1, equal weights)", "DistiLLM-2 (2503.07067) Eq. 5",
           "pairs (cached teacher samples; student samples drawn every epoch)", True, pairs, step,
           "distillm2.alpha 0.1, distillm2.temperature 0.8; paper form kappa 1, replay 0",
           samples_before_training=True, samples_in_training=True),
]
