"""A teacher known only by its top-k next-token log-probs (offline teacher logits), as inputs of the divergences.

What is known at a position: the ids S of the teacher's k most probable tokens, their log-probabilities log p_i
(the teacher's log-softmax over its whole vocabulary, temperature 1) and log m, m = sum_{j not in S} p_j, the mass of
the rest (the tail). The divergences of `divergences.py` compare two distributions given as logits; here both are
given on k + 1 categories, the k tokens of S and one bucket for every other token, so that
`log_softmax(x / tau)` of the returned tensors is:

- the student: Q_tau(i) for i in S and Q_tau(tail) = sum_{j not in S} Q_tau(j), Q_tau = softmax(student / tau). This
  is the student's full distribution with its tail tokens merged (exact: log-softmax over the whole vocabulary,
  then a gather and a logsumexp);
- the teacher, `tail="renorm"`: P_tau(i | S) = p_i^(1/tau) / sum_{j in S} p_j^(1/tau), the teacher's tempered
  distribution conditioned on S, and 0 on the bucket. Every divergence here that stays finite (forward KL, TVD,
  skew KL, skew reverse KL, JSD) has the same value on these k + 1 categories as on the full vocabulary with
  P(j) = 0 outside S, because the terms of the tail tokens are then homogeneous in Q(j) (e.g. TVD: sum_tail |0 -
  Q(j)| = Q(tail)); reverse KL (and AKL, which mixes it in) is infinite: the student cannot put mass where the
  teacher has none, so AKL refuses this mode;
- the teacher, `tail="bucket"`: p_i for i in S and m on the bucket (renormalised, which absorbs the 16-bit rounding
  of the stored log-probs). Both distributions are coarsened to the same partition, so every divergence is that of
  the merged distributions (by the data-processing inequality, at most the full-vocabulary one). The tempered
  teacher's tail mass, sum_tail p_j^(1/tau) / Z_tau, is not known from m: this mode needs tau = 1.

Token ids the student's logits do not have (a teacher whose embedding table is padded wider) leave S: renorm drops
them, bucket adds their mass to the tail. With k = the vocabulary size the bucket is empty (-inf for both), and both
modes equal the full-vocabulary divergence (tests/test_top_k.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAIL_MODES = ("renorm", "bucket")


def coarse_logits(student_logits: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor, tail: torch.Tensor,
                  mode: str = "renorm", temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) [B, T, k + 1] for a divergence of temperature `temperature`, from the student's logits
    [B, T, V] and the teacher's top-k `ids` [B, T, k], `logps` [B, T, k] and tail log-mass `tail` [B, T].

    The student's tensor is tau * log Q_tau on the k + 1 categories, so that the divergence's own division by tau
    gives back log Q_tau; the teacher's is as the module docstring says. Gradients flow to `student_logits`."""
    if mode not in TAIL_MODES:
        raise ValueError(f"tail mode must be one of {', '.join(TAIL_MODES)}, got {mode!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode == "bucket" and temperature != 1.0:
        raise ValueError("the bucket tail mode needs temperature 1: the tempered teacher's tail mass is not known "
                         "from its mass at temperature 1")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    width = student_logits.shape[-1]
    neg_inf = torch.tensor(-math.inf, dtype=dtype, device=student_logits.device)
    valid = (ids >= 0) & (ids < width)
    safe = torch.where(valid, ids, torch.zeros_like(ids)).long()

    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    head = torch.where(valid, log_q.gather(-1, safe), neg_inf)
    # The student's tail: logsumexp over the tokens outside S. Where S covers the whole vocabulary the bucket is
    # empty; logsumexp's backward is NaN on an all -inf row, so it is fed zeros there and -inf is put back.
    covered = torch.zeros(log_q.shape, dtype=torch.int32, device=log_q.device).scatter_add(
        -1, safe, valid.to(torch.int32)) > 0
    empty = covered.all(-1)
    rest = torch.where(empty.unsqueeze(-1), torch.zeros_like(log_q), log_q.masked_fill(covered, -math.inf))
    s_tail = torch.where(empty, neg_inf, torch.logsumexp(rest, dim=-1))
    student = temperature * torch.cat([head, s_tail.unsqueeze(-1)], dim=-1)

    t_head = torch.where(valid, logps.to(dtype), neg_inf)
    if mode == "renorm":
        t_tail = neg_inf.expand(tail.shape)
    else:
        dropped = torch.logsumexp(torch.where(valid, neg_inf, logps.to(dtype)), dim=-1)  # ids the student lacks
        t_tail = torch.logaddexp(tail.to(dtype), dropped)
    teacher = torch.cat([t_head, t_tail.unsqueeze(-1)], dim=-1)
    return student, teacher.detach()
