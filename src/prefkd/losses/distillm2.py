"""DistiLLM-2's contrastive loss CALD (Ko et al., ICML 2025, arXiv 2503.07067) and its schedules. Pure functions.

Skew forward KL on the teacher's responses y_t pulls the student up where the teacher is confident; skew reverse KL
on the student's own responses y_s pushes it down where the teacher puts little mass. See docs/methods.md,
"DistiLLM-2", for the formula, the released defaults and where the paper differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prefkd.losses.divergences import _fusable, fused_positions

BETA_SCHEDULES = ("fixed", "code", "paper")
# Appendix B.3 / the released code clip the adaptive alpha to [0.01, alpha0].
ALPHA_MIN = 0.01


def _as_weight(alpha: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha as a [B, 1, 1] tensor (a float, or one value per sequence), checked to lie strictly inside (0, 1)."""
    a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if a.ndim == 1:
        a = a.view(-1, 1, 1)
    elif a.ndim != 0:
        raise ValueError(f"alpha must be a float or one value per sequence, got shape {tuple(a.shape)}")
    # log(0) in the mixture weights: the endpoints are plain KLs, which the token-level losses already offer.
    if bool(((a <= 0) | (a >= 1)).any()):
        raise ValueError("alpha must lie strictly between 0 and 1")
    return a


def _fused_weight(alpha: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """alpha for `divergences.fused_positions`: a float, or one value per sequence [B]; checked as `_as_weight`."""
    a = _as_weight(alpha, like.new_empty((), dtype=torch.float64))  # float64: 0.1 stays 0.1
    return float(a) if a.ndim == 0 else a.view(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log(w A + (1 - w) B) per vocabulary entry, w broadcast from [B, 1, 1]."""
    # As in divergences._log_mix: logsumexp's backward is NaN where both inputs are -inf; feed zeros, put -inf back.
    both_zero = (log_a == -math.inf) & (log_b == -math.inf)
    zero = torch.zeros_like(log_a)
    mixed = torch.logsumexp(torch.stack([torch.where(both_zero, zero, log_a) + weight.log(),
                                         torch.where(both_zero, zero, log_b) + torch.log1p(-weight)]), dim=0)
    return torch.where(both_zero, torch.full_like(mixed, -math.inf), mixed)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v A (log A - log B) per position, 0 log 0 = 0."""
    diff = torch.where(log_a > -math.inf, log_a - log_b, torch.zeros_like(log_a))
    return (log_a.exp() * diff).sum(-1)


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P, log Q) in at least float32; masked-out positions get zero logits (no garbage in value or grad)."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    keep = mask.bool().unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)
    return (F.log_softmax(torch.where(keep, teacher_logits.to(dtype), zero), dim=-1),
            F.log_softmax(torch.where(keep, student_logits.to(dtype), zero), dim=-1))


def _sequence_means(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the token mean of each sequence (0 for a sequence with no counted token)."""
    m = mask.bool()
    return torch.where(m, per_position, torch.zeros_like(per_position)).sum(-1) / m.sum(-1).clamp(min=1)


def _mean_over_sequences(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the sequences that have at least one counted token (0 when none has)."""
    live = mask.bool().any(-1)
    return torch.where(live, values, torch.zeros_like(values)).sum() / live.sum().clamp(min=1)


def skew_kl_per_sequence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                         alpha: float | torch.Tensor = 0.1) -> torch.Tensor:
    """[B]: token mean of KL(P || alpha P + (1 - alpha) Q) per sequence (DistiLLM-2's SKL; Q carries gradient)."""
    if _fusable(teacher_logits):
        return _sequence_means(fused_positions(student_logits, teacher_logits, mask, "skl",
                                               _fused_weight(alpha, student_logits)), mask)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    return _sequence_means(_kl(log_p, _log_mix(log_p, log_q, _as_weight(alpha, log_q))), mask)


def skew_reverse_kl_per_sequence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                                 alpha: float | torch.Tensor = 0.1, detach_mixture: bool = True) -> torch.Tensor:
    """[B]: token mean of KL(Q || (1 - alpha) P + alpha sg[Q]) per sequence (DistiLLM-2's SRKL).

    `detach_mixture=True` is the released code (`log_alpha_2 + vocab_logps.detach()`): the value is the SRKL, but
    the gradient flows only through the outer Q; False differentiates the true KL(Q || (1 - alpha) P + alpha Q).
    """
    if _fusable(teacher_logits):
        kind = "srkl_detached" if detach_mixture else "srkl"
        return _sequence_means(fused_positions(student_logits, teacher_logits, mask, kind,
                                               _fused_weight(alpha, student_logits)), mask)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    inner = log_q.detach() if detach_mixture else log_q
    return _sequence_means(_kl(log_q, _log_mix(log_p, inner, 1 - _as_weight(alpha, log_q))), mask)


def distillm2_loss(student_logits_t: torch.Tensor, teacher_logits_t: torch.Tensor, mask_t: torch.Tensor,
                   student_logits_s: torch.Tensor, teacher_logits_s: torch.Tensor, mask_s: torch.Tensor,
                   alpha_t: float | torch.Tensor = 0.1, alpha_s: float | torch.Tensor = 0.1,
                   weight_t: float = 1.0, weight_s: float = 1.0, detach_mixture: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CALD: weight_t mean_{y_t} SKL^(alpha_t)(y_t) + weight_s mean_{y_s} SRKL^(alpha_s)(y_s); (loss, SKL, SRKL).

    `*_t` are the logits [B, T, V] on the teacher's responses y_t (mask [B, T] of their response positions, aligned
    so position t scores token t), `*_s` those on the student's responses y_s; each term is computed only on its own
    sequences. Per sequence the divergence is the token mean (the released `average_log_prob=True`), then the mean
    over the sequences that have a token. The defaults are the released form: alpha 0.1 for both, equal weights,
    detached Q in the SRKL mixture. `alpha_*` may be one value per sequence (the adaptive curriculum,
    `distillm2_adaptive_alpha`); `weight_*` come from `distillm2_weights`. Returns the per-sequence SKL [B_t] and
    SRKL [B_s] too, for logging.
    """
    skl = skew_kl_per_sequence(student_logits_t, teacher_logits_t, mask_t, alpha_t)
    srkl = skew_reverse_kl_per_sequence(student_logits_s, teacher_logits_s, mask_s, alpha_s, detach_mixture)
    loss = weight_t * _mean_over_sequences(skl, mask_t) + weight_s * _mean_over_sequences(srkl, mask_s)
    return loss, skl, srkl


def distillm2_weights(progress: float, schedule: str = "fixed", beta0: float = 0.5) -> tuple[float, float]:
    """(weight on SKL, weight on SRKL) at `progress` in [0, 1] (the fraction of training done).

    - "fixed": (1, 1), the released default (`gradual_beta=False`).
    - "code": the released `gradual_beta`: b = 1 + 0.5 min(1, 2 progress), weights (2 - b, b): from (1, 1) to
      (0.5, 1.5) over the first half of training, then flat.
    - "paper": Eq. 2's (1 - beta, beta) with Alg. 1's beta = clip(progress, beta0, 1), read with `progress` the
      fraction of all training (the extracted `e/E + tau/T` is ambiguous), scaled by 2 so that beta = 0.5 gives the
      released equal weights (the paper's extra 1/2 only rescales the learning rate). At beta0 = 0.5 this is the
      code's form with the paper's beta = b / 2, but rising to (0, 2) at the end instead of stopping at (0.5, 1.5).
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if schedule == "fixed":
        return 1.0, 1.0
    if schedule == "code":
        b = 1.0 + 0.5 * min(1.0, 2.0 * progress)
        return 2.0 - b, b
    if schedule == "paper":
        if not 0.0 <= beta0 <= 1.0:
            raise ValueError(f"beta0 must be in [0, 1], got {beta0}")
        beta = min(max(progress, beta0), 1.0)
        return 2.0 * (1.0 - beta), 2.0 * beta
    raise ValueError(f"schedule must be one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")


def distillm2_adaptive_alpha(gap: torch.Tensor, anchor: float | torch.Tensor, alpha0: float = 0.1) -> torch.Tensor:
    """Per-sequence alpha = clip(1 - (1 - alpha0) anchor / (gap + 1e-5), 0.01, alpha0) (Alg. 1 l.11, released code).

    Chosen so that (1 - alpha) gap, the first-order size of log(p / (alpha p + (1 - alpha) q)) (Eq. 7), stays at
    (1 - alpha0) anchor. `gap` [B] is, as in the code, exp(mean log p) - exp(mean log q) on y_t for the SKL term and
    exp(mean log q) - exp(mean log p) on y_s for the SRKL term; `anchor` is the reference gap. The result carries no
    gradient (alpha is a schedule, not a parameter).
    """
    if not ALPHA_MIN <= alpha0 < 1:
        raise ValueError(f"alpha0 must be in [{ALPHA_MIN}, 1), got {alpha0}")
    gap = gap.detach()
    anchor = torch.as_tensor(anchor, dtype=gap.dtype, device=gap.device).detach()
    return (1 - (1 - alpha0) * anchor / (gap + 1e-5)).clamp(min=ALPHA_MIN, max=alpha0)
