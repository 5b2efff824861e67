import math
import warnings

import numpy as np
import pytest
import torch

from prefkd.losses import (
    adaptive_kl,
    divergences,
    dpkd_token_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from prefkd.losses.divergences import _head_mask

# ---------------------------------------------------------------- float64 brute force, written independently


def _softmax(row):
    row = np.asarray(row, dtype=np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


def _kl(a, b):
    total = 0.0
    for a_v, b_v in zip(a, b, strict=True):
        if a_v > 0:
            total += a_v * (math.log(a_v) - math.log(b_v))
    return total


def _fkl(p, q):
    return _kl(p, q)


def _rkl(p, q):
    return _kl(q, p)


def _gjsd(beta):
    def f(p, q):
        if beta == 0:
            return _kl(p, q)
        if beta == 1:
            return _kl(q, p)
        m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q, strict=True)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return f


def _tv(p, q):
    return 0.5 * sum(abs(pv - qv) for pv, qv in zip(p, q, strict=True))


def _skl(alpha):
    return lambda p, q: _kl(p, [alpha * pv + (1 - alpha) * qv for pv, qv in zip(p, q, strict=True)])


def _srkl(alpha):
    return lambda p, q: _kl(q, [(1 - alpha) * pv + alpha * qv for pv, qv in zip(p, q, strict=True)])


def _akl(mu, head="official"):
    def f(p, q):
        in_head, cumulative = set(), 0.0
        # Python's sort is stable: tied probabilities in vocabulary order.
        for rank, v in enumerate(sorted(range(len(p)), key=lambda i: -p[i])):
            if head == "official":
                # LLM_KD_AKL: the tail is `cum_sum > mu`, cumulative *including* the token; the top-1 is never tail.
                cumulative += p[v]
                if rank > 0 and cumulative > mu:
                    break
            else:
                # crossing: take tokens until the mass before the next one already reaches mu.
                if cumulative >= mu:
                    break
                cumulative += p[v]
            in_head.add(v)
        g_head = sum(abs(p[v] - q[v]) for v in in_head)
        g_tail = sum(abs(p[v] - q[v]) for v in range(len(p)) if v not in in_head)
        w = g_head / (g_head + g_tail)
        return w * _kl(p, q) + (1 - w) * _kl(q, p)
    return f


def _dpkd_token(beta):
    def f(p, q):
        a, b = int(np.argmax(p)), int(np.argmax(q))
        h = (math.log(q[a]) - math.log(q[b])) - (math.log(p[a]) - math.log(p[b]))
        return math.log1p(math.exp(-beta * h))
    return f


def _brute(per_position, student, teacher, mask, temperature=1.0):
    s, t, m = student.double().numpy(), teacher.double().numpy(), mask.bool().numpy()
    values = []
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                values.append(per_position(_softmax(t[i, j] / temperature), _softmax(s[i, j] / temperature)))
    return temperature ** 2 * sum(values) / len(values)


# ---------------------------------------------------------------- fixtures


def _inputs(seed=0, b=3, t=6, v=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * scale
    teacher = torch.randn(b, t, v, generator=g) * scale
    # Right padding (rows of length 6, 4, 2) plus a masked prompt position inside row 0.
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    return student, teacher, mask


def _with_garbage(logits, mask):
    """Masked-out positions filled with 1e4, -inf, NaN and huge negative values, cycling."""
    out = logits.clone()
    fills = [1e4, -math.inf, math.nan, -1e30]
    k = 0
    for i, j in (~mask.bool()).nonzero().tolist():
        out[i, j] = fills[k % len(fills)]
        out[i, j, k % out.shape[-1]] = -math.inf if k % 2 else 1e4
        k += 1
    return out


CASES = [
    ("forward_kl", lambda s, t, m: forward_kl(s, t, m), _fkl),
    ("reverse_kl", lambda s, t, m: reverse_kl(s, t, m), _rkl),
    ("gjsd_0.3", lambda s, t, m: generalized_jsd(s, t, m, beta=0.3), _gjsd(0.3)),
    ("gjsd_0", lambda s, t, m: generalized_jsd(s, t, m, beta=0.0), _gjsd(0.0)),
    ("gjsd_1", lambda s, t, m: generalized_jsd(s, t, m, beta=1.0), _gjsd(1.0)),
    ("tv", lambda s, t, m: total_variation(s, t, m), _tv),
    ("skl", lambda s, t, m: skew_forward_kl(s, t, m), _skl(0.1)),
    ("skl_0.4", lambda s, t, m: skew_forward_kl(s, t, m, alpha=0.4), _skl(0.4)),
    ("srkl", lambda s, t, m: skew_reverse_kl(s, t, m), _srkl(0.1)),
    ("srkl_0.4", lambda s, t, m: skew_reverse_kl(s, t, m, alpha=0.4), _srkl(0.4)),
    ("akl", lambda s, t, m: adaptive_kl(s, t, m), _akl(0.5)),
    ("akl_0.8", lambda s, t, m: adaptive_kl(s, t, m, mu=0.8), _akl(0.8)),
    ("akl_crossing", lambda s, t, m: adaptive_kl(s, t, m, head="crossing"), _akl(0.5, "crossing")),
    ("akl_crossing_0.8", lambda s, t, m: adaptive_kl(s, t, m, mu=0.8, head="crossing"), _akl(0.8, "crossing")),
    ("dpkd_token", lambda s, t, m: dpkd_token_loss(s, t, m), _dpkd_token(0.1)),
    ("dpkd_token_1", lambda s, t, m: dpkd_token_loss(s, t, m, beta=1.0), _dpkd_token(1.0)),
]


@pytest.mark.parametrize("name,fn,ref", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_brute_force(name, fn, ref):
    for seed in (0, 1):
        student, teacher, mask = _inputs(seed)
        expected = _brute(ref, student, teacher, mask)
        got = fn(student, teacher, mask)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert abs(got.item() - expected) < 1e-5 * max(1.0, abs(expected)), (name, got.item(), expected)
        # float64 inputs stay float64: tight agreement.
        got64 = fn(student.double(), teacher.double(), mask.bool())
        assert got64.dtype == torch.float64
        assert abs(got64.item() - expected) < 1e-10 * max(1.0, abs(expected)), (name, got64.item(), expected)


# A teacher without gradient (as in training) takes the fused path; with one, autograd's.
@pytest.mark.parametrize("teacher_grad", [True, False])
@pytest.mark.parametrize("name,fn,ref", CASES, ids=[c[0] for c in CASES])
def test_masked_garbage_is_ignored(name, fn, ref, teacher_grad):
    student, teacher, mask = _inputs(2)
    clean = fn(student, teacher, mask)
    s_bad = _with_garbage(student, mask).requires_grad_()
    t_bad = _with_garbage(teacher, mask).requires_grad_(teacher_grad)
    dirty = fn(s_bad, t_bad, mask)
    assert torch.isfinite(dirty)
    assert abs(dirty.item() - clean.item()) < 1e-6 * max(1.0, abs(clean.item()))
    assert abs(dirty.item() - _brute(ref, student, teacher, mask)) < 1e-5 * max(1.0, abs(clean.item()))
    dirty.backward()
    for grad in (s_bad.grad, t_bad.grad) if teacher_grad else (s_bad.grad,):
        assert torch.isfinite(grad).all()
        assert (grad[~mask.bool()] == 0).all()


def test_half_precision_inputs_are_upcast():
    student, teacher, mask = _inputs(3)
    got = forward_kl(student.bfloat16(), teacher.bfloat16(), mask)
    assert got.dtype == torch.float32
    expected = _brute(_fkl, student.bfloat16().float(), teacher.bfloat16().float(), mask)
    assert abs(got.item() - expected) < 1e-5 * max(1.0, expected)


@pytest.mark.parametrize("teacher_grad", [True, False])
def test_shared_minus_inf_vocab_entries_are_zero_probability(teacher_grad):
    """-inf logits in both models (e.g. padded vocabulary) at counted positions: 0 log 0 = 0, finite gradients."""
    student, teacher, mask = _inputs(4)
    student[..., -2:] = -math.inf
    teacher[..., -2:] = -math.inf
    for name, fn, ref in CASES:
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_(teacher_grad)
        got = fn(s, t, mask)
        expected = _brute(ref, student[..., :-2], teacher[..., :-2], mask)
        assert abs(got.item() - expected) < 1e-5 * max(1.0, abs(expected)), name
        got.backward()
        assert torch.isfinite(s.grad).all(), name
        assert (s.grad[..., -2:] == 0).all(), name
        assert not teacher_grad or torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
def test_temperature_scales_by_tau_squared(temperature):
    student, teacher, mask = _inputs(5)
    for fn, ref in ((forward_kl, _fkl), (reverse_kl, _rkl)):
        expected = _brute(ref, student, teacher, mask, temperature=temperature)
        got = fn(student.double(), teacher.double(), mask, temperature=temperature)
        assert abs(got.item() - expected) < 1e-10 * max(1.0, expected)
        # tau^2 times the divergence of the softened distributions.
        unscaled = fn(student.double() / temperature, teacher.double() / temperature, mask)
        assert abs(got.item() - temperature ** 2 * unscaled.item()) < 1e-10 * max(1.0, got.item())
    for beta in (0.0, 0.5, 1.0):
        expected = _brute(_gjsd(beta), student, teacher, mask, temperature=temperature)
        got = generalized_jsd(student.double(), teacher.double(), mask, beta=beta, temperature=temperature)
        assert abs(got.item() - expected) < 1e-10 * max(1.0, expected)


def test_gjsd_endpoints_are_forward_and_reverse_kl():
    student, teacher, mask = _inputs(6)
    assert generalized_jsd(student, teacher, mask, beta=0.0).item() == forward_kl(student, teacher, mask).item()
    assert generalized_jsd(student, teacher, mask, beta=1.0).item() == reverse_kl(student, teacher, mask).item()
    with pytest.raises(ValueError):
        generalized_jsd(student, teacher, mask, beta=1.5)


def test_identical_distributions_give_zero():
    student, _, mask = _inputs(7)
    for name, fn, _ in CASES:
        got = fn(student, student.clone(), mask).item()
        if name.startswith("dpkd_token"):
            assert abs(got - math.log(2)) < 1e-6
        else:
            assert abs(got) < 1e-6, name


def test_all_masked_batch_is_zero_not_nan():
    student, teacher, _ = _inputs(8)
    mask = torch.zeros(student.shape[:2], dtype=torch.bool)
    for name, fn, _ in CASES:
        assert fn(student, teacher, mask).item() == 0.0, name


# ---------------------------------------------------------------- TRL


def _trl_generalized_jsd_loss():
    # An import failure here must fail the test, not skip it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gjsd_matches_trl(beta, temperature):
    """TRL 1.16 `GKDTrainer.generalized_jsd_loss`: positions with labels == -100 are dropped, and "batchmean" with
    labels divides the summed divergence by the number of counted positions (mask.sum()). It applies no tau^2."""
    trl_loss = _trl_generalized_jsd_loss()
    student, teacher, mask = _inputs(9)
    labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    trl_sum = trl_loss(student.double(), teacher.double(), labels=labels, beta=beta, temperature=temperature,
                       reduction="sum")
    trl_batchmean = trl_loss(student.double(), teacher.double(), labels=labels, beta=beta, temperature=temperature,
                             reduction="batchmean")
    n = int(mask.sum())
    assert abs(trl_batchmean.item() - trl_sum.item() / n) < 1e-12
    ours = generalized_jsd(student.double(), teacher.double(), mask, beta=beta, temperature=temperature)
    expected = temperature ** 2 * trl_sum.item() / n
    assert abs(ours.item() - expected) < 1e-10 * max(1.0, expected)
    ours32 = generalized_jsd(student, teacher, mask, beta=beta, temperature=temperature)
    assert abs(ours32.item() - expected) < 1e-5 * max(1.0, expected)


# ---------------------------------------------------------------- gradients


GRADCHECK = [
    lambda s, t, m: forward_kl(s, t, m),
    lambda s, t, m: forward_kl(s, t, m, temperature=2.0),
    lambda s, t, m: reverse_kl(s, t, m),
    lambda s, t, m: reverse_kl(s, t, m, temperature=0.7),
    lambda s, t, m: generalized_jsd(s, t, m, beta=0.3),
    lambda s, t, m: generalized_jsd(s, t, m, beta=0.9, temperature=2.0),
    lambda s, t, m: skew_forward_kl(s, t, m),
    lambda s, t, m: skew_reverse_kl(s, t, m),
    lambda s, t, m: dpkd_token_loss(s, t, m, beta=0.5),
]


@pytest.mark.parametrize("index", range(len(GRADCHECK)))
def test_gradcheck(index):
    fn = GRADCHECK[index]
    g = torch.Generator().manual_seed(10 + index)
    student = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.autograd.gradcheck(lambda s, t: fn(s, t, mask), (student, teacher))


FUSED = [  # a teacher without gradient takes the fused path (divergences._FusedPositions)
    ("forward_kl", lambda s, t, m, tau: forward_kl(s, t, m, temperature=tau)),
    ("reverse_kl", lambda s, t, m, tau: reverse_kl(s, t, m, temperature=tau)),
    ("gjsd_0.1", lambda s, t, m, tau: generalized_jsd(s, t, m, beta=0.1, temperature=tau)),
    ("gjsd_0.5", lambda s, t, m, tau: generalized_jsd(s, t, m, beta=0.5, temperature=tau)),
    ("gjsd_0.9", lambda s, t, m, tau: generalized_jsd(s, t, m, beta=0.9, temperature=tau)),
]
# The same path without a temperature: DistiLLM's skew KLs and AKL (its head weight held constant, as in autograd's).
FUSED_UNTEMPERED = [
    ("skl", lambda s, t, m, tau: skew_forward_kl(s, t, m)),
    ("skl_0.6", lambda s, t, m, tau: skew_forward_kl(s, t, m, alpha=0.6)),
    ("skl_0", lambda s, t, m, tau: skew_forward_kl(s, t, m, alpha=0.0)),
    ("srkl", lambda s, t, m, tau: skew_reverse_kl(s, t, m)),
    ("srkl_0.6", lambda s, t, m, tau: skew_reverse_kl(s, t, m, alpha=0.6)),
    ("akl", lambda s, t, m, tau: adaptive_kl(s, t, m)),
    ("akl_crossing_0.8", lambda s, t, m, tau: adaptive_kl(s, t, m, mu=0.8, head="crossing")),
]
# AKL is left out of the finite differences: they would move its detached weight too.
FUSED_CASES = ([(name, fn, tau) for name, fn in FUSED for tau in (1.0, 0.7, 2.0)]
               + [(name, fn, 1.0) for name, fn in FUSED_UNTEMPERED if not name.startswith("akl")])


def _through_fused(loss: torch.Tensor) -> bool:
    """Whether the autograd graph of `loss` holds the fused node (divergences._FusedPositions)."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Fused" in type(node).__name__:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize("name,fn,temperature", FUSED_CASES, ids=[f"{c[0]}-tau{c[2]}" for c in FUSED_CASES])
def test_fused_gradcheck(name, fn, temperature):
    """The closed-form gradient of the fused path against finite differences, in float64."""
    g = torch.Generator().manual_seed(20)
    student = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, mask, temperature), (student,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,fn", FUSED + FUSED_UNTEMPERED, ids=[c[0] for c in FUSED + FUSED_UNTEMPERED])
def test_fused_path_equals_the_autograd_expressions(name, fn, dtype, monkeypatch):
    """Value and student gradient of the fused path, computed one row or several rows a block, against autograd
    through the same formulas (the path a teacher with a gradient takes)."""
    g = torch.Generator().manual_seed(21)
    student = (torch.randn(3, 7, 300, generator=g, dtype=torch.float64) * 4).to(dtype)
    teacher = (torch.randn(3, 7, 300, generator=g, dtype=torch.float64) * 4).to(dtype)
    student[..., :3] = -math.inf  # a padded vocabulary
    teacher[..., :3] = -math.inf
    mask = torch.rand(3, 7, generator=g) > 0.3
    s = student.clone().requires_grad_()
    want = fn(s, teacher.clone().requires_grad_(), mask, 1.5)
    (want_grad,) = torch.autograd.grad(want, s)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for block in (300, 4 * 300, 2**16):  # a row, four rows, the whole batch in one block
        monkeypatch.setattr(divergences, "_BLOCK_ELEMENTS", block)
        s = student.clone().requires_grad_()
        got = fn(s, teacher, mask, 1.5)
        assert _through_fused(got)
        (got_grad,) = torch.autograd.grad(got, s)
        assert got.dtype == want.dtype and got_grad.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol)
        assert (got_grad[~mask] == 0).all() and (got_grad[..., :3] == 0).all()


def test_fused_backward_can_run_twice():
    student, teacher, mask = _inputs(11)
    s = student.requires_grad_()
    loss = generalized_jsd(s, teacher, mask, beta=0.5) * 3.0
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s)
    assert torch.equal(first, second)
    assert first.abs().sum() > 0


# ---------------------------------------------------------------- hand-built examples


def _head(p, mu, head):
    return [v for v, inside in enumerate(_head_mask(torch.tensor(p, dtype=torch.float64), mu, head).tolist()) if inside]


# Dyadic probabilities: every cumulative sum is exact, so the boundary cases test the comparison, not rounding.
# Sorted: 0.5 (token 1), 0.25 (2), 0.125 (0), 0.125 (3), cumulative 0.5, 0.75, 0.875, 1; tokens 0 and 3 tie.
DYADIC = [0.125, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("mu,expected", [
    (0.25, [1]),           # the top-1 alone exceeds mu: still the head (the released code forces it)
    (0.5, [1]),            # cumulative 0.5 <= 0.5: the boundary is inclusive
    (0.6, [1]),            # 0.75 > 0.6: the crossing token is tail
    (0.75, [1, 2]),
    (0.8, [1, 2]),
    (0.875, [0, 1, 2]),    # of the tied tokens 0 and 3, the lower vocabulary index enters first
    (1.0, [0, 1, 2, 3]),
])
def test_akl_official_head_hand_built(mu, expected):
    assert _head(DYADIC, mu, "official") == expected


@pytest.mark.parametrize("mu,expected", [
    (0.25, [1]),
    (0.5, [1]),            # 0.5 alone reaches mu exactly: nothing more is needed
    (0.6, [1, 2]),         # the token that crosses mu is head
    (0.75, [1, 2]),
    (0.8, [0, 1, 2]),      # ties again in vocabulary order
    (0.875, [0, 1, 2]),
    (1.0, [0, 1, 2, 3]),
])
def test_akl_crossing_head_hand_built(mu, expected):
    assert _head(DYADIC, mu, "crossing") == expected


@pytest.mark.parametrize("head", ["official", "crossing"])
@pytest.mark.parametrize("mu", [0.0, 0.3, 0.5, 0.8, 0.999])
def test_akl_head_from_the_top_candidates_is_the_sorted_head(head, mu, monkeypatch):
    """Rows over 300 tokens: peaked ones (head settled among the top 64), flat ones (the whole row sorted) and rows
    whose probabilities tie in blocks, at the candidates' edge too (dyadic values: exact sums). The head is the one
    the stable sort of the whole row gives, whichever way it was found."""
    g = torch.Generator().manual_seed(5)
    peaked = torch.softmax(torch.randn(40, 300, generator=g) * 6, -1)
    flat = torch.softmax(torch.randn(20, 300, generator=g) * 0.1, -1)
    tied = torch.full((6, 300), 2.0 ** -10)  # 300 equal tokens, then some mass on a few in blocks
    tied[:, :4] = 2.0 ** -3
    tied[1, 100:164] = 2.0 ** -8  # a block straddling the 64th candidate
    tied[2, 7::5] = 2.0 ** -6
    p = torch.cat([peaked, flat, tied / tied.sum(-1, keepdim=True)]).double()
    calls = []
    sorted_head = divergences._sorted_head
    monkeypatch.setattr(divergences, "_sorted_head", lambda x, *a: calls.append(len(x)) or sorted_head(x, *a))
    got = _head_mask(p, mu, head)
    assert torch.equal(got, sorted_head(p, mu, head))
    if mu >= 0.3:  # some rows settled among the candidates, some sorted whole (at mu 0 every head is settled)
        assert 0 < calls[0] < len(p)


def test_akl_head_ending_inside_a_tie_beyond_the_candidates_takes_the_lowest_token_ids():
    # 0.3 and 0.2, then 298 equal tokens: the official head at mu 0.51 takes five of them, tokens 2-6 in vocabulary
    # order, while `topk` keeps an arbitrary 62 of the 298 (on CPU, high ids): the row must be sorted whole.
    p = torch.cat([torch.tensor([0.3, 0.2]), torch.full((298,), 0.5 / 298)]).double()[None]
    assert _head_mask(p, 0.51, "official")[0].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_akl_head_rule_is_validated():
    student, teacher, mask = _inputs(0)
    with pytest.raises(ValueError, match="official, crossing.*'top-p'"):
        adaptive_kl(student, teacher, mask, head="top-p")
    with pytest.raises(ValueError, match="official, crossing"):
        _head_mask(torch.tensor(DYADIC), 0.5, "Official")


def test_akl_rules_differ_on_the_brute_force_inputs():
    """The brute-force comparison in CASES tells the two rules apart (else it could not catch a swapped rule)."""
    student, teacher, mask = _inputs(0)
    official = adaptive_kl(student.double(), teacher.double(), mask).item()
    crossing = adaptive_kl(student.double(), teacher.double(), mask, head="crossing").item()
    assert abs(official - crossing) > 1e-3
    assert abs(official - _brute(_akl(0.5, "crossing"), student, teacher, mask)) > 1e-3


# P and Q over 4 tokens; |P - Q| = [0, 0.3, 0.2, 0.1]. P sorted: 0.4 (1), 0.3 (3), 0.2 (2), 0.1 (0).
AKL_P = [0.1, 0.4, 0.2, 0.3]
AKL_Q = [0.1, 0.1, 0.4, 0.4]


@pytest.mark.parametrize("head,mu,w", [
    ("official", 0.5, 1 / 2),   # head {1}: 0.4 + 0.3 > 0.5; g_head 0.3, g_tail 0.3
    ("official", 0.3, 1 / 2),   # head {1}: the top-1 even though 0.4 > 0.3
    ("official", 0.8, 2 / 3),   # head {1, 3}: 0.9 > 0.8; g_head 0.4, g_tail 0.2
    ("official", 0.95, 1.0),    # head {1, 3, 2} holds all the gap: pure forward KL
    ("crossing", 0.5, 2 / 3),   # head {1, 3}: 0.4 < 0.5 <= 0.7
    ("crossing", 0.3, 1 / 2),   # head {1}
    ("crossing", 0.8, 1.0),     # head {1, 3, 2}
])
def test_akl_weight_hand_built(head, mu, w):
    p, q = torch.tensor(AKL_P, dtype=torch.float64), torch.tensor(AKL_Q, dtype=torch.float64)
    teacher, student = p.log().view(1, 1, 4), q.log().view(1, 1, 4)
    mask = torch.ones(1, 1)
    fkl = sum(pv * math.log(pv / qv) for pv, qv in zip(AKL_P, AKL_Q, strict=True))
    rkl = sum(qv * math.log(qv / pv) for pv, qv in zip(AKL_P, AKL_Q, strict=True))
    assert abs(adaptive_kl(student, teacher, mask, mu=mu, head=head).item() - (w * fkl + (1 - w) * rkl)) < 1e-12


@pytest.mark.parametrize("head,w", [("official", 1 / 2), ("crossing", 2 / 3)])
def test_akl_weight_is_detached(head, w):
    """With w detached, d AKL = w d FKL + (1 - w) d RKL at the hand-built point (mu 0.5)."""
    p = torch.tensor(AKL_P, dtype=torch.float64)
    q = torch.tensor(AKL_Q, dtype=torch.float64)
    teacher, mask = p.log().view(1, 1, 4), torch.ones(1, 1)
    grads = []
    for fn in (lambda s: adaptive_kl(s, teacher, mask, mu=0.5, head=head), lambda s: forward_kl(s, teacher, mask),
               lambda s: reverse_kl(s, teacher, mask)):
        s = q.log().view(1, 1, 4).clone().requires_grad_()
        fn(s).backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], w * grads[1] + (1 - w) * grads[2], atol=1e-12)


def test_dpkd_token_loss_hand_computed():
    # Position (0, 0): a = 0 (teacher), b = 1 (student); h = log(0.2/0.6) - log(0.5/0.3) = -log 5.
    # Position (0, 1): both argmaxes are token 2 -> h = 0 -> log 2, zero gradient. Position (0, 2) is padding.
    teacher = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.9, 0.05, 0.05]]], dtype=torch.float64).log()
    student = torch.tensor([[[0.2, 0.6, 0.2], [0.3, 0.1, 0.6], [0.05, 0.05, 0.9]]], dtype=torch.float64).log()
    mask = torch.tensor([[True, True, False]])
    for beta in (1.0, 0.1):
        s = student.clone().requires_grad_()
        loss = dpkd_token_loss(s, teacher, mask, beta=beta)
        expected = (math.log1p(5 ** beta) + math.log(2)) / 2  # -log sigmoid(-beta log 5) = log(1 + 5^beta)
        assert abs(loss.item() - expected) < 1e-12
        loss.backward()
        assert (s.grad[0, 1] == 0).all() and (s.grad[0, 2] == 0).all()
        assert s.grad[0, 0].abs().sum() > 0
    assert abs(dpkd_token_loss(student, teacher, mask, beta=1.0).item() - math.log(12) / 2) < 1e-12
