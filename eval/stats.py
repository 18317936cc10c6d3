"""Uncertainty of benchmark metrics: seeded bootstrap confidence intervals over queries (and seeds).

A metric is the mean over groups (FashionIQ's categories; one group elsewhere) of each group's mean of
per-query values (eval.score.PerQuery). The bootstrap resamples queries with replacement within each group
and recomputes the metric; the 95% interval is the 2.5th and 97.5th percentile of `n` resamples. A paired
interval (two methods on the same queries) resamples the per-query differences, which is much tighter than
comparing two separate intervals: both methods meet the same easy and hard queries. Over several training
runs (seeds) of a method, `bootstrap_ci_over_seeds` resamples the runs as well as the queries (a two-level
bootstrap), so the interval covers how much another training run would move the metric, not only which
queries the benchmark drew.
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Optional

import numpy as np

N_BOOT = 2000  # resamples per interval
SEED = 0  # the bootstrap's own seed: the same inputs always give the same interval

Groups = dict[str, list[float]]  # group -> per-query values


def _resampled_means(groups: Groups, n: int, seed: int) -> np.ndarray:
    """[n] the metric under n resamples of the queries (within each group)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n)
    for name in sorted(groups):
        values = np.asarray(groups[name], dtype=np.float64)
        if values.size == 0:
            raise ValueError(f"group {name!r} has no queries")
        idx = rng.integers(0, values.size, size=(n, values.size))
        total += values[idx].mean(axis=1)
    return total / len(groups)


def _rounded(lo: float, hi: float, digits: Optional[int]) -> tuple[float, float]:
    """Reports store 2 decimals; a decision is taken on the unrounded bounds (digits=None)."""
    return (float(lo), float(hi)) if digits is None else (round(float(lo), digits), round(float(hi), digits))


def bootstrap_ci(groups: Groups, n: int = N_BOOT, seed: int = SEED, level: float = 0.95,
                 digits: Optional[int] = 2) -> tuple[float, float]:
    """The `level` percentile interval of the metric over resampled queries, in the metric's units."""
    means = _resampled_means(groups, n, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return _rounded(lo, hi, digits)


def bootstrap_ci_over_seeds(runs: list[Groups], n: int = N_BOOT, seed: int = SEED,
                            level: float = 0.95, digits: Optional[int] = 2) -> tuple[float, float]:
    """The `level` interval of the metric of the runs' mean, resampling the runs (seeds) with replacement and,
    in each resample, the queries (the same ones for every run: they are one benchmark). One run: bootstrap_ci.
    With three seeds the runs' part is coarse (ten distinct resamples of them), but a seed that moves a metric
    by more than the queries' noise widens the interval instead of hiding in the mean."""
    if len(runs) == 1:
        return bootstrap_ci(runs[0], n, seed, level, digits)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(runs), size=(n, len(runs)))  # [n, k] the runs of each resample
    total = np.zeros(n)
    for name in sorted(runs[0]):
        values = np.asarray([r[name] for r in runs], dtype=np.float64)  # [k, q]
        if values.shape[1] == 0:
            raise ValueError(f"group {name!r} has no queries")
        per_query = values[picks].mean(axis=1)  # [n, q]: each query's mean over the resample's runs
        idx = rng.integers(0, values.shape[1], size=(n, values.shape[1]))
        total += np.take_along_axis(per_query, idx, axis=1).mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(total / len(runs[0]), [tail, 100 - tail])
    return _rounded(lo, hi, digits)


# Student's t, 0.975 quantile, by degrees of freedom; above 20, t(20) (slightly wider than the exact value)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def seed_level_ci(runs: list[Groups], n: int = N_BOOT, seed: int = SEED,
                  digits: Optional[int] = 2) -> tuple[float, float]:
    """The 95% interval of the runs' mean metric with the seeds as the sample: mean ± sqrt((t_{k-1} s / sqrt(k))^2
    + h^2), s the seeds' standard deviation of their metrics and h the half-width of the queries' bootstrap of the
    seed-averaged values. With 3 seeds t_2 = 4.3 makes it wide: that is what three training runs can say. The
    two-level bootstrap (`bootstrap_ci_over_seeds`) has only ten distinct resamples of 3 runs and, when the seeds
    spread more than the queries' noise, says "above 0" for ~10% of null comparisons instead of 2.5%
    (experiments/verdict_calibration.py); this interval stays at or below 2.5% there. One run: bootstrap_ci."""
    if len(runs) == 1:
        return bootstrap_ci(runs[0], n, seed, digits=digits)
    means = np.array([metric_of(r) for r in runs])  # [k]
    k = len(means)
    t_part = T975[min(k - 1, 20)] * means.std(ddof=1) / np.sqrt(k)
    lo, hi = bootstrap_ci(mean_over(runs), n, seed, digits=None)
    half = float(np.hypot(t_part, (hi - lo) / 2))
    return _rounded(means.mean() - half, means.mean() + half, digits)


def paired_difference(a: Groups, b: Groups) -> Groups:
    """Per-query a - b (the same queries in the same order, as two runs of one benchmark give)."""
    if sorted(a) != sorted(b) or any(len(a[g]) != len(b[g]) for g in a):
        raise ValueError("a paired comparison needs the same queries on both sides")
    return {g: [x - y for x, y in zip(a[g], b[g])] for g in a}


def mean_over(runs: list[Groups]) -> Groups:
    """Per-query values averaged over runs (seeds) of one method: the seeds' noise is averaged, not ignored;
    the bootstrap over queries then covers which queries the benchmark happened to draw."""
    if not runs:
        raise ValueError("no runs")
    return {g: list(np.mean([r[g] for r in runs], axis=0)) for g in runs[0]}


def metric_of(groups: Groups) -> float:
    return float(np.mean([np.mean(v) for v in groups.values()]))


def ci95(per_query: dict[str, Groups]) -> dict[str, list[float]]:
    """{metric: [lo, hi]} for every metric of a benchmark's per-query values."""
    return {name: list(bootstrap_ci(groups)) for name, groups in per_query.items()}


def shown(value: float, signed: bool = False, digits: int = 1) -> str:
    """A value as reports store it (rounded to 2 decimals) shown to `digits` decimals, half away from zero as a
    reader rounds the stored number: 9.25 -> "9.3", 1.45 -> "1.5". Python's format rounds the binary float
    instead (9.25 is exact and goes to even, "9.2"; 1.45 is 1.4499... and gives "1.4")."""
    text = str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))
    return f"+{text}" if signed and not text.startswith("-") else text
