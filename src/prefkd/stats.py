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


Statistic = Callable[[Mapping[str, np.ndarray]], float]


def bootstrap(statistic: Statistic, scores: Mapping[str, np.ndarray], n_boot: int = 2000, seed: int = 0,
              confidence: float = 0.95) -> Interval:
    """Percentile interval of `statistic` over replicates that resample prompts (shared) and runs (per model).

    `statistic` maps {name: [runs, prompts] array} to a float; it sees each replicate in the same shape."""
    mats = {k: _as_matrix(v) for k, v in scores.items()}
    n_prompts = {m.shape[1] for m in mats.values()}
    if len(n_prompts) != 1:
        raise ValueError(f"every model must be scored on the same prompts, got {sorted(n_prompts)} columns")
    (n,) = n_prompts
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        cols = rng.integers(0, n, n)
        reps[b] = statistic({k: m[rng.integers(0, len(m), len(m))][:, cols] for k, m in mats.items()})
    alpha = (1 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return Interval(statistic(mats), float(low), float(high), confidence)


def mean_score(name: str) -> Statistic:
    return lambda s: float(s[name].mean())


def difference(name: str, baseline: str) -> Statistic:
    return lambda s: float(s[name].mean() - s[baseline].mean())


def gap_recovered(name: str, baseline: str = "sft", teacher: str = "teacher") -> Statistic:
    """(method - baseline) / (teacher - baseline): the share of the teacher-student gap a method closes."""

    def stat(s: Mapping[str, np.ndarray]) -> float:
        gap = s[teacher].mean() - s[baseline].mean()
        return float((s[name].mean() - s[baseline].mean()) / gap) if gap != 0 else float("nan")

    return stat


def _as_matrix(x: np.ndarray | list) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [runs, prompts] matrix, got shape {m.shape}")
    return m
