"""ULD's building blocks against independent float64 brute forces: plain Python loops with the zero padding written
out, values derived by hand, the common-boundary definition of a byte-span group, and the chain rule written out for
the merge; gradients against torch.autograd.gradcheck."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from prefkd.data.byte_spans import response_byte_spans
from prefkd.errors import PrefkdError
from prefkd.losses import (
    byte_span_groups,
    merged_group_probs,
    skip_last_position,
    sorted_l1,
    uld_byte_aligned_loss,
    uld_distance,
    uld_loss,
    uld_positional_loss,
)

# --- brute force -----------------------------------------------------------------------------------------------


def _softmax(row, tau=1.0):
    m = max(x / tau for x in row)
    e = [math.exp(x / tau - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _w1(q, p):
    """sum_i |sort_desc(q)_i - sort_desc(p)_i| with the shorter vector padded by explicit zeros."""
    v = max(len(q), len(p))
    qs = sorted(q, reverse=True) + [0.0] * (v - len(q))
    ps = sorted(p, reverse=True) + [0.0] * (v - len(p))
    total = 0.0
    for a, b in zip(qs, ps, strict=True):
        total += abs(a - b)
    return total


def _rand(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# --- uld_distance ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_s, v_t", [(5, 7), (7, 5), (6, 6), (1, 4)])
@pytest.mark.parametrize("tau_s, tau_t", [(1.0, 1.0), (0.7, 2.0)])
def test_distance_matches_float64_brute_force(v_s, v_t, tau_s, tau_t):
    zs, zt = _rand(4, v_s, seed=1), _rand(4, v_t, seed=2)
    w = uld_distance(zs, zt, tau_s, tau_t)
    assert w.shape == (4,) and w.dtype == torch.float64
    for i in range(4):
        ref = _w1(_softmax(zs[i].tolist(), tau_s), _softmax(zt[i].tolist(), tau_t))
        assert abs(w[i].item() - ref) < 1e-12


def test_tail_sum_equals_the_padded_form():
    # Head difference + the longer side's tail = L1 of the explicitly padded sorted vectors, either side longer.
    for v_s, v_t in [(9, 4), (4, 9)]:
        zs, zt = _rand(6, v_s, seed=3).float(), _rand(6, v_t, seed=4).float()
        q = F.softmax(zs, -1).sort(-1, descending=True).values
        p = F.softmax(zt, -1).sort(-1, descending=True).values
        v = max(v_s, v_t)
        padded = (F.pad(q, (0, v - v_s)) - F.pad(p, (0, v - v_t))).abs().sum(-1)
        torch.testing.assert_close(uld_distance(zs, zt), padded, rtol=0, atol=1e-6)


def test_low_precision_logits_are_computed_in_float32():
    zs, zt = _rand(3, 5, seed=5), _rand(3, 8, seed=6)
    w = uld_distance(zs.bfloat16(), zt.bfloat16())
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, uld_distance(zs.bfloat16().float(), zt.bfloat16().float()))


def test_hand_derived_values():
    # q = [0.5, 0.5], p = [0.5, 0.3, 0.2]: |0.5 - 0.5| + |0.5 - 0.3| + |0 - 0.2| = 0.4
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    half = torch.zeros(1, 2, dtype=torch.float64)
    assert abs(uld_distance(half, p.log()).item() - 0.4) < 1e-15
    # q = [0.75, 0.25] (logits log 3, 0): |0.75 - 0.5| + |0.25 - 0.3| + 0.2 = 0.5; the teacher's order does not matter
    three_to_one = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    shuffled = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    assert abs(uld_distance(three_to_one, shuffled).item() - 0.5) < 1e-15
    # The same with the longer vocabulary on the student side.
    assert abs(uld_distance(shuffled, three_to_one).item() - 0.5) < 1e-15
    # Temperature divides the logits: z_T = 2 log p at tau_T = 2 is p again.
    assert abs(uld_distance(half, 2 * p.log(), teacher_temperature=2.0).item() - 0.4) < 1e-15
    # Disjoint certainty: one-hot vs one-hot is 0 (same shape); one-hot vs uniform over 4 is 2 * (1 - 1/4).
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=torch.float64)
    assert uld_distance(one_hot, torch.tensor([[-math.inf, 5.0]], dtype=torch.float64)).item() == 0.0
    assert abs(uld_distance(one_hot, torch.zeros(1, 4, dtype=torch.float64)).item() - 1.5) < 1e-15


def test_permuting_either_vocabulary_changes_nothing():
    zs, zt = _rand(5, 6, seed=7), _rand(5, 9, seed=8)
    w = uld_distance(zs, zt)
    torch.testing.assert_close(uld_distance(zs, zt[:, torch.randperm(9)]), w, rtol=0, atol=1e-14)
    torch.testing.assert_close(uld_distance(zs[:, torch.randperm(6)], zt), w, rtol=0, atol=1e-14)


def test_zero_when_equal_up_to_permutation():
    zs = _rand(4, 6, seed=9)
    assert uld_distance(zs, zs[:, torch.randperm(6)]).abs().max().item() < 1e-14
    # A larger teacher vocabulary whose extra tokens have probability 0: still the same distribution.
    extra = torch.full((4, 3), -math.inf, dtype=torch.float64)
    zt = torch.cat([zs, extra], dim=-1)[:, torch.randperm(9)]
    assert uld_distance(zs, zt).abs().max().item() < 1e-14


def test_distance_gradient_matches_gradcheck():
    zt = _rand(3, 7, seed=11)
    for v_s in (5, 7, 9):
        zs = _rand(3, v_s, seed=10 + v_s).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z: uld_distance(z, zt, 0.8, 1.3), (zs,))
        uld_distance(zs, zt).sum().backward()
        assert torch.isfinite(zs.grad).all()


def test_sorted_l1_on_unnormalised_vectors():
    q = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    p = torch.tensor([[0.05, 0.0, 0.2]], dtype=torch.float64)
    # sorted: [0.3, 0.1, 0] vs [0.2, 0.05, 0]
    assert abs(sorted_l1(q, p).item() - 0.15) < 1e-15
    with pytest.raises(ValueError):
        sorted_l1(q, p.expand(2, 3))


def test_bad_temperature_is_refused():
    with pytest.raises(ValueError):
        uld_distance(_rand(1, 2), _rand(1, 2), student_temperature=0.0)


# --- positional alignment --------------------------------------------------------------------------------------


def _positional_brute(zs, ms, zt, mt, tau_s=1.0, tau_t=1.0):
    per_sequence = []
    for b in range(len(zs)):
        s_rows = [zs[b][i] for i in range(len(ms[b])) if ms[b][i]]
        t_rows = [zt[b][i] for i in range(len(mt[b])) if mt[b][i]]
        n = min(len(s_rows), len(t_rows))
        if n:
            per_sequence.append(sum(_w1(_softmax(s_rows[k], tau_s), _softmax(t_rows[k], tau_t))
                                    for k in range(n)) / n)
    return sum(per_sequence) / len(per_sequence) if per_sequence else 0.0


def test_positional_pairs_the_t_th_scored_positions():
    zs, zt = _rand(3, 5, 4, seed=20), _rand(3, 6, 7, seed=21)
    ms = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    mt = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    # Sequence 0: student rows 1, 2 with teacher rows 0, 2 (student row 3 is cut: N = 2). Sequence 1: student 0, 1
    # with teacher 1, 2. Sequence 2 has no student row: N = 0, not counted.
    pairs = [[(1, 0), (2, 2)], [(0, 1), (1, 2)]]
    expected = sum(sum(uld_distance(zs[b, i:i + 1], zt[b, j:j + 1]).item() for i, j in ps) / len(ps)
                   for b, ps in enumerate(pairs)) / 2
    # Rows that are not paired may hold anything.
    zs[0, 3], zs[0, 4], zs[2] = math.nan, math.inf, math.nan
    zt[1, 3:] = math.nan
    zs.requires_grad_(True)
    loss = uld_positional_loss(zs, ms, zt, mt)
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    assert torch.isfinite(zs.grad).all()
    paired = torch.zeros(3, 5, dtype=torch.bool)
    paired[0, 1] = paired[0, 2] = paired[1, 0] = paired[1, 1] = True
    assert not zs.grad[~paired].any()


def test_positional_matches_brute_force_on_random_masks():
    rng = random.Random(0)
    zs, zt = _rand(4, 6, 5, seed=22), _rand(4, 8, 9, seed=23)
    ms = torch.tensor([[rng.random() < 0.6 for _ in range(6)] for _ in range(4)])
    mt = torch.tensor([[rng.random() < 0.5 for _ in range(8)] for _ in range(4)])
    for tau_s, tau_t in [(1.0, 1.0), (0.5, 1.5)]:
        loss = uld_positional_loss(zs, ms, zt, mt, tau_s, tau_t)
        ref = _positional_brute(zs.tolist(), ms.tolist(), zt.tolist(), mt.tolist(), tau_s, tau_t)
        assert abs(loss.item() - ref) < 1e-12


def test_positional_gradient_matches_gradcheck():
    zt = _rand(2, 4, 6, seed=25)
    ms = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    mt = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    zs = _rand(2, 4, 5, seed=24).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: uld_positional_loss(z, ms, zt, mt), (zs,))


def test_positional_with_nothing_paired_is_zero_with_a_gradient():
    zs = _rand(2, 3, 4, seed=26).requires_grad_(True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    loss = uld_positional_loss(zs, empty, _rand(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert not zs.grad.any()


def test_skip_last_position_is_the_official_skip_student_eos():
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(skip_last_position(m), expected)


# --- byte-span groups ------------------------------------------------------------------------------------------


def _spans(pieces):
    """Byte spans of consecutive pieces (str or bytes) that tile a text."""
    out, cursor = [], 0
    for piece in pieces:
        n = len(piece.encode() if isinstance(piece, str) else piece)
        out.append((cursor, cursor + n))
        cursor += n
    return out


def _groups_brute(s_spans, t_spans):
    """Groups by definition: the common end bytes c_1 < c_2 < ...; group k holds each side's tokens that end in
    (c_{k-1}, c_k]. Tokens after the last common end are in no group. (For tilings without zero-width tokens.)"""
    common = sorted({e for _, e in s_spans} & {e for _, e in t_spans})
    groups, low = [], -1
    for c in common:
        groups.append(([i for i, (_, e) in enumerate(s_spans) if low < e <= c],
                       [i for i, (_, e) in enumerate(t_spans) if low < e <= c]))
        low = c
    return groups


def test_groups_hello_world():
    s = _spans(["hel", "lo", " world"])
    t = _spans(["hello", " wor", "ld"])
    assert byte_span_groups(s, t) == [([0, 1], [0]), ([2], [1, 2])]
    assert byte_span_groups(t, s) == [([0], [0, 1]), ([1, 2], [2])]
    # Identical tokenizations: one token per group.
    assert byte_span_groups(s, s) == [([0], [0]), ([1], [1]), ([2], [2])]
    # Spans as a [n, 2] tensor work too.
    assert byte_span_groups(torch.tensor(s), torch.tensor(t)) == [([0, 1], [0]), ([2], [1, 2])]


def test_groups_on_multibyte_characters():
    # "né 日本": n(1) é(2) space(1) 日(3) 本(3) = 10 bytes.
    s = _spans(["n", "é", " 日", "本"])
    t = _spans(["né", " ", "日本"])
    assert s == [(0, 1), (1, 3), (3, 7), (7, 10)] and t == [(0, 3), (3, 4), (4, 10)]
    assert byte_span_groups(s, t) == [([0, 1], [0]), ([2, 3], [1, 2])]
    # A byte-level tokenizer that cuts é between its two bytes: no common boundary before the end.
    t_cut = _spans([b"n\xc3", b"\xa9 ", "日本".encode()])
    assert byte_span_groups(s, t_cut) == [([0, 1, 2, 3], [0, 1, 2])]
    # Both cut the same character at the same byte: that byte is a common boundary.
    s_cut = _spans([b"n\xc3", b"\xa9", " 日本"])
    assert byte_span_groups(s_cut, t_cut) == [([0], [0]), ([1, 2], [1, 2])]


def test_groups_match_the_common_boundary_definition():
    rng = random.Random(1)

    def cuts(length):
        return sorted(rng.sample(range(1, length), rng.randint(0, length - 1)))

    for _ in range(200):
        length = rng.randint(1, 30)
        s_ends, t_ends = [*cuts(length), length], [*cuts(length), length]
        if rng.random() < 0.3:  # a side that stops early: the tail after the last common end is dropped
            t_ends = t_ends[:rng.randint(1, len(t_ends))]
        s = list(zip([0, *s_ends[:-1]], s_ends, strict=True))
        t = list(zip([0, *t_ends[:-1]], t_ends, strict=True))
        assert byte_span_groups(s, t) == _groups_brute(s, t)


def test_unclosed_tail_and_zero_width_eos():
    s = _spans(["ab", "c"])  # ends 2, 3
    t = _spans(["a", "bcd"])  # ends 1, 4: the sides never meet after byte 2
    assert byte_span_groups(s, t) == []
    assert byte_span_groups(s, t, keep_unclosed_tail=True) == [([0, 1], [0, 1])]  # GOLD pairs the leftovers
    # The teacher's EOS at (L, L) with the student's EOS skipped: a group with an empty side, dropped either way.
    t_eos = [*_spans(["a", "bc"]), (3, 3)]
    assert byte_span_groups(s, t_eos) == [([0, 1], [0, 1])]
    assert byte_span_groups(s, t_eos, keep_unclosed_tail=True) == [([0, 1], [0, 1])]
    # Both EOS at (L, L): they form their own last group.
    assert byte_span_groups([*s, (3, 3)], t_eos) == [([0, 1], [0, 1]), ([2], [2])]


def test_groups_refuse_spans_out_of_order():
    with pytest.raises(ValueError):
        byte_span_groups([(0, 3), (1, 2)], [(0, 3)])


# --- the bayesian merge ----------------------------------------------------------------------------------------


def test_bayesian_merge_is_the_chain_rule():
    logprobs = torch.log_softmax(_rand(3, 4, seed=30), dim=-1)
    ids = [2, 0, 3]
    merged = merged_group_probs(logprobs, ids)
    p = logprobs.exp().tolist()
    prefix = p[0][2] * p[1][0]  # p_0(tok_0) p_1(tok_1); tok_2 is not read
    for v in range(4):
        assert abs(merged[v].item() - prefix * p[2][v]) < 1e-15
    # P(v) is the probability of (tok_0, tok_1, v): at v = tok_2 the group's whole chain-rule probability.
    assert abs(merged[3].item() - math.exp(sum(logprobs[j, ids[j]].item() for j in range(3)))) < 1e-15
    # Its mass is the probability of the prefix.
    assert abs(merged.sum().item() - prefix) < 1e-15
    # One token: its own distribution; the id is not read.
    torch.testing.assert_close(merged_group_probs(logprobs[1:2], [0]), logprobs[1].exp())
    with pytest.raises(ValueError):
        merged_group_probs(logprobs, [1, 2])


# --- byte-aligned loss -----------------------------------------------------------------------------------------


def _byte_aligned_brute(s_logits, s_ids, s_spans, t_logits, t_ids, t_spans, tau_s=1.0, tau_t=1.0):
    per_sequence = []
    for zs, ids_s, sp_s, zt, ids_t, sp_t in zip(s_logits, s_ids, s_spans, t_logits, t_ids, t_spans, strict=True):
        groups = _groups_brute(sp_s, sp_t)
        if not groups:
            continue

        def merge(rows, ids, group, tau):
            probs = [_softmax(rows[j], tau) for j in group]
            prefix = 1.0
            for k, j in enumerate(group[:-1]):
                prefix *= probs[k][ids[j]]
            return [prefix * x for x in probs[-1]]

        dists = [_w1(merge(zs, ids_s, gs, tau_s), merge(zt, ids_t, gt, tau_t)) for gs, gt in groups]
        per_sequence.append(sum(dists) / len(dists))
    return sum(per_sequence) / len(per_sequence)


def _byte_aligned_batch(seed=40):
    g = torch.Generator().manual_seed(seed)
    # Three responses, each in two tokenizations; in the third the sides cover different texts ("abc", "abcd") and
    # never share a boundary, so it has no group and is not counted.
    student = [["hel", "lo", " world"], ["n", "é", " 日", "本"], ["ab", "c"]]
    teacher = [["hello", " wor", "ld"], ["né", " ", "日本"], ["a", "bcd"]]
    v_s, v_t = 5, 7
    batch = {k: [] for k in ("s_logits", "s_ids", "s_spans", "t_logits", "t_ids", "t_spans")}
    for pieces, side, v in ((student, "s", v_s), (teacher, "t", v_t)):
        for seq in pieces:
            batch[f"{side}_logits"].append(torch.randn(len(seq), v, generator=g, dtype=torch.float64) * 2)
            batch[f"{side}_ids"].append(torch.randint(0, v, (len(seq),), generator=g))
            batch[f"{side}_spans"].append(_spans(seq))
    return batch


def _call(batch, s_logits=None, **kw):
    return uld_byte_aligned_loss(batch["s_logits"] if s_logits is None else s_logits, batch["s_ids"],
                                 batch["s_spans"], batch["t_logits"], batch["t_ids"], batch["t_spans"], **kw)


def test_byte_aligned_loss_matches_a_loop_implementation():
    batch = _byte_aligned_batch()
    lists = {k: [x.tolist() if isinstance(x, torch.Tensor) else x for x in v] for k, v in batch.items()}
    for tau_s, tau_t in [(1.0, 1.0), (0.6, 1.7)]:
        loss = _call(batch, student_temperature=tau_s, teacher_temperature=tau_t)
        ref = _byte_aligned_brute(lists["s_logits"], lists["s_ids"], lists["s_spans"], lists["t_logits"],
                                  lists["t_ids"], lists["t_spans"], tau_s, tau_t)
        assert abs(loss.item() - ref) < 1e-12


def test_byte_aligned_with_one_token_per_group_is_the_positional_distance():
    zs, zt = _rand(4, 5, seed=41), _rand(4, 8, seed=42)
    spans = _spans(["a", "bc", "d", "ef"])
    ids = [0, 1, 2, 3]
    loss = uld_byte_aligned_loss([zs], [ids], [spans], [zt], [ids], [spans])
    assert abs(loss.item() - uld_distance(zs, zt).mean().item()) < 1e-14


def test_byte_aligned_gradient_matches_gradcheck():
    batch = _byte_aligned_batch(seed=43)
    sizes = [z.shape[0] for z in batch["s_logits"]]
    flat = torch.cat(batch["s_logits"]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: _call(batch, list(z.split(sizes))), (flat,))


def test_byte_aligned_with_nothing_aligned_is_zero():
    zs = _rand(2, 4, seed=44).requires_grad_(True)
    loss = uld_byte_aligned_loss([zs], [[0, 1]], [_spans(["ab", "c"])], [_rand(2, 5)], [[0, 1]],
                                 [_spans(["a", "bcd"])])
    assert loss.item() == 0.0
    loss.backward()
    assert not zs.grad.any()
    with pytest.raises(ValueError):
        uld_byte_aligned_loss([zs], [[0]], [_spans(["ab", "c"])], [_rand(2, 5)], [[0, 1]], [_spans(["a", "bcd"])])


def test_uld_loss_official_weights():
    ce, dist = torch.tensor(2.0), torch.tensor(0.4)
    assert abs(uld_loss(ce, dist).item() - (2.0 + 1.5 * 0.4)) < 1e-6
    assert abs(uld_loss(ce, dist, ce_weight=0.0, distance_weight=1.0).item() - 0.4) < 1e-7


# --- byte spans of a response's tokens ------------------------------------------------------------------------

_TEXTS = ["hello world, héllo wörld — naïve café 日本語 テキスト 🙂 ok"] * 3 + ["plain ascii text here and there"] * 3


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from prefkd.models import train_tokenizer

    return train_tokenizer(_TEXTS, vocab_size=300)


@pytest.mark.parametrize("text", ["héllo wörld", "日本語 テキスト 🙂🙂 ", "café naïve — x", "plain",
                                  "a<|endoftext|>b ü"])
def test_response_byte_spans_on_non_ascii_text(byte_level_tokenizer, text):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from prefkd.logprobs import text_ids

    tok = byte_level_tokenizer
    ids, spans = response_byte_spans(tok, text)
    raw = text.encode()
    assert ids == text_ids(tok, text)
    # The spans tile the text's bytes, in order.
    assert spans[0][0] == 0 and spans[-1][1] == len(raw)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    # Each span holds exactly the bytes of its token (transformers' own byte-level table decodes the token).
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    for token, (a, b) in zip(tok.convert_ids_to_tokens(ids), spans, strict=True):
        assert raw[a:b] == bytes(decoder[c] for c in token)
    # A prefix of tokens that ends on a character boundary decodes to the text up to that byte.
    for k, (_, end) in enumerate(spans, start=1):
        try:
            prefix = raw[:end].decode()
        except UnicodeDecodeError:
            continue
        assert tok.decode(ids[:k]) == prefix


def test_response_byte_spans_splits_characters_cut_between_tokens(byte_level_tokenizer):
    # With 300 tokens, the CJK characters are cut between byte tokens; the raw character offsets overlap there.
    text = "日本語 🙂"
    ids, spans = response_byte_spans(byte_level_tokenizer, text)
    offsets = byte_level_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(b[0] < a[1] for a, b in zip(offsets, offsets[1:], strict=False))
    raw = text.encode()
    assert any(not _is_utf8(raw[a:b]) for a, b in spans)
    assert b"".join(raw[a:b] for a, b in spans) == raw


@pytest.mark.parametrize("prefix_space", [False, True])
def test_response_byte_spans_undoes_trimmed_offsets_and_prefix_spaces(prefix_space):
    from tokenizers import pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from prefkd.models import train_tokenizer

    tok = train_tokenizer(_TEXTS, vocab_size=300)
    # Offsets trimmed of whitespace (RoBERTa's post-processor): a lone space token reports no characters and
    # " w" reports only "w".
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    if prefix_space:  # the tokenizer adds a space before the text, which is not in it
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    text = "hello  world, café  🙂 x"
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(a == b for a, b in offsets)
    ids, spans = response_byte_spans(tok, text)
    raw = text.encode()
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    pieces = [bytes(decoder[c] for c in t) for t in tok.convert_ids_to_tokens(ids)]
    if prefix_space:
        assert pieces[0].startswith(b" ") and not text.startswith(" ")
        pieces[0] = pieces[0][1:]
    assert [raw[a:b] for a, b in spans] == pieces
    assert b"".join(pieces) == raw and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def _is_utf8(data):
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_response_byte_spans_converts_character_offsets_to_bytes():
    # A word-level tokenizer (not byte-level): the spans are its character offsets turned into byte offsets.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "héllo": 1, "wörld": 2, "日本": 3, "!": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    ids, spans = response_byte_spans(tok, "héllo wörld 日本!")
    assert ids == [1, 2, 3, 4]
    # h é(2) l l o = 6 bytes; space; w ö(2) r l d = 6; space; 日本 = 6; ! = 1
    assert spans == [(0, 6), (7, 13), (14, 20), (20, 21)]
    # The two tokenizations group as the text says.
    other = _spans(["hé", "llo", " wörld", " 日", "本!"])
    assert byte_span_groups(spans, other) == [([0], [0, 1]), ([1], [2]), ([2, 3], [3, 4])]


def test_response_byte_spans_needs_a_fast_tokenizer():
    class Slow:
        is_fast = False

    with pytest.raises(PrefkdError):
        response_byte_spans(Slow(), "x")
