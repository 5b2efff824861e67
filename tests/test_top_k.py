"""losses/top_k.py: a top-k teacher as the divergences' inputs, checked against float64 brute force on
hand-built distributions (each category summed in a Python loop, not through the library's tensor code)."""

import math

import pytest
import torch

from prefkd import losses
from prefkd.losses.top_k import coarse_logits

# One position, a vocabulary of 7: a teacher with a clear head and a long tail, a student of its own.
P = [0.40, 0.25, 0.15, 0.08, 0.06, 0.04, 0.02]
STUDENT = [0.3, 1.2, -0.4, 0.9, -1.0, 0.1, 0.5]
K = 3


def _teacher(k=K, dtype=torch.float64):
    """(ids, log-probs, tail log-mass) [1, 1, k] as the cache stores them."""
    logp = torch.tensor(P, dtype=torch.float64).log()
    values, ids = logp.topk(k)
    rest = torch.logsumexp(logp.scatter(-1, ids, -math.inf), -1) if k < len(P) else torch.tensor(-math.inf)
    return ids.view(1, 1, k), values.to(dtype).view(1, 1, k), rest.to(dtype).view(1, 1)


def _student_q(tau=1.0):
    z = [s / tau for s in STUDENT]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _tvd(a, b):
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b, strict=True))


def _mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


def _brute(mode, tau=1.0):
    """(teacher, student) as the two distributions the mode compares, category by category, in float64."""
    q = _student_q(tau)
    order = sorted(range(len(P)), key=lambda i: -P[i])[:K]
    tail = [i for i in range(len(P)) if i not in order]
    if mode == "renorm":  # full vocabulary, the teacher's tempered top-k renormalised, 0 elsewhere
        w = {i: P[i] ** (1 / tau) for i in order}
        z = sum(w.values())
        return [w[i] / z if i in w else 0.0 for i in range(len(P))], q
    teacher = [P[i] for i in order] + [sum(P[i] for i in tail)]  # bucket: both merged on {S, rest}
    student = [q[i] for i in order] + [sum(q[i] for i in tail)]
    return teacher, student


def _ours(fn, mode, tau=1.0, **kw):
    s = torch.tensor(STUDENT, dtype=torch.float64).view(1, 1, -1)
    s_div, t_div = coarse_logits(s, *_teacher(), mode=mode, temperature=tau)
    return fn(s_div, t_div, torch.ones(1, 1), **kw).item()


@pytest.mark.parametrize("mode", ["renorm", "bucket"])
def test_each_divergence_equals_the_brute_force_of_its_mode(mode):
    p, q = _brute(mode)
    alpha, beta = 0.1, 0.5
    assert _ours(losses.forward_kl, mode) == pytest.approx(_kl(p, q), rel=1e-12)
    assert _ours(losses.total_variation, mode) == pytest.approx(_tvd(p, q), rel=1e-12)
    assert _ours(losses.skew_forward_kl, mode, alpha=alpha) == pytest.approx(_kl(p, _mix(p, q, alpha)), rel=1e-12)
    assert _ours(losses.skew_reverse_kl, mode, alpha=alpha) == pytest.approx(_kl(q, _mix(p, q, 1 - alpha)),
                                                                               rel=1e-12)
    m = _mix(p, q, beta)
    assert _ours(losses.generalized_jsd, mode, beta=beta) == pytest.approx(beta * _kl(p, m) + (1 - beta) * _kl(q, m),
                                                                            rel=1e-12)


def test_renorm_is_the_full_vocabulary_divergence_with_the_teacher_zero_outside_its_top_k():
    """The k + 1 categories are only a cheaper layout: a full [V] teacher with -inf outside S gives the same."""
    s = torch.tensor(STUDENT, dtype=torch.float64).view(1, 1, -1)
    ids, logps, _ = _teacher()
    full = torch.full((1, 1, len(P)), -math.inf, dtype=torch.float64).scatter(-1, ids, logps)
    mask = torch.ones(1, 1)
    for fn, kw in ((losses.forward_kl, {"temperature": 2.0}), (losses.total_variation, {}),
                   (losses.skew_forward_kl, {}), (losses.skew_reverse_kl, {}),
                   (losses.generalized_jsd, {"beta": 0.3, "temperature": 2.0})):
        # The coarse tensors are built for the divergence's own temperature (as the step does).
        s_div, t_div = coarse_logits(s, ids, logps, torch.zeros(1, 1), "renorm", kw.get("temperature", 1.0))
        assert fn(s_div, t_div, mask, **kw).item() == pytest.approx(fn(s, full, mask, **kw).item(), rel=1e-12)


def test_renorm_with_temperature_is_tau_squared_kl_of_the_tempered_distributions():
    tau = 2.0
    p, q = _brute("renorm", tau)
    assert _ours(losses.forward_kl, "renorm", tau, temperature=tau) == pytest.approx(tau ** 2 * _kl(p, q), rel=1e-12)


def test_akl_on_the_bucket_mode_follows_the_official_head_rule_on_the_merged_categories():
    p, q = _brute("bucket")  # [0.40, 0.25, 0.15, tail 0.20]: mu 0.5 -> head = {0.40} (0.65 > 0.5)
    mu = 0.5
    order = sorted(range(len(p)), key=lambda i: -p[i])
    head, cum = set(), 0.0
    for i in order:
        cum += p[i]
        if cum <= mu or not head:
            head.add(i)
    g_head = sum(abs(p[i] - q[i]) for i in head)
    g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
    w = g_head / (g_head + g_tail)
    expected = w * _kl(p, q) + (1 - w) * _kl(q, p)
    assert _ours(losses.adaptive_kl, "bucket", mu=mu) == pytest.approx(expected, rel=1e-12)


def test_renorm_makes_reverse_kl_infinite_which_is_why_akl_refuses_it():
    assert _ours(losses.reverse_kl, "renorm") == math.inf


@pytest.mark.parametrize("mode", ["renorm", "bucket"])
def test_top_k_of_the_whole_vocabulary_equals_the_full_divergence_with_finite_gradients(mode):
    torch.manual_seed(0)
    s = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 11, dtype=torch.float64)
    logp = t.log_softmax(-1)
    values, ids = logp.topk(11)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    for fn in (losses.forward_kl, losses.total_variation, losses.skew_forward_kl, losses.skew_reverse_kl,
               losses.generalized_jsd, losses.adaptive_kl):
        s_div, t_div = coarse_logits(s, ids, values, torch.full((2, 5), -math.inf, dtype=torch.float64), mode)
        ours = fn(s_div, t_div, mask)
        full = fn(s, t, mask)
        assert ours.item() == pytest.approx(full.item(), rel=1e-10, abs=1e-12)
        (g_ours,) = torch.autograd.grad(ours, s)
        (g_full,) = torch.autograd.grad(full, s)
        assert torch.isfinite(g_ours).all()
        torch.testing.assert_close(g_ours, g_full, rtol=1e-9, atol=1e-12)


def test_bucket_gradient_equals_the_brute_force_gradient():
    """d/ds of KL(P_bar || Q_bar), with Q_bar summed by hand from softmax(s), float64 autograd on both."""
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    ids, logps, tail = _teacher()
    s_div, t_div = coarse_logits(s.view(1, 1, -1), ids, logps, tail, "bucket")
    (g_ours,) = torch.autograd.grad(losses.forward_kl(s_div, t_div, torch.ones(1, 1)), s)
    q = torch.softmax(s, -1)
    order = ids.flatten().tolist()
    q_bar = torch.stack([q[i] for i in order] + [sum(q[i] for i in range(len(P)) if i not in order)])
    p_bar = torch.tensor([P[i] for i in order] + [sum(P[i] for i in range(len(P)) if i not in order)],
                         dtype=torch.float64)
    (g_brute,) = torch.autograd.grad((p_bar * (p_bar.log() - q_bar.log())).sum(), s)
    torch.testing.assert_close(g_ours, g_brute, rtol=1e-12, atol=1e-14)


def test_ids_beyond_the_students_vocabulary_leave_the_top_k():
    """A teacher's padded rows: renorm drops them, bucket moves their mass to the tail."""
    s = torch.tensor(STUDENT[:5], dtype=torch.float64).view(1, 1, -1)  # the student knows tokens 0..4 only
    logp = torch.tensor(P, dtype=torch.float64).log()
    ids = torch.tensor([[[0, 6, 1]]])  # token 6 is not the student's
    logps = logp[ids]
    tail = torch.logsumexp(logp[[2, 3, 4, 5]], -1).view(1, 1)
    q = torch.softmax(s.flatten(), -1).tolist()
    p_renorm = [P[0] / (P[0] + P[1]), P[1] / (P[0] + P[1])]
    expected = _kl(p_renorm, [q[0], q[1]])
    assert losses.forward_kl(*coarse_logits(s, ids, logps, tail, "renorm"), torch.ones(1, 1)).item() == \
        pytest.approx(expected, rel=1e-12)
    p_bucket = [P[0], P[1], sum(P[2:])]
    expected = _kl(p_bucket, [q[0], q[1], sum(q[2:])])
    assert losses.forward_kl(*coarse_logits(s, ids, logps, tail, "bucket"), torch.ones(1, 1)).item() == \
        pytest.approx(expected, rel=1e-12)


def test_bucket_with_a_temperature_is_refused():
    s = torch.zeros(1, 1, len(P))
    with pytest.raises(ValueError, match="temperature 1"):
        coarse_logits(s, *_teacher(dtype=torch.float32), mode="bucket", temperature=2.0)
