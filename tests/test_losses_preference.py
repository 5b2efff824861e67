import itertools
import math

import pytest
import torch

from prefkd import losses
from prefkd.losses import cpo_loss, dpkd_loss, dpo_loss, ipo_loss, plad_margin_loss, plad_rank_loss, simpo_loss


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpkd_loss_hand_computed():
    # Two examples, worked by hand from Eq. 9.
    q_t, q_s = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -3.0])
    p_t, p_s = torch.tensor([-2.0, -8.0]), torch.tensor([-9.0, -5.0])
    n_t, n_s = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 1.0])
    loss, r_t, r_s = dpkd_loss(q_t, q_s, p_t, p_s, n_t, n_s, beta=0.5)
    # r_t = 0.5/2*(-4+2) = -0.5, 0.5/4*(-10+8) = -0.25 ; r_s = 0.5/3*(-6+9) = 0.5, 0.5/1*(-3+5) = 1.0
    assert torch.allclose(r_t, torch.tensor([-0.5, -0.25]))
    assert torch.allclose(r_s, torch.tensor([0.5, 1.0]))
    expected = -(math.log(_sig(-1.0)) + math.log(_sig(-1.25))) / 2
    assert abs(loss.item() - expected) < 1e-6


def test_dpkd_without_length_normalisation_is_eq8():
    q_t, q_s = torch.tensor([-4.0]), torch.tensor([-6.0])
    p_t, p_s = torch.tensor([-2.0]), torch.tensor([-9.0])
    loss, r_t, r_s = dpkd_loss(q_t, q_s, p_t, p_s, torch.tensor([2.0]), torch.tensor([3.0]), beta=0.1,
                               length_normalize=False)
    assert torch.allclose(r_t, torch.tensor([-0.2])) and torch.allclose(r_s, torch.tensor([0.3]))
    assert abs(loss.item() + math.log(_sig(-0.5))) < 1e-6


def test_dpkd_matches_float64_brute_force():
    g = torch.Generator().manual_seed(1)
    b = 16
    terms = [-torch.rand(b, generator=g, dtype=torch.float64) * 40 for _ in range(4)]
    n_t = torch.randint(1, 30, (b,), generator=g).double()
    n_s = torch.randint(1, 30, (b,), generator=g).double()
    for beta in (0.05, 0.1, 1.0):
        loss, _, _ = dpkd_loss(*terms, n_t, n_s, beta=beta)
        brute = 0.0
        for i in range(b):
            u = beta / n_t[i].item() * (terms[0][i] - terms[2][i]).item() - beta / n_s[i].item() * (
                terms[1][i] - terms[3][i]).item()
            brute += -math.log(1 / (1 + math.exp(-u)))
        assert abs(loss.item() - brute / b) < 1e-10


def test_dpkd_gradient_is_eq11():
    """d L / d log q(y_t) = -(beta/|y_t|) sigmoid(r_s - r_t) / B and the opposite sign for y_s (Eq. 11)."""
    g = torch.Generator().manual_seed(2)
    b, beta = 5, 0.3
    q_t = (-torch.rand(b, generator=g, dtype=torch.float64) * 20).requires_grad_()
    q_s = (-torch.rand(b, generator=g, dtype=torch.float64) * 20).requires_grad_()
    p_t, p_s = -torch.rand(b, generator=g, dtype=torch.float64) * 20, -torch.rand(b, generator=g,
                                                                                  dtype=torch.float64) * 20
    n_t, n_s = torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64), torch.tensor([5.0, 4, 3, 2, 1],
                                                                                  dtype=torch.float64)
    loss, r_t, r_s = dpkd_loss(q_t, q_s, p_t, p_s, n_t, n_s, beta=beta)
    loss.backward()
    weight = torch.sigmoid(r_s - r_t)
    assert torch.allclose(q_t.grad, -beta / n_t * weight / b)
    assert torch.allclose(q_s.grad, beta / n_s * weight / b)
    assert torch.autograd.gradcheck(lambda a, c: dpkd_loss(a, c, p_t, p_s, n_t, n_s, beta=beta)[0],
                                    (q_t.detach().requires_grad_(), q_s.detach().requires_grad_()))


def test_dpkd_rewards_are_detached():
    q = torch.zeros(2, requires_grad=True)
    _, r_t, r_s = dpkd_loss(q, q, torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    assert not r_t.requires_grad and not r_s.requires_grad


def test_dpkd_loo_value_is_dpkd_mean_and_gradient_is_baselined():
    torch.manual_seed(3)
    b, k = 3, 4
    qt = torch.randn(b, dtype=torch.float64, requires_grad=True)
    qs = torch.randn(b, k, dtype=torch.float64, requires_grad=True)
    pt, ps = torch.randn(b, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)
    nt, ns = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64), torch.randint(1, 7, (b, k)).double()
    beta = 0.3
    loss, r_t, r_s = losses.dpkd_loo_loss(qt, qs, pt, ps, nt, ns, beta)
    # Value: the paper-form DPKD loss over the B*K pairs.
    ref, _, _ = losses.dpkd_loss(qt[:, None].expand(b, k).reshape(-1), qs.reshape(-1),
                                 pt[:, None].expand(b, k).reshape(-1), ps.reshape(-1),
                                 nt[:, None].expand(b, k).reshape(-1), ns.reshape(-1), beta)
    assert torch.allclose(loss, ref)
    loss.backward()
    # Hand-derived gradient: s_i = sigmoid(r_s_i - r_t), c_i = s_i beta/|y_i| (the coefficient of d log q(y_i));
    # d/d qs_i = (c_i - mean_{j!=i} c_j) / (B K); d/d qt = -sum_i s_i beta/|y_t| / (B K).
    rt = beta * (qt.detach() - pt) / nt
    rs = beta * (qs.detach() - ps) / ns
    s = torch.sigmoid(rs - rt[:, None])
    c = s * beta / ns
    loo = (c.sum(1, keepdim=True) - c) / (k - 1)
    assert torch.allclose(qs.grad, (c - loo) / (b * k))
    assert torch.allclose(qt.grad, -s.sum(1) * beta / nt / (b * k))
    assert torch.allclose(r_t, rt) and torch.allclose(r_s, rs)


def test_dpkd_loo_needs_two_samples():
    with pytest.raises(ValueError, match="K >= 2"):
        losses.dpkd_loo_loss(torch.zeros(2), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 1), torch.ones(2),
                             torch.ones(2, 1))


def test_implicit_reward_hand_computed():
    q, p = torch.tensor([-4.0, -10.0, -3.0]), torch.tensor([-2.0, -8.0, -5.0])
    n = torch.tensor([2.0, 4.0, 0.0])
    # beta/|y| (q - p): 0.5/2 * -2, 0.5/4 * -2, and the empty response counted as length 1: 0.5/1 * 2.
    assert losses.implicit_reward(q, p, n, 0.5).tolist() == [-0.5, -0.25, 1.0]
    assert losses.implicit_reward(q, p, n, 0.5, length_normalize=False).tolist() == [-1.0, -1.0, 1.0]
    # The losses use it: dpkd's returned rewards are exactly these.
    _, r_t, r_s = dpkd_loss(q, q.flip(0), p, p.flip(0), n, n.flip(0), beta=0.5)
    assert r_t.tolist() == [-0.5, -0.25, 1.0] and r_s.tolist() == [1.0, -0.25, -0.5]
    # It carries the gradient: d r / d log q = beta/|y|.
    q = q.requires_grad_()
    losses.implicit_reward(q, p, n, 0.5).sum().backward()
    assert q.grad.tolist() == [0.25, 0.125, 0.5]


# ---------------------------------------------------------------- leave-one-out: expected gradient, enumerated

# A toy "language model": one softmax over five whole responses of 1 and 2 tokens, so that every K-tuple of
# student samples can be enumerated and the expectation of a gradient estimator computed exactly.
_TOY_LENGTHS = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)
_TOY_TEACHER = torch.tensor([0.35, 0.05, 0.3, 0.1, 0.2], dtype=torch.float64)
_TOY_THETA = torch.tensor([0.3, 1.2, -0.5, 0.8, -1.0], dtype=torch.float64)


def _old_loo_loss(q_t, q_s, p_t, p_s, n_t, n_s, beta, length_normalize):
    """The former dpkd_loo_loss, kept here as the counter-example: the baseline was of s_i, not of c_i."""
    r_t, r_s = beta * (q_t - p_t), beta * (q_s - p_s)
    if length_normalize:
        r_t, r_s = r_t / n_t, r_s / n_s
    logits = r_t[:, None] - r_s
    s = torch.sigmoid(-logits).detach()
    baseline = (s.sum(-1, keepdim=True) - s) / (s.shape[-1] - 1)
    return -torch.nn.functional.logsigmoid(logits).mean() - (baseline * (r_s - r_s.detach())).mean()


def _plain_loss(q_t, q_s, p_t, p_s, n_t, n_s, beta, length_normalize):
    """Plain DPKD over the B*K pairs (y_t, y_s_i)."""
    b, k = q_s.shape
    return dpkd_loss(*(x[:, None].expand(b, k).reshape(-1) if x.dim() == 1 else x.reshape(-1)
                       for x in (q_t, q_s, p_t, p_s, n_t, n_s)), beta, length_normalize)[0]


def _loo_loss(q_t, q_s, p_t, p_s, n_t, n_s, beta, length_normalize):
    return losses.dpkd_loo_loss(q_t, q_s, p_t, p_s, n_t, n_s, beta, length_normalize)[0]


def _enumerate_gradients(loss_fn, k, beta, length_normalize):
    """(E_{y_t ~ p, y_s_1..K ~ q iid}[grad_theta estimator], the gradient of every outcome), exactly, in float64.

    Every outcome (y_t, y_s_1..K) is one batch row with its own copy of theta, so that one backward pass gives each
    outcome's gradient: the batch mean scales it by 1/#rows.
    """
    n_out = len(_TOY_LENGTHS)
    outcomes = torch.tensor(list(itertools.product(range(n_out), repeat=k + 1)))
    t, s = outcomes[:, 0], outcomes[:, 1:]
    theta = _TOY_THETA.repeat(len(outcomes), 1).requires_grad_()
    log_q, log_p = torch.log_softmax(theta, -1), _TOY_TEACHER.log()
    loss = loss_fn(log_q.gather(1, t[:, None])[:, 0], log_q.gather(1, s), log_p[t], log_p[s], _TOY_LENGTHS[t],
                   _TOY_LENGTHS[s], beta, length_normalize)
    loss.backward()
    per_outcome = theta.grad * len(outcomes)
    probability = _TOY_TEACHER[t] * log_q.detach().gather(1, s).exp().prod(1)
    assert abs(probability.sum().item() - 1) < 1e-12
    return (probability[:, None] * per_outcome).sum(0), per_outcome


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_dpkd_loo_expected_gradient_is_dpkd_by_exact_enumeration(k, length_normalize):
    beta = 1.0
    plain, plain_each = _enumerate_gradients(_plain_loss, k, beta, length_normalize)
    loo, loo_each = _enumerate_gradients(_loo_loss, k, beta, length_normalize)
    old, _ = _enumerate_gradients(_old_loo_loss, k, beta, length_normalize)
    assert plain.abs().max() > 1e-2  # a point where DPKD still moves the student
    assert torch.allclose(loo, plain, rtol=0, atol=1e-10), (loo, plain)
    # The baseline does change the per-outcome gradients (it is not zero), only not their expectation.
    assert (loo_each - plain_each).abs().max() > 1e-2
    if length_normalize:
        # The former baseline of s_i alone: biased once responses have different lengths.
        assert (old - plain).abs().max() > 1e-3, (old, plain)
    else:
        # Without length normalisation c_i = beta s_i, so the former form was already this one.
        assert torch.allclose(old, plain, rtol=0, atol=1e-10)


# The other preference losses (DPO, IPO, CPO, SimPO, PLaD), each against a hand computation.
def _neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


# Two examples, summed log-probs: q = policy (student), p = reference (teacher); t = chosen, s = rejected.
Q_T, Q_S = [-4.0, -10.0], [-6.0, -3.0]
P_T, P_S = [-2.0, -8.0], [-9.0, -5.0]
N_T, N_S = [2.0, 4.0], [3.0, 1.0]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_hand_computed():
    loss, r_t, r_s = dpo_loss(_t(Q_T), _t(Q_S), _t(P_T), _t(P_S), beta=0.5)
    # r_t = 0.5 * (-2, -2) = (-1, -1); r_s = 0.5 * (3, 2) = (1.5, 1); h*beta = (-2.5, -2).
    assert r_t.tolist() == [-1.0, -1.0] and r_s.tolist() == [1.5, 1.0]
    assert abs(loss.item() - (_neg_log_sigmoid(-2.5) + _neg_log_sigmoid(-2.0)) / 2) < 1e-12


def test_dpo_equals_dpkd_without_length_normalisation():
    g = torch.Generator().manual_seed(0)
    terms = [-torch.rand(8, generator=g, dtype=torch.float64) * 40 for _ in range(4)]
    lengths = [torch.randint(1, 30, (8,), generator=g).double() for _ in range(2)]
    for beta in (0.05, 0.1, 1.0):
        dpo = dpo_loss(*terms, beta=beta)
        dpkd = dpkd_loss(*terms, *lengths, beta=beta, length_normalize=False)
        for a, b in zip(dpo, dpkd, strict=True):
            assert torch.equal(a, b)


def test_ipo_hand_computed():
    loss, r_t, r_s = ipo_loss(_t(Q_T), _t(Q_S), _t(P_T), _t(P_S), beta=0.25)
    # h = (-2 - 3, -2 - 2) = (-5, -4); 1/(2 beta) = 2 -> (-7)^2, (-6)^2.
    assert abs(loss.item() - (49 + 36) / 2) < 1e-12
    assert r_t.tolist() == [-0.5, -0.5] and r_s.tolist() == [0.75, 0.5]


def test_cpo_hand_computed():
    loss, r_t, r_s = cpo_loss(_t(Q_T), _t(Q_S), _t(N_T), beta=0.5, nll_weight=0.3)
    # beta (q_t - q_s) = (1, -3.5); NLL token mean = (4/2, 10/4) = (2, 2.5).
    expected = ((_neg_log_sigmoid(1.0) + 0.3 * 2.0) + (_neg_log_sigmoid(-3.5) + 0.3 * 2.5)) / 2
    assert abs(loss.item() - expected) < 1e-12
    assert r_t.tolist() == [-2.0, -5.0] and r_s.tolist() == [-3.0, -1.5]
    no_nll, _, _ = cpo_loss(_t(Q_T), _t(Q_S), _t(N_T), beta=0.5, nll_weight=0.0)
    assert abs(no_nll.item() - (_neg_log_sigmoid(1.0) + _neg_log_sigmoid(-3.5)) / 2) < 1e-12


def test_simpo_hand_computed():
    loss, r_t, r_s = simpo_loss(_t(Q_T), _t(Q_S), _t(N_T), _t(N_S), beta=2.0, gamma=0.5)
    # r_t = 2 * (-4/2, -10/4) = (-4, -5); r_s = 2 * (-6/3, -3/1) = (-4, -6); margins minus gamma: (-0.5, 0.5).
    assert r_t.tolist() == [-4.0, -5.0] and r_s.tolist() == [-4.0, -6.0]
    assert abs(loss.item() - (_neg_log_sigmoid(-0.5) + _neg_log_sigmoid(0.5)) / 2) < 1e-12


def test_plad_rank_hand_computed():
    loss, r_t, r_s = plad_rank_loss(_t(Q_T), _t(Q_S), margin=1.0)
    # max(0, 1 + 4 - 6) = 0, max(0, 1 + 10 - 3) = 8.
    assert abs(loss.item() - 4.0) < 1e-12
    assert r_t.tolist() == Q_T and r_s.tolist() == Q_S
    loss3, _, _ = plad_rank_loss(_t(Q_T), _t(Q_S), margin=3.0)
    assert abs(loss3.item() - (1.0 + 10.0) / 2) < 1e-12


def test_plad_margin_hand_computed():
    s_pos, s_neg = _t([0.9, 0.6]), _t([0.1, 0.5])
    loss, r_t, r_s = plad_margin_loss(_t(Q_T), _t(Q_S), s_pos, s_neg, beta=5.0)
    # beta (s+ - s-) = (4, 0.5); max(0, 4 + 4 - 6) = 2, max(0, 0.5 + 10 - 3) = 7.5.
    assert abs(loss.item() - (2.0 + 7.5) / 2) < 1e-12
    assert r_t.tolist() == Q_T and r_s.tolist() == Q_S


def _brute(name, q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg, i):
    if name == "dpo":
        return _neg_log_sigmoid(0.1 * ((q_t[i] - p_t[i]) - (q_s[i] - p_s[i])))
    if name == "ipo":
        return ((q_t[i] - p_t[i]) - (q_s[i] - p_s[i]) - 1 / (2 * 0.1)) ** 2
    if name == "cpo":
        return _neg_log_sigmoid(0.1 * (q_t[i] - q_s[i])) - q_t[i] / n_t[i]
    if name == "simpo":
        return _neg_log_sigmoid(2.0 * q_t[i] / n_t[i] - 2.0 * q_s[i] / n_s[i] - 0.5)
    if name == "plad_rank":
        return max(0.0, 1.0 - q_t[i] + q_s[i])
    return max(0.0, 1.0 * (s_pos[i] - s_neg[i]) - q_t[i] + q_s[i])


CALLS = {
    "dpo": lambda q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg: dpo_loss(q_t, q_s, p_t, p_s),
    "ipo": lambda q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg: ipo_loss(q_t, q_s, p_t, p_s),
    "cpo": lambda q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg: cpo_loss(q_t, q_s, n_t),
    "simpo": lambda q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg: simpo_loss(q_t, q_s, n_t, n_s),
    "plad_rank": lambda q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg: plad_rank_loss(q_t, q_s),
    "plad_margin": lambda q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg: plad_margin_loss(q_t, q_s, s_pos, s_neg),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_default_hyperparameters_match_float64_brute_force(name):
    g = torch.Generator().manual_seed(3)
    b = 16
    q_t, q_s, p_t, p_s = (-torch.rand(b, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    n_t, n_s = (torch.randint(1, 30, (b,), generator=g).double() for _ in range(2))
    s_pos, s_neg = (torch.rand(b, generator=g, dtype=torch.float64) for _ in range(2))
    args = (q_t, q_s, p_t, p_s, n_t, n_s, s_pos, s_neg)
    loss, r_t, r_s = CALLS[name](*(a.requires_grad_() if k < 2 else a for k, a in enumerate(args)))
    lists = [a.tolist() for a in args]
    expected = sum(_brute(name, *lists, i) for i in range(b)) / b
    assert abs(loss.item() - expected) < 1e-10 * max(1.0, expected)
    assert r_t.shape == (b,) and r_s.shape == (b,)
    assert not r_t.requires_grad and not r_s.requires_grad
    loss.backward()
    assert torch.isfinite(q_t.grad).all() and torch.isfinite(q_s.grad).all()
