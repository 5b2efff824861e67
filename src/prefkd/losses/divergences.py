"""Token-level divergences between teacher and student next-token distributions. Pure tensor functions.

Every function takes `student_logits, teacher_logits [B, T, V]` aligned so that position t scores token t and a
`mask [B, T]` (bool or 0/1) of the counted positions, and returns the mean over the counted positions of the whole
batch of the per-position divergence summed over the vocabulary. `P = softmax(teacher / tau)` is the teacher,
`Q = softmax(student / tau)` the student. See docs/methods.md, "Token-level divergences" and "DPKD as released".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{mask} values / #mask over the whole batch: the single place token-level losses are normalised."""
    mask = mask.bool()
    # torch.where, not a product: a masked-out NaN or inf must not leak into the sum.
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    # An all-masked batch gives 0 (with a gradient path) rather than 0/0.
    return total / mask.sum().clamp(min=1)


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P, log Q) in at least float32, with masked-out positions replaced by uniform distributions."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    keep = mask.bool().unsqueeze(-1)
    # Zeroing the logits of masked positions keeps garbage there (1e4, -inf, NaN) out of both the value and the
    # backward pass; where() sends those positions a zero gradient.
    student = torch.where(keep, student_logits.to(dtype), torch.zeros((), dtype=dtype, device=student_logits.device))
    teacher = torch.where(keep, teacher_logits.to(dtype), torch.zeros((), dtype=dtype, device=teacher_logits.device))
    return F.log_softmax(teacher / temperature, dim=-1), F.log_softmax(student / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-position KL(A || B) = sum_v A (log A - log B), with 0 log 0 = 0 (xlogy convention). Returns [B, T]."""
    live = log_a > -math.inf
    # Where A = 0 the difference may be -inf - (-inf) = NaN; replacing it (not the product) keeps the backward clean.
    diff = torch.where(live, log_a - log_b, torch.zeros_like(log_a))
    return (log_a.exp() * diff).sum(-1)


def _check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {weight}")


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight A + (1 - weight) B), via logsumexp so that tiny probabilities do not underflow."""
    _check_weight(weight)
    # log(0) would be -inf in a constant; the endpoints are exactly one of the two distributions.
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    # logsumexp's backward is NaN where both inputs are -inf (a token neither model can emit, e.g. padded
    # vocabulary); feed it zeros there and put -inf back, so that token still has zero mixture probability.
    both_zero = (log_a == -math.inf) & (log_b == -math.inf)
    zero = torch.zeros_like(log_a)
    mixed = torch.logsumexp(torch.stack([torch.where(both_zero, zero, log_a) + math.log(weight),
                                         torch.where(both_zero, zero, log_b) + math.log1p(-weight)]), dim=0)
    return torch.where(both_zero, torch.full_like(mixed, -math.inf), mixed)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """tau^2 * mean_positions sum_v P (log P - log Q): KL(P || Q), the Hinton KD divergence (teacher entropy kept)."""
    if _fusable(teacher_logits, temperature):
        return _fused(student_logits, teacher_logits, mask, 0.0, temperature)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask, temperature)
    return temperature ** 2 * _masked_mean(_kl(log_p, log_q), mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """tau^2 * mean_positions sum_v Q (log Q - log P): KL(Q || P), MiniLLM's divergence."""
    if _fusable(teacher_logits, temperature):
        return _fused(student_logits, teacher_logits, mask, 1.0, temperature)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask, temperature)
    return temperature ** 2 * _masked_mean(_kl(log_q, log_p), mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 * mean_positions [beta KL(P || M) + (1 - beta) KL(Q || M)], M = beta P + (1 - beta) Q (GKD).

    As in TRL, beta = 0 is exactly `forward_kl` and beta = 1 exactly `reverse_kl` (the mixture form would be 0 there).
    TRL does not scale by tau^2; this does, like every divergence here.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    if _fusable(teacher_logits, temperature):
        return _fused(student_logits, teacher_logits, mask, beta, temperature)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = _log_mix(log_p, log_q, beta)
    per_position = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return temperature ** 2 * _masked_mean(per_position, mask)


# The divergences above, row block by row block. Autograd through their expressions keeps about eight [B, T, V]
# tensors for the backward and makes some fifteen passes over them each way; at a 50k vocabulary those passes
# cost as much as the LM head. Each block's value and gradient come from closed forms while the block is in the
# CPU's caches; the backward only scales the saved gradient. Same values and gradients within float32 rounding
# (tests/test_divergences.py checks them against the expressions above and a float64 computation). A GPU gains
# nothing from small blocks, only kernel launches: there a block is much larger.
_BLOCK_ELEMENTS = 2**16
_ACCELERATOR_BLOCK_ELEMENTS = 2**24
# What `fused_positions` computes per position (P teacher, Q student, w the weight):
#   jsd            beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; w = beta, 0 = KL(P || Q),
#                  1 = KL(Q || P)
#   skl            KL(P || w P + (1 - w) Q)                           (DistiLLM's SKL)
#   srkl           KL(Q || (1 - w) P + w Q)                           (DistiLLM's SRKL)
#   srkl_detached  the same value, the gradient with the mixture's Q held constant (DistiLLM-2's released code)
#   akl            a FKL + (1 - a) RKL, a = g_head / (g_head + g_tail) held constant; w = mu (AKL: `adaptive_kl`)
FUSED_KINDS = ("jsd", "skl", "srkl", "srkl_detached", "akl")


def _fusable(teacher_logits: torch.Tensor, temperature: float = 1.0) -> bool:
    """The closed-form gradient is the student's alone: a teacher that needs a gradient takes the autograd path."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return not teacher_logits.requires_grad


def fused_positions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, kind: str,
                    weight: float | torch.Tensor = 0.0, temperature: float = 1.0, head: str = "official"
                    ) -> torch.Tensor:
    """Per-position divergence `kind` (FUSED_KINDS) [B, T], 0 where `mask` is off, unscaled by tau^2, with its
    closed-form gradient in the student's logits; the teacher's logits get none (callers check `_fusable`).
    `weight`: a float, or one value per sequence [B] (DistiLLM-2's adaptive alpha)."""
    if kind not in FUSED_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FUSED_KINDS)}, got {kind!r}")
    return _FusedPositions.apply(student_logits, teacher_logits, mask, kind, weight, temperature, head)


def _fused(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float,
           temperature: float) -> torch.Tensor:
    values = fused_positions(student_logits, teacher_logits, mask, "jsd", beta, temperature)
    return temperature ** 2 * _masked_mean(values, mask)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """log(w A + (1 - w) B) of rows, w a float or [n, 1]; the endpoints exactly one of the two."""
    if isinstance(w, float):
        if w == 0.0:
            return log_b
        if w == 1.0:
            return log_a
        return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))
    return torch.logaddexp(log_a + w.log(), log_b + torch.log1p(-w))  # log 0 = -inf: logaddexp keeps the other


def _rows(s: torch.Tensor, t: torch.Tensor, kind: str, w: float | torch.Tensor, temperature: float, head: str,
          want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(divergence of each row [n], its gradient in the rows' logits [n, V] or None), float32 at least, unscaled
    by tau^2; the gradient is in the tempered logits z = s / tau.

    With g = dL/dQ and h = Q g (0 where Q = 0), the gradient through the softmax is dL/dz = h - Q sum_u h_u, so
    a constant in g drops out. Per kind: KL(P || Q): h = -P, so dL/dz = Q - P. KL(Q || P): g = log Q/P + 1.
    0 < beta < 1: the terms in P/M and Q/M cancel, g = (1 - beta) log Q/M. SKL: g = -(1 - w) P/M. SRKL: g = log Q/M
    + 1 - w Q/M, and with the mixture's Q held constant g = log Q/M + 1. AKL: a h_FKL + (1 - a) h_RKL.
    0 log 0 = 0 throughout."""
    dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
    s, t = s.to(dtype), t.to(dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    q, zero = log_q.exp(), torch.zeros((), dtype=dtype, device=s.device)
    q_live, p_live = log_q > -math.inf, log_p > -math.inf
    if kind == "jsd" and w == 0.0:  # KL(P || Q)
        p = log_p.exp()
        value = _xlogy_sum(p, log_p, log_p - log_q)
        return value, (q - p) if want_grad else None
    if kind == "jsd":
        log_m = log_p if w == 1.0 else _mix(log_p, log_q, w)
        qg = q * torch.where(q_live, log_q - log_m, zero)
        kl_qm = qg.sum(-1)
        value = kl_qm if w == 1.0 else w * _xlogy_sum(log_p.exp(), log_p, log_p - log_m) + (1 - w) * kl_qm
        h = qg.mul_(1.0 if w == 1.0 else 1 - w) if want_grad else None
    elif kind == "skl":
        log_m = _mix(log_p, log_q, w)
        value = _xlogy_sum(log_p.exp(), log_p, log_p - log_m)
        h = torch.where(p_live, (log_q + log_p - log_m).exp_(), zero).mul_(-(1 - w)) if want_grad else None
    elif kind in ("srkl", "srkl_detached"):
        log_m = _mix(log_p, log_q, 1 - w)
        h = q * torch.where(q_live, log_q - log_m, zero)
        value = h.sum(-1)
        if kind == "srkl" and want_grad:  # the mixture's own Q: - w Q^2 / M
            h -= torch.where(q_live, q * (log_q - log_m).exp(), zero) * w
    else:  # akl
        p = log_p.exp()
        gap = (p - q).abs()
        in_head = _head_mask(p, w, head)
        g_head, g_tail = (gap * in_head).sum(-1), (gap * ~in_head).sum(-1)
        a = (g_head / (g_head + g_tail).clamp(min=torch.finfo(dtype).tiny))[:, None]
        qg = q * torch.where(q_live, log_q - log_p, zero)
        value = a[:, 0] * _xlogy_sum(p, log_p, log_p - log_q) + (1 - a[:, 0]) * qg.sum(-1)
        h = qg.mul_(1 - a).sub_(p * a) if want_grad else None
    if not want_grad:
        return value, None
    return value, h.sub_(q * h.sum(-1, keepdim=True))


def _xlogy_sum(a: torch.Tensor, log_a: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """sum_v A_v diff_v, with the terms where A = 0 counted as 0 (diff may be NaN or inf there)."""
    return torch.where(log_a > -math.inf, a * diff, torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1)


class _FusedPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, mask, kind, weight, temperature, head):
        vocab = student_logits.shape[-1]
        s_rows, t_rows = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        rows = mask.reshape(-1).bool().nonzero().squeeze(1)
        want_grad = ctx.needs_input_grad[0]
        dtype = torch.promote_types(torch.promote_types(s_rows.dtype, t_rows.dtype), torch.float32)
        per_row = None
        if isinstance(weight, torch.Tensor):  # one per sequence: to each of its positions
            per_row = weight.to(dtype).reshape(-1, 1).expand(mask.shape).reshape(-1)[rows]
        values = s_rows.new_zeros(len(s_rows), dtype=dtype)
        grads = s_rows.new_empty((len(rows), vocab), dtype=dtype) if want_grad else None
        block_elements = _BLOCK_ELEMENTS if s_rows.device.type == "cpu" else _ACCELERATOR_BLOCK_ELEMENTS
        step = max(1, block_elements // vocab)
        for i in range(0, len(rows), step):
            block = rows[i: i + step]
            w = weight if per_row is None else per_row[i: i + step, None]
            value, grad = _rows(s_rows[block], t_rows[block], kind, w, temperature, head, want_grad)
            values[block] = value
            if want_grad:
                grads[i: i + step] = grad
        if want_grad:
            ctx.save_for_backward(grads, rows)
            ctx.shape, ctx.dtype, ctx.temperature = student_logits.shape, student_logits.dtype, temperature
        return values.view(mask.shape)

    @staticmethod
    def backward(ctx, grad_out):
        grads, rows = ctx.saved_tensors
        vocab = ctx.shape[-1]
        # d value_row / ds = (1 / tau) dL/dz; each row scaled by its own incoming gradient (a new tensor: the saved
        # one stays for a second backward).
        grads = grads * (grad_out.reshape(-1)[rows].to(grads.dtype) / ctx.temperature)[:, None]
        n = ctx.shape.numel() // vocab
        full = grads if len(rows) == n else grads.new_zeros((n, vocab)).index_copy_(0, rows, grads)
        return full.reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None, None


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_positions 0.5 sum_v |P - Q|."""
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    return _masked_mean(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), mask)


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    alpha: float = 0.1) -> torch.Tensor:
    """mean_positions KL(P || alpha P + (1 - alpha) Q): DistiLLM's SKL."""
    if _fusable(teacher_logits):
        _check_weight(alpha)
        return _masked_mean(fused_positions(student_logits, teacher_logits, mask, "skl", float(alpha)), mask)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    return _masked_mean(_kl(log_p, _log_mix(log_p, log_q, alpha)), mask)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    alpha: float = 0.1) -> torch.Tensor:
    """mean_positions KL(Q || (1 - alpha) P + alpha Q): DistiLLM's SRKL."""
    if _fusable(teacher_logits):
        _check_weight(alpha)
        return _masked_mean(fused_positions(student_logits, teacher_logits, mask, "srkl", float(alpha)), mask)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    return _masked_mean(_kl(log_q, _log_mix(log_p, log_q, 1 - alpha)), mask)


AKL_HEAD_RULES = ("official", "crossing")


# Candidates for AKL's head: where a row's head ends among its top 64 probabilities, sorting those settles it.
HEAD_CANDIDATES = 64


def _head_mask(p: torch.Tensor, mu: float, head: str = "official") -> torch.Tensor:
    """Bool [..., V]: AKL's head, the top-P tokens chosen by rule `head` (see `adaptive_kl`), in vocabulary order.

    The head is a prefix of the tokens sorted by descending P, ties in vocabulary order. Each row's top
    `HEAD_CANDIDATES` are sorted first; a row whose head ends among them, at a probability above the smallest of
    them (so that no token outside them ties with a head token), is settled there, and only the other rows (a flat
    distribution, or ties at the edge) sort their whole vocabulary. The same head either way."""
    if head not in AKL_HEAD_RULES:
        raise ValueError(f"head must be one of {', '.join(AKL_HEAD_RULES)}, got {head!r}")
    if p.shape[-1] <= HEAD_CANDIDATES:
        return _sorted_head(p, mu, head)
    flat = p.reshape(-1, p.shape[-1])
    values, index = flat.topk(HEAD_CANDIDATES, dim=-1)
    by_index = index.argsort(dim=-1)  # ties in vocabulary order, as the stable sort of the whole row has them
    values, index = values.gather(-1, by_index), index.gather(-1, by_index)
    values, by_value = values.sort(dim=-1, descending=True, stable=True)
    index = index.gather(-1, by_value)
    in_head = _prefix(values, mu, head)
    size = in_head.sum(-1)
    last = values.gather(-1, (size - 1).clamp(min=0)[:, None])[:, 0]
    settled = (size < HEAD_CANDIDATES) & ((size == 0) | (last > values[:, -1]))
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, index, in_head)
    if not settled.all():
        rest = (~settled).nonzero().squeeze(1)
        mask[rest] = _sorted_head(flat[rest], mu, head)
    return mask.view(p.shape)


def _sorted_head(p: torch.Tensor, mu: float, head: str) -> torch.Tensor:
    # stable: tied probabilities enter the head in vocabulary order, so the head (and w) is deterministic.
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    return torch.zeros_like(sorted_p, dtype=torch.bool).scatter(-1, order, _prefix(sorted_p, mu, head))


def _prefix(sorted_p: torch.Tensor, mu: float, head: str) -> torch.Tensor:
    """Bool, in the sorted order: which of the sorted probabilities are in the head."""
    cumulative = sorted_p.cumsum(-1)
    if head == "official":
        in_head_sorted = cumulative <= mu
        in_head_sorted[..., 0] = True
        return in_head_sorted
    # crossing: shifting the cumsum (rather than subtracting sorted_p) keeps the boundary exact: [0.4, 0.3], mu 0.4
    # -> 1.
    before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    return before < mu


def adaptive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                mu: float = 0.5, head: str = "official") -> torch.Tensor:
    """mean_positions [w FKL + (1 - w) RKL], w = g_head / (g_head + g_tail) detached (AKL, Wu et al. 2024).

    g_head = sum_head |P - Q|, g_tail = sum_rest |P - Q|. The head is a prefix of the tokens sorted by descending
    teacher probability P, ties in vocabulary order:
    - `head="official"` (wutaiqiang/LLM_KD_AKL, `get_ratio`): a token is in the head while the cumulative P up to
      and including it is <= mu (`cum_sum > mu` marks the tail there, so the boundary is inclusive); the top-1 token
      is always in the head, even when its P alone exceeds mu. The released code breaks ties in P by
      `torch.sort`'s order, which is unspecified; here it is the vocabulary order.
    - `head="crossing"` (prefkd's earlier rule): the fewest top tokens whose cumulative P >= mu, i.e. also the
      token whose cumulative P crosses mu, which the official rule leaves in the tail unless it is the top-1.
    """
    if head not in AKL_HEAD_RULES:
        raise ValueError(f"head must be one of {', '.join(AKL_HEAD_RULES)}, got {head!r}")
    if _fusable(teacher_logits):
        return _masked_mean(fused_positions(student_logits, teacher_logits, mask, "akl", float(mu), head=head), mask)
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    with torch.no_grad():
        p = log_p.exp()
        gap = (p - log_q.exp()).abs()
        in_head = _head_mask(p, mu, head)
        g_head = (gap * in_head).sum(-1)
        g_tail = (gap * ~in_head).sum(-1)
        # P == Q exactly gives 0/0; both KLs are 0 there, so any weight will do.
        w = g_head / (g_head + g_tail).clamp(min=torch.finfo(gap.dtype).tiny)
    per_position = w * _kl(log_p, log_q) + (1 - w) * _kl(log_q, log_p)
    return _masked_mean(per_position, mask)


def dpkd_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.1) -> torch.Tensor:
    """DPKD as released (LMOps): mean_positions -log sigmoid(beta h), a = argmax P, b = argmax Q,

    h = [log Q(a) - log Q(b)] - [log P(a) - log P(b)]. Positions with a == b give log 2 and zero gradient.
    """
    log_p, log_q = _log_probs(student_logits, teacher_logits, mask)
    a = log_p.argmax(-1, keepdim=True)
    b = log_q.argmax(-1, keepdim=True)
    h = (log_q.gather(-1, a) - log_q.gather(-1, b)) - (log_p.gather(-1, a) - log_p.gather(-1, b))
    return _masked_mean(-F.logsigmoid(beta * h.squeeze(-1)), mask)
