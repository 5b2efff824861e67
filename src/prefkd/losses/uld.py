"""Universal Logit Distillation, ULD (Boizard et al. 2024, arXiv 2402.12030): token-level KD between a teacher and a
student with different tokenizers. Pure functions: the loss building blocks, not a training step.

Both models read the same response text, each in its own tokens. At an aligned pair of positions the distance is

    W = sum_i | sort_desc(Q)_i - sort_desc(P)_i |,   Q = softmax(z_S / tau_S), P = softmax(z_T / tau_T),

the shorter sorted vector zero-padded to max(|V_S|, |V_T|): the closed-form Wasserstein-1 distance between the two
distributions under a uniform cost, which needs no shared vocabulary. Sorting discards token identity (W is
invariant to any permutation of either vocabulary), so the student's cross-entropy on the text is kept alongside
(`uld_loss`). Two ways to pair positions:

- `uld_positional_loss`: the t-th scored student position with the t-th scored teacher position, truncated to the
  shorter side. The official code (Nicolas-BZRD/llm-recipes, `models/distillation_model.py`, `DistillationLoss`).
- `uld_byte_aligned_loss`: groups of tokens that cover the same UTF-8 bytes of the text (`byte_span_groups`), each
  group's tokens merged into one unnormalised distribution by the chain rule (`merged_group_probs`, TRL GOLD's
  "bayesian" merge). TRL's extended ULD (`trl/experimental/gold/gold_trainer.py`, `ULDLoss`).

See docs/methods.md, "ULD: token-level KD across tokenizers", for the official defaults and where prefkd differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# The official defaults (configs/distillation.py and train/train_utils.py): CE weight 1, distil_factor 1.5.
ULD_CE_WEIGHT = 1.0
ULD_DISTANCE_WEIGHT = 1.5

Span = tuple[int, int]


def _check_temperature(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The tensors' common dtype, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """[...]: sum_i |sort_desc(q)_i - sort_desc(p)_i| over the last dim, the shorter vector zero-padded.

    Entries must be >= 0 (probabilities, or GOLD's unnormalised merged probabilities). The pad is not materialised:
    with k = min(V_S, V_T), the value is the L1 distance of the top k entries plus the sum of the longer vector's
    remaining entries (|x - 0| = x for x >= 0).
    """
    if student_probs.shape[:-1] != teacher_probs.shape[:-1]:
        raise ValueError(f"student and teacher rows differ: {tuple(student_probs.shape[:-1])} vs "
                         f"{tuple(teacher_probs.shape[:-1])}")
    q = student_probs.sort(dim=-1, descending=True).values
    p = teacher_probs.sort(dim=-1, descending=True).values
    k = min(q.shape[-1], p.shape[-1])
    head = (q[..., :k] - p[..., :k]).abs().sum(-1)
    longer = q if q.shape[-1] > k else p
    return head + longer[..., k:].sum(-1)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_temperature: float = 1.0,
                 teacher_temperature: float = 1.0) -> torch.Tensor:
    """[N]: ULD's distance at each aligned position, W = sorted_l1(softmax(z_S / tau_S), softmax(z_T / tau_T)).

    `student_logits [N, V_S]` and `teacher_logits [N, V_T]` are already paired row by row (any leading dims that
    match work). Computed in float32 at least; differentiable in both logits (the sort's backward routes each
    gradient to the entry that landed there). No tau^2 factor, as in the official code. W lies in [0, 2].
    """
    _check_temperature("student_temperature", student_temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    dtype = _float_dtype(student_logits, teacher_logits)
    q = F.softmax(student_logits.to(dtype) / student_temperature, dim=-1)
    p = F.softmax(teacher_logits.to(dtype) / teacher_temperature, dim=-1)
    return sorted_l1(q, p)


def skip_last_position(mask: torch.Tensor) -> torch.Tensor:
    """`mask [B, T]` without each row's last marked position: the official `skip_student_eos=True`, which leaves out
    the position that predicts the student's EOS. A row with no marked position stays empty."""
    m = mask.bool()
    counts = m.sum(-1, keepdim=True)
    return m & (m.cumsum(-1) < counts)


def _first_n(mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """`mask [B, T]` restricted to the first n[b] marked positions of each row."""
    m = mask.bool()
    return m & (m.cumsum(-1) <= n.unsqueeze(-1))


def uld_positional_loss(student_logits: torch.Tensor, student_mask: torch.Tensor, teacher_logits: torch.Tensor,
                        teacher_mask: torch.Tensor, student_temperature: float = 1.0,
                        teacher_temperature: float = 1.0) -> torch.Tensor:
    """ULD with the official positional alignment: mean over sequences of mean_{t <= N} W_t, N = min(n_S, n_T).

    `student_logits [B, T_S, V_S]`, `teacher_logits [B, T_T, V_T]`; the masks `[B, T_S]`, `[B, T_T]` mark the logit
    rows that are scored, in order: the t-th marked student row is paired with the t-th marked teacher row, and each
    sequence is truncated to N = min(n_S, n_T) pairs (n = its number of marked rows). A row is the logit vector that
    predicts a response token (in a causal LM, the position before that token).

    The caller decides what is scored. The official run (`train/train_utils.py`) marks the rows predicting every
    answer token, then drops the student's last one (`skip_student_eos=True`, `skip_last_position`) and keeps the
    teacher's (`skip_teacher_eos=False`).

    Per sequence the loss is the mean of W over its N pairs; the result is the mean over the sequences with N > 0.
    A sequence with N = 0 contributes nothing and is not counted (the official code would give NaN); a batch with
    none gives 0, with a gradient path. Only the paired rows are softmaxed and sorted, so unscored positions cost
    nothing and whatever they hold (NaN included) cannot leak into the value or the gradient.
    """
    s_mask, t_mask = student_mask.bool(), teacher_mask.bool()
    if s_mask.shape != student_logits.shape[:2] or t_mask.shape != teacher_logits.shape[:2]:
        raise ValueError("each mask must be [B, T] of its logits")
    if s_mask.shape[0] != t_mask.shape[0]:
        raise ValueError(f"student and teacher batches differ: {s_mask.shape[0]} vs {t_mask.shape[0]}")
    n = torch.minimum(s_mask.sum(-1), t_mask.sum(-1))
    s_keep, t_keep = _first_n(s_mask, n), _first_n(t_mask, n)
    # Boolean indexing walks row-major, so both sides list sequence 0's pairs in order, then sequence 1's, ...
    w = uld_distance(student_logits[s_keep], teacher_logits[t_keep], student_temperature, teacher_temperature)
    sequence = s_keep.nonzero()[:, 0]
    per_sequence = w.new_zeros(n.shape[0]).index_add(0, sequence, w) / n.clamp(min=1).to(w.dtype)
    live = n > 0
    return per_sequence.sum() / live.sum().clamp(min=1).to(w.dtype)


def _span_list(spans: Sequence[Span] | torch.Tensor) -> list[Span]:
    """Spans as a list of (start, end) ints (a [n, 2] tensor is accepted)."""
    rows = spans.tolist() if isinstance(spans, torch.Tensor) else spans
    return [(int(a), int(b)) for a, b in rows]


def byte_span_groups(student_spans: Sequence[Span] | torch.Tensor, teacher_spans: Sequence[Span] | torch.Tensor,
                     keep_unclosed_tail: bool = False) -> list[tuple[list[int], list[int]]]:
    """Groups of student and teacher token indices that cover the same bytes of a text (GOLD's
    `_align_by_byte_offsets`).

    `*_spans` are the (start, end) UTF-8 byte spans of each side's response tokens, relative to the same text
    (`prefkd.data.byte_spans.response_byte_spans`). Walk both lists, always advancing the side whose current token
    ends earlier; when both current tokens end at the same byte, close a group with every token passed since the
    last one. Only end bytes are read, so zero-width tokens (an EOS at (L, L)) join the group that closes next.
    Example, "hello world": student ["hel", "lo", " world"], teacher ["hello", " wor", "ld"] give
    ([0, 1], [0]) and ([2], [1, 2]).

    Tokens left after the last common boundary (the sides end at different bytes, or one side has a trailing
    zero-width token) form no group and are dropped. GOLD pairs them as a last group when both sides have some
    (`keep_unclosed_tail=True`); a group with an empty side is dropped either way.
    """
    student_spans, teacher_spans = _span_list(student_spans), _span_list(teacher_spans)
    for name, spans in (("student", student_spans), ("teacher", teacher_spans)):
        for a, b in zip(spans, spans[1:], strict=False):
            if b[1] < a[1]:
                raise ValueError(f"{name} spans must end in increasing byte order, got {a} before {b}")
    groups: list[tuple[list[int], list[int]]] = []
    s = t = s_start = t_start = 0
    while s < len(student_spans) and t < len(teacher_spans):
        s_end, t_end = student_spans[s][1], teacher_spans[t][1]
        if s_end < t_end:
            s += 1
        elif t_end < s_end:
            t += 1
        else:
            s += 1
            t += 1
            groups.append((list(range(s_start, s)), list(range(t_start, t))))
            s_start, t_start = s, t
    if keep_unclosed_tail and s_start < len(student_spans) and t_start < len(teacher_spans):
        groups.append((list(range(s_start, len(student_spans))), list(range(t_start, len(teacher_spans)))))
    return groups


def merged_group_probs(logprobs_rows: torch.Tensor, token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """[V]: GOLD's "bayesian" merge of one group of n consecutive tokens,
    P(v) = p_last(v) * prod_{j < last} p_j(tok_j) = exp(log p_last(v) + sum_{j < last} log p_j(tok_j)).

    `logprobs_rows [n, V]`: row j is the log-distribution that predicts token j (causally shifted), `token_ids [n]`
    the group's tokens (the last one is not read: its row enters whole). P(v) is the probability of the group's
    prefix followed by v, so sum_v P = prod_{j < last} p_j(tok_j), the prefix's probability (1 for a single token),
    and P(tok_last) is the probability of the whole group. Unnormalised on purpose. Computed in log space, without
    GOLD's clamp of each factor at 1e-8.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logprobs_rows.device)
    if logprobs_rows.ndim != 2 or ids.shape != logprobs_rows.shape[:1] or ids.numel() == 0:
        raise ValueError("a group needs logprobs_rows [n, V] and token_ids [n], n >= 1")
    prefix = logprobs_rows[:-1].gather(-1, ids[:-1, None]).sum()
    return (logprobs_rows[-1] + prefix).exp()


def _merge_groups(logprobs: torch.Tensor, token_ids: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """[K, V]: `merged_group_probs` of every group at once; each group is a run of consecutive indices."""
    last = torch.tensor([g[-1] for g in groups], dtype=torch.long, device=logprobs.device)
    # Each non-last token adds its own log-prob to its group: a per-group sum, not a difference of running sums,
    # so long responses lose no precision.
    owner = [k for k, g in enumerate(groups) for _ in g[:-1]]
    prefix_idx = [j for g in groups for j in g[:-1]]
    prefix = logprobs.new_zeros(len(groups))
    if prefix_idx:
        idx = torch.tensor(prefix_idx, dtype=torch.long, device=logprobs.device)
        token_lp = logprobs[idx].gather(-1, token_ids[idx].unsqueeze(-1)).squeeze(-1)
        prefix = prefix.index_add(0, torch.tensor(owner, dtype=torch.long, device=logprobs.device), token_lp)
    return (logprobs[last] + prefix.unsqueeze(-1)).exp()


def uld_byte_aligned_loss(student_logits: Sequence[torch.Tensor], student_ids: Sequence[torch.Tensor | Sequence[int]],
                          student_spans: Sequence[Sequence[Span]], teacher_logits: Sequence[torch.Tensor],
                          teacher_ids: Sequence[torch.Tensor | Sequence[int]], teacher_spans: Sequence[Sequence[Span]],
                          student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                          keep_unclosed_tail: bool = False) -> torch.Tensor:
    """ULD with GOLD's byte-span alignment and "bayesian" merge: mean over sequences of
    (1/K) sum_k sorted_l1(P^S_k, P^T_k).

    One entry per sequence on each side, for the response tokens that take part (the caller drops an EOS to skip):
    - `*_logits[i]` `[n_i, V]`: row j is the logit vector that predicts token j of the response (causally shifted:
      the model's output at the position before token j);
    - `*_ids[i]` `[n_i]`: the response's token ids;
    - `*_spans[i]`: their UTF-8 byte spans in the response text (`response_byte_spans`; an appended EOS is (L, L)).

    Per sequence: the groups of `byte_span_groups`; on each side, each group's tokens merged with p = softmax(z / tau)
    into P_k(v) = p_last(v) prod_{j < last} p_j(tok_j) (`merged_group_probs`, unnormalised); the sorted L1 distance
    between P^S_k and P^T_k (zero-padded); the mean over the K groups. The result is the mean over the sequences with
    K > 0; a sequence with no group is not counted (GOLD counts it as 0), and a batch with none gives 0.
    """
    _check_temperature("student_temperature", student_temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    sides = (student_logits, student_ids, student_spans, teacher_logits, teacher_ids, teacher_spans)
    if len({len(x) for x in sides}) != 1:
        raise ValueError(f"one entry per sequence on each side, got lengths {[len(x) for x in sides]}")
    per_sequence = []
    anchor = None  # a zero that depends on the student logits, for a batch where nothing aligns
    for z_s, ids_s, sp_s, z_t, ids_t, sp_t in zip(*sides, strict=True):
        dtype = _float_dtype(z_s, z_t)
        if anchor is None:
            anchor = z_s.to(dtype).sum() * 0
        for z, ids, spans, side in ((z_s, ids_s, sp_s, "student"), (z_t, ids_t, sp_t, "teacher")):
            if z.ndim != 2 or len(ids) != z.shape[0] or len(spans) != z.shape[0]:
                raise ValueError(f"{side}: logits [n, V], ids [n] and spans [n] must agree, got "
                                 f"{tuple(z.shape)}, {len(ids)}, {len(spans)}")
        groups = byte_span_groups(sp_s, sp_t, keep_unclosed_tail)
        if not groups:
            continue
        merged = []
        for z, ids, tau, which in ((z_s, ids_s, student_temperature, 0), (z_t, ids_t, teacher_temperature, 1)):
            logprobs = F.log_softmax(z.to(dtype) / tau, dim=-1)
            ids = torch.as_tensor(ids, dtype=torch.long, device=z.device)
            merged.append(_merge_groups(logprobs, ids, [g[which] for g in groups]))
        per_sequence.append(sorted_l1(merged[0], merged[1]).mean())
    if not per_sequence:
        if anchor is None:
            raise ValueError("no sequences")
        return anchor
    return torch.stack(per_sequence).mean()


def uld_loss(ce: torch.Tensor, distance: torch.Tensor, ce_weight: float = ULD_CE_WEIGHT,
             distance_weight: float = ULD_DISTANCE_WEIGHT) -> torch.Tensor:
    """ULD's total loss: ce_weight * CE + distance_weight * distance.

    `ce` is the student's token-mean cross-entropy on the response in its own tokens (`prefkd.logprobs.token_mean_nll`;
    the official code uses the HF model loss), `distance` a ULD term (`uld_positional_loss` or
    `uld_byte_aligned_loss`). The defaults are the official ones: CE weight 1 (the `DistillationLoss` default; the
    config's `cross_entropy_factor` is not passed to it) and `distil_factor` 1.5. TRL's GOLD defaults to CE weight 0
    and distance weight 1: without the CE term nothing anchors token identity.
    """
    return ce_weight * ce + distance_weight * distance
