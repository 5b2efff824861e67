import math

import pytest
import torch

from prefkd.losses import cpo_loss, dpkd_loss, dpo_loss, ipo_loss, plad_margin_loss, plad_rank_loss, simpo_loss


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
