"""Confidence intervals and significance for evaluation scores. Pure functions on arrays, no models.

Scores of one model are a matrix `[runs, prompts]`: one row per training seed (per-prompt scores already averaged
over the sampling seeds of its evaluation), one column per test prompt. Two sources of noise matter: which prompts
the test set happens to hold, and which training seed a run got. The bootstrap here resamples both — prompts with
replacement (the same draw for every model, so comparisons are paired on prompts) and, independently per model,
its runs with replacement — and reads percentile intervals off the replicates. With one run per model it is the
paired prompt bootstrap of Koehn (2004).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the data as observed
    low: float
    high: float
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(values: list[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of a few independent values (e.g. per-seed scores); n = 1 gives a point."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, mean, mean, confidence)
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, confidence)


Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def bootstrap(statistic: Statistic, scores: Mapping[str, np.ndarray], n_boot: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> Interval:
    """Percentile interval of `statistic` over replicates that resample prompts (shared) and runs (per model).

    `statistic` maps {name: mean score} to a value, elementwise over arrays (it gets one mean per replicate).
    A replicate's mean of an [R, n] matrix M is w M v / (R n), where w and v count how often each run and prompt
    was drawn, so every replicate of every model costs two small matrix products."""
    mats = {k: _as_matrix(v) for k, v in scores.items()}
    n_prompts = {m.shape[1] for m in mats.values()}
    if len(n_prompts) != 1:
        raise ValueError(f"every model must be scored on the same prompts, got {sorted(n_prompts)} columns")
    (n,) = n_prompts
    rng = np.random.default_rng(seed)
    prompt_counts = _counts(rng, n_boot, n)  # [B, n], shared: comparisons are paired on prompts
    means = {}
    for k, m in mats.items():
        run_counts = _counts(rng, n_boot, len(m))  # [B, R], independent per model
        means[k] = ((run_counts @ m) * prompt_counts).sum(1) / (len(m) * n)
    reps = np.asarray(statistic(means), dtype=np.float64)
    alpha = (1 - confidence) / 2
    finite = reps[np.isfinite(reps)]  # a gap ratio is undefined in replicates where the gap is 0
    low, high = np.quantile(finite, [alpha, 1 - alpha]) if len(finite) else (np.nan, np.nan)
    observed = float(statistic({k: np.float64(m.mean()) for k, m in mats.items()}))
    return Interval(observed, float(low), float(high), confidence)


def _counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """[n_boot, n]: how often each of n items is drawn in each replicate of n draws with replacement."""
    draws = rng.integers(0, n, (n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
    return counts


def mean_score(name: str) -> Statistic:
    return lambda m: m[name]


def difference(name: str, baseline: str) -> Statistic:
    return lambda m: m[name] - m[baseline]


def gap_recovered(name: str, baseline: str = "sft", teacher: str = "teacher") -> Statistic:
    """(method - baseline) / (teacher - baseline): the share of the teacher-student gap a method closes."""

    def stat(m: Mapping[str, np.ndarray]) -> np.ndarray:
        gap = m[teacher] - m[baseline]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap != 0, (m[name] - m[baseline]) / np.where(gap != 0, gap, 1), np.nan)

    return stat


def _as_matrix(x: np.ndarray | list) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [runs, prompts] matrix, got shape {m.shape}")
    return m
