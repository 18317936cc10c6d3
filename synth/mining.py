"""Pair mining: nearest neighbours by CLIP image embedding and caption similarity, kept in a band.

Pure numpy (+ faiss when installed and the set is large), so the Beam job and `bench/` call the same code.
Features are L2-normalised; the combined vector [sqrt(w) * image, sqrt(1 - w) * text] has inner product
w * cos_image + (1 - w) * cos_text, so one k-NN search serves any weighting.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

WORD_RE = re.compile(r"[a-z0-9]+")
EXACT_BUDGET_FLOATS = 32 * 1024 * 1024  # similarity block of the exact search: 128 MB of float32
QUERY_CHUNK = 65_536  # faiss queries per call: bounds the copy of their features (128 MB at 512-d)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def hashed_tfidf(captions: list[str], dim: int = 1024) -> np.ndarray:
    """TF-IDF of unigrams and bigrams, hashed into `dim` buckets (crc32: stable across processes, unlike
    Python's salted hash), L2-normalised: [N, dim] float32. IDF comes from these captions, so words every
    caption shares ("a photo of", "background") weigh little and the words that differ decide."""
    counts = np.zeros((len(captions), dim), dtype=np.float32)
    for i, text in enumerate(captions):
        words = WORD_RE.findall(text.lower())
        for g in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            counts[i, zlib.crc32(g.encode()) % dim] += 1.0
    df = (counts > 0).sum(axis=0)
    idf = np.log((1.0 + len(captions)) / (1.0 + df)) + 1.0
    return normalise(np.sqrt(counts) * idf)


def combine(image: Optional[np.ndarray], text: Optional[np.ndarray], image_weight: float) -> np.ndarray:
    parts = []
    if image is not None and image_weight > 0:
        parts.append(np.sqrt(image_weight) * normalise(image))
    if text is not None and image_weight < 1:
        parts.append(np.sqrt(1.0 - image_weight) * normalise(text))
    if not parts:
        raise ValueError("nothing to mine with: no image embeddings and no captions")
    return np.concatenate(parts, axis=1).astype(np.float32)


def knn(x: np.ndarray, k: int, *, exact_max: int = 50_000, nprobe: int = 16, seed: int = 0
        ) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k neighbours of every row by inner product, self excluded: (indices [N, k], sims [N, k], method).

    Exact blocked search up to `exact_max` rows (memory: one block of at most EXACT_BUDGET_FLOATS
    similarities); above it faiss IVF (approximate; recall measured by bench/mining_scale.py).
    """
    n = x.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise ValueError(f"need at least two items to mine pairs, got {n}")
    if n <= exact_max:
        return (*_exact_knn(x, k), "exact")
    return (*_faiss_knn(x, k, nprobe=nprobe, seed=seed), "faiss-ivf")


def _exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    block = max(1, EXACT_BUDGET_FLOATS // n)
    idx = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = x[start:stop] @ x.T  # [block, N]
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not your own neighbour
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(s, part, axis=1)
        # Ties broken by index so results do not depend on argpartition's internals.
        order = np.lexsort((part, -part_s), axis=1)
        idx[start:stop] = np.take_along_axis(part, order, axis=1)
        sims[start:stop] = np.take_along_axis(part_s, order, axis=1)
    return idx, sims


def _faiss_knn(x: np.ndarray, k: int, *, nprobe: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Self-k-NN with faiss IVF-Flat. The queries are the indexed vectors, so one coarse-quantizer pass
    (their nprobe nearest lists) serves both the add (first list) and the search (all nprobe), and the
    queries run list by list: consecutive queries scan the same lists while those are in cache (1.5x
    faster than input order at 1M x 512). The same neighbours as index.add + index.search."""
    try:
        import faiss
    except ImportError as err:
        raise RuntimeError(f"{x.shape[0]} items need the approximate index: pip install -e '.[faiss]'") from err
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = trained_ivf(x, nprobe, seed)
    coarse_d, coarse_i = index.quantizer.search(x, nprobe)  # [N, nprobe], nearest list first
    first = np.ascontiguousarray(coarse_i[:, 0])
    index.add_core(n, faiss.swig_ptr(x), None, faiss.swig_ptr(first))
    order = np.argsort(first, kind="stable")
    # search_preassigned in the default mode 0 runs on one thread (index.search splits queries over threads
    # before calling it); mode 3 splits the queries over threads inside it
    index.parallel_mode = 3
    out_i = np.empty((n, k), dtype=np.int64)
    out_s = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, QUERY_CHUNK):
        rows = order[start:start + QUERY_CHUNK]
        sims, idx = index.search_preassigned(x[rows], k + 1, coarse_i[rows], coarse_d[rows])
        out_i[rows], out_s[rows] = _drop_self(rows, idx, sims, k)
    return out_i, out_s


def trained_ivf(x: np.ndarray, nprobe: int, seed: int):
    """An empty faiss IVF-Flat index (inner product) trained on a seeded sample of x: 4 sqrt(N) lists (at
    most 4096), 40 training points per list (above faiss's floor of 39; k-means costs points x lists x d)."""
    import faiss

    n, d = x.shape
    nlist = int(min(4096, max(16, 4 * np.sqrt(n))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.train(x[np.sort(rng.choice(n, size=min(n, nlist * 40), replace=False))])
    index.nprobe = nprobe
    return index


def _drop_self(rows: np.ndarray, idx: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k+1 results per query -> k without the query itself (wherever it landed; where it did not appear,
    the last neighbour goes instead)."""
    keep = idx != rows[:, None]
    keep[keep.sum(axis=1) > k, k] = False  # self absent: k+1 kept, drop the last
    return idx[keep].reshape(len(rows), k), sims[keep].reshape(len(rows), k)


@dataclass
class Pair:
    ref: int  # row of the reference
    tgt: int  # row of the target
    sim: float  # combined similarity
    hard_negatives: list[int]  # other neighbours of the reference


def select_pairs(idx: np.ndarray, sims: np.ndarray, *, low: float, high: float, per_reference: int,
                 hard_negatives: int, captions: Optional[list[str]] = None) -> list[Pair]:
    """For each reference, its most similar neighbours inside [low, high] become targets; the remaining
    neighbours (any similarity) are its hard negatives, except those captioned exactly as the target (with
    `captions`): they would be right answers pushed away."""
    pairs = []
    for ref in range(idx.shape[0]):
        in_band = [(j, s) for j, s in zip(idx[ref], sims[ref]) if low <= s <= high]
        for tgt, sim in in_band[:per_reference]:
            negatives = [int(j) for j in idx[ref] if j != tgt and (captions is None or captions[j] != captions[tgt])
                         ][:hard_negatives]
            pairs.append(Pair(ref, int(tgt), float(sim), negatives))
    return pairs
