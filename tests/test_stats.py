import math

import numpy as np
import pytest

from prefkd import stats


def test_t_interval_hand_computed():
    iv = stats.t_interval([1.0, 2.0, 3.0])
    # mean 2, sample std 1, t_{0.975, 2} = 4.302652729911275
    half = 4.302652729911275 / math.sqrt(3)
    assert iv.value == pytest.approx(2.0)
    assert (iv.low, iv.high) == pytest.approx((2 - half, 2 + half))
    assert stats.t_interval([5.0]).low == stats.t_interval([5.0]).high == 5.0


def test_bootstrap_mean_matches_the_normal_approximation_on_a_large_sample():
    x = np.random.default_rng(1).normal(50, 10, size=2000)
    iv = stats.bootstrap(stats.mean_score("m"), {"m": x}, n_boot=2000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert iv.value == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * se * 1.96)
    assert iv.high == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * se * 1.96)


def test_paired_difference_of_a_constant_shift_is_exact():
    a = np.random.default_rng(2).uniform(0, 100, size=(1, 300))
    iv = stats.bootstrap(stats.difference("b", "a"), {"a": a, "b": a + 1.5})
    assert (iv.value, iv.low, iv.high) == pytest.approx((1.5, 1.5, 1.5))
    assert iv.excludes_zero


def test_pairing_on_prompts_narrows_the_interval():
    rng = np.random.default_rng(3)
    hard = rng.uniform(0, 100, size=500)  # prompt difficulty dominates the variance
    a, b = hard + rng.normal(0, 1, 500), hard + 0.5 + rng.normal(0, 1, 500)
    paired = stats.bootstrap(stats.difference("b", "a"), {"a": a, "b": b})
    assert paired.excludes_zero and paired.high - paired.low < 1.0


def test_run_resampling_widens_the_interval_when_training_seeds_disagree():
    base = np.random.default_rng(4).uniform(0, 100, size=400)
    agree = np.stack([base, base, base])
    disagree = np.stack([base - 5, base, base + 5])
    w_agree = stats.bootstrap(stats.mean_score("m"), {"m": agree})
    w_disagree = stats.bootstrap(stats.mean_score("m"), {"m": disagree})
    # prompt-only half-width ~2.8; with the seed offsets ~sqrt(2.8^2 + 4.6^2) ~ 5.4
    assert w_disagree.high - w_disagree.low > 1.5 * (w_agree.high - w_agree.low)


def test_gap_recovered_endpoints():
    rng = np.random.default_rng(5)
    sft, teacher = rng.uniform(0, 50, 200), rng.uniform(50, 100, 200)
    half = (sft + teacher) / 2
    scores = {"sft": sft, "teacher": teacher, "same": sft, "half": half, "top": teacher}
    assert stats.bootstrap(stats.gap_recovered("same"), scores, n_boot=50).value == pytest.approx(0)
    assert stats.bootstrap(stats.gap_recovered("top"), scores, n_boot=50).value == pytest.approx(1)
    assert stats.bootstrap(stats.gap_recovered("half"), scores, n_boot=50).value == pytest.approx(0.5)


def test_models_scored_on_different_prompts_are_refused():
    with pytest.raises(ValueError, match="same prompts"):
        stats.bootstrap(stats.difference("a", "b"), {"a": np.ones(3), "b": np.ones(4)})
