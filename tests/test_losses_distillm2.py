"""DistiLLM-2 (CALD) against an independent float64 brute force: plain Python loops over sequences, positions and
the vocabulary, and central finite differences for the gradient (holding the detached copy of Q fixed)."""

import math

import numpy as np
import pytest
import torch

from prefkd.losses import distillm2_adaptive_alpha, distillm2_loss, distillm2_weights


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _skl_position(p, q, alpha):
    # KL(P || alpha P + (1 - alpha) Q)
    return sum(pv * (math.log(pv) - math.log(alpha * pv + (1 - alpha) * qv)) for pv, qv in zip(p, q, strict=True))


def _srkl_position(p, q, q_mix, alpha):
    # KL(Q || (1 - alpha) P + alpha Q_mix); Q_mix is Q, or a frozen copy of it for the released gradient
    return sum(qv * (math.log(qv) - math.log((1 - alpha) * pv + alpha * mv)) 
               for pv, qv, mv in zip(p, q, q_mix, strict=True))


def _brute(s_t, t_t, m_t, s_s, t_s, m_s, alpha_t, alpha_s, w_t=1.0, w_s=1.0, s_s_mix=None):
    """Plain-Python CALD: per-sequence token means, then the mean over sequences with a counted token."""
    s_s_mix = s_s if s_s_mix is None else s_s_mix

    def term(student, teacher, mask, alphas, per_position):
        means = []
        for i in range(len(student)):
            vals = [per_position(i, _softmax(teacher[i][j]), student, j)
                    for j in range(len(student[i])) if mask[i][j]]
            if vals:
                means.append(sum(vals) / len(vals))
        return sum(means) / len(means) if means else 0.0

    a_t = alpha_t if isinstance(alpha_t, list) else [alpha_t] * len(s_t)
    a_s = alpha_s if isinstance(alpha_s, list) else [alpha_s] * len(s_s)
    skl = term(s_t, t_t, m_t, a_t, lambda i, p, st, j: _skl_position(p, _softmax(st[i][j]), a_t[i]))
    srkl = term(s_s, t_s, m_s, a_s, lambda i, p, st, j: _srkl_position(p, _softmax(st[i][j]),
                                                                         _softmax(s_s_mix[i][j]), a_s[i]))
    return w_t * skl + w_s * srkl


def _inputs(seed=0, b=3, t=4, v=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale  # noqa: E731
    # Unequal lengths, so per-sequence token means differ from one token mean over the batch.
    m_t = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)[:b, :t]
    m_s = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)[:b, :t]
    return mk(), mk(), m_t, mk(), mk(), m_s


def _lists(*tensors):
    return [x.tolist() for x in tensors]


def test_value_matches_float64_brute_force():
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs()
    loss, skl, srkl = distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s)
    assert loss.dtype == torch.float64
    ref = _brute(*_lists(s_t, t_t, m_t, s_s, t_s, m_s), 0.1, 0.1)
    assert abs(loss.item() - ref) < 1e-12
    assert skl.shape == srkl.shape == (3,)
    # The terms alone, with other alphas and unequal weights.
    loss2, _, _ = distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s, alpha_t=0.3, alpha_s=0.05, weight_t=0.5, weight_s=1.5)
    assert abs(loss2.item() - _brute(*_lists(s_t, t_t, m_t, s_s, t_s, m_s), 0.3, 0.05, 0.5, 1.5)) < 1e-12


def test_not_a_token_mean_over_the_batch():
    # The per-sequence mean weighs the 1-token sequence like the 4-token one; a batch token mean would not.
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs()
    _, skl, _ = distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s)
    from prefkd.losses import skew_forward_kl

    assert abs(skl.mean().item() - skew_forward_kl(s_t, t_t, m_t, 0.1).item()) > 1e-3


# A teacher without gradient (training) takes the fused path of losses/divergences.py; with one, autograd's.
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_per_sequence_alpha_matches_brute_force(teacher_grad):
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs(seed=3)
    a_t, a_s = [0.01, 0.05, 0.1], [0.1, 0.02, 0.07]
    ref = _brute(*_lists(s_t, t_t, m_t, s_s, t_s, m_s), a_t, a_s)
    loss, _, _ = distillm2_loss(s_t, t_t.requires_grad_(teacher_grad), m_t, s_s, t_s.requires_grad_(teacher_grad),
                                m_s, torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_s, dtype=torch.float64))
    assert abs(loss.item() - ref) < 1e-12


def _finite_difference(f, x, eps=1e-6):
    grad = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        grad[idx] = (f(hi) - f(lo)) / (2 * eps)
    return grad


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("detach", [True, False])
def test_gradient_matches_finite_differences(detach, teacher_grad):
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs(seed=1, b=2, t=3, v=4)
    lists = _lists(s_t, t_t, m_t, s_s, t_s, m_s)
    s_t.requires_grad_(True)
    s_s.requires_grad_(True)
    loss, _, _ = distillm2_loss(s_t, t_t.requires_grad_(teacher_grad), m_t, s_s, t_s.requires_grad_(teacher_grad),
                                m_s, alpha_t=torch.tensor([0.1, 0.3], dtype=torch.float64), detach_mixture=detach)
    loss.backward()
    frozen = lists[3]  # the released form holds the mixture's Q at the current logits
    g_s = _finite_difference(lambda x: _brute(lists[0], lists[1], lists[2], x.tolist(), lists[4], lists[5], 0.1, 0.1,
                                              s_s_mix=frozen if detach else None), s_s.detach().numpy())
    g_t = _finite_difference(lambda x: _brute(x.tolist(), *lists[1:], [0.1, 0.3], 0.1), s_t.detach().numpy())
    np.testing.assert_allclose(s_s.grad.numpy(), g_s, atol=1e-7)
    np.testing.assert_allclose(s_t.grad.numpy(), g_t, atol=1e-7)
    # Masked positions get no gradient.
    assert not s_s.grad[~m_s].any() and not s_t.grad[~m_t].any()


def test_detached_mixture_changes_the_gradient_not_the_value():
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs(seed=2)
    grads, values = [], []
    for detach in (True, False):
        x = s_s.clone().requires_grad_(True)
        loss, _, _ = distillm2_loss(s_t, t_t, m_t, x, t_s, m_s, detach_mixture=detach)
        loss.backward()
        grads.append(x.grad)
        values.append(loss.item())
    assert abs(values[0] - values[1]) < 1e-12
    assert (grads[0] - grads[1]).abs().max() > 1e-3


def test_each_term_sees_only_its_own_sequences_and_masked_garbage_is_ignored():
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs(seed=4)
    ref, _, _ = distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s)
    for x, m in ((s_t, m_t), (t_t, m_t), (s_s, m_s), (t_s, m_s)):
        x[~m] = float("nan")
    loss, _, _ = distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s)
    assert abs(loss.item() - ref.item()) < 1e-12


def test_a_sequence_without_tokens_is_left_out_of_the_mean():
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs(seed=5)
    m_s = m_s.clone()
    m_s[0] = False
    loss, _, srkl = distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s)
    assert srkl[0] == 0
    assert abs(loss.item() - _brute(*_lists(s_t, t_t, m_t, s_s, t_s, m_s), 0.1, 0.1)) < 1e-12


def test_identical_distributions_give_zero():
    s_t, _, m_t, s_s, _, m_s = _inputs(seed=6)
    loss, _, _ = distillm2_loss(s_t, s_t.clone(), m_t, s_s, s_s.clone(), m_s)
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_alpha_outside_the_open_interval_is_refused(alpha):
    s_t, t_t, m_t, s_s, t_s, m_s = _inputs()
    with pytest.raises(ValueError):
        distillm2_loss(s_t, t_t, m_t, s_s, t_s, m_s, alpha_t=alpha)


def test_weight_schedules():
    assert distillm2_weights(0.7) == (1.0, 1.0)
    # Released gradual_beta: b = 1 + 0.5 min(1, 2 p), weights (2 - b, b).
    assert distillm2_weights(0.0, "code") == (1.0, 1.0)
    assert distillm2_weights(0.25, "code") == (0.75, 1.25)
    assert distillm2_weights(0.9, "code") == (0.5, 1.5)
    # Paper: 2 (1 - beta, beta), beta = clip(p, beta0, 1).
    assert distillm2_weights(0.2, "paper") == (1.0, 1.0)
    assert distillm2_weights(0.75, "paper") == (0.5, 1.5)
    assert distillm2_weights(1.0, "paper") == (0.0, 2.0)
    assert distillm2_weights(0.1, "paper", beta0=0.3) == pytest.approx((1.4, 0.6))
    with pytest.raises(ValueError):
        distillm2_weights(0.5, "cosine")
    with pytest.raises(ValueError):
        distillm2_weights(1.5)


def test_adaptive_alpha():
    gap = torch.tensor([0.2, 0.1, 0.05, -0.3, 1.0], dtype=torch.float64, requires_grad=True)
    a = distillm2_adaptive_alpha(gap, 0.1, alpha0=0.1)
    expected = [min(max(1 - 0.9 * 0.1 / (g + 1e-5), 0.01), 0.1) for g in gap.tolist()]
    assert a.tolist() == pytest.approx(expected, abs=1e-12)
    # gap == anchor gives alpha0; a gap at half the anchor is clipped to the floor 0.01.
    assert a[1].item() == pytest.approx(0.1, abs=1e-4) and a[2].item() == 0.01
    assert not a.requires_grad
