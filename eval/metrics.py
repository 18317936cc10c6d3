"""The official metrics, as pure functions over ranked lists (no file handling here; see eval/score.py).

Each function takes, per query, the ranked candidate list and the ground truth, and returns per-query values in
percent (a metric is their mean; eval/score.py averages, eval/stats.py bootstraps them), following the
benchmark's own evaluation code:
- CIRR (Liu et al. 2021, test server / cirr eval code): Recall@K against `target_hard`, the reference
  *removed* from the ranking beforehand (the file format requires it gone); Recall_subset@K ranks only
  the img_set members other than the reference.
- CIRCO (Baldrati et al. 2023): mAP@K with AP@K = sum_{k<=K} P@k * rel(k) / min(#gt, K), averaged over queries.
- FashionIQ (Wu et al. 2021): Recall@K per category against the single target, reference *not* excluded;
  the average over categories.
- Shoes / Fashion200k: Recall@K with the reference excluded; for Fashion200k a hit is any image whose
  caption equals the target caption (TIRG protocol).
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np


def recall_hits(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable], ks: Sequence[int]
                ) -> dict[int, list[float]]:
    """Per query, 100 when its target is within the first k of its ranking, else 0 (their mean is Recall@K)."""
    if len(ranked) != len(targets):
        raise ValueError("one ranking per target")
    return {k: [100.0 * (t in list(r[:k])) for r, t in zip(ranked, targets)] for k in ks}


def recall_hits_any(ranked: Sequence[Sequence[Hashable]], is_hit: Sequence[Callable[[Hashable], bool]],
                    ks: Sequence[int]) -> dict[int, list[float]]:
    """Per query, 100 when any hit is within the first k (several correct answers, e.g. Fashion200k)."""
    return {k: [100.0 * any(hit(c) for c in r[:k]) for r, hit in zip(ranked, is_hit)] for k in ks}


def average_precision_at_k(ranked: Sequence[Hashable], gt: Sequence[Hashable], k: int) -> float:
    """CIRCO's AP@K: sum over the first K positions of precision@i at relevant positions, / min(|gt|, K)."""
    gt_set = set(gt)
    labels = np.array([c in gt_set for c in ranked[:k]], dtype=np.float64)
    if not len(gt_set):
        raise ValueError("a query without ground truth")
    precisions = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
    return float(precisions.sum() / min(len(gt_set), k))


def average_precisions(ranked: Sequence[Sequence[Hashable]], gts: Sequence[Sequence[Hashable]], ks: Sequence[int]
                       ) -> dict[int, list[float]]:
    """Per query, 100 x AP@K (their mean is mAP@K)."""
    return {k: [100.0 * average_precision_at_k(r, g, k) for r, g in zip(ranked, gts)] for k in ks}


def without(ranked: Sequence[Hashable], excluded: Hashable) -> list:
    """The ranking with one item (the reference) taken out, order kept."""
    return [c for c in ranked if c != excluded]
