"""Pair mining: nearest neighbours by CLIP image embedding and caption similarity, kept in a band.

Pure numpy (+ faiss when installed and the set is large), so the Beam job and `bench/` call the same code.
Features are L2-normalised; the combined vector [sqrt(w) * image, sqrt(1 - w) * text] has inner product
w * cos_image + (1 - w) * cos_text, so one k-NN search serves any weighting.
"""
from __future__ import annotations

import re
import zlib
from typing import NamedTuple, Optional

import numpy as np

WORD_RE = re.compile(r"[a-z0-9]+")
EXACT_BUDGET_FLOATS = 32 * 1024 * 1024  # similarity block of the exact search: 128 MB of float32
QUERY_CHUNK = 65_536  # faiss queries per call: bounds the copy of their features (128 MB at 512-d)
PROGRESS_MIN = 20_000  # a progress bar for searches over at least this many items (minutes at 1M)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def hashed_tfidf(captions: list[str], dim: int = 1024) -> np.ndarray:
    """TF-IDF of unigrams and bigrams, hashed into `dim` buckets (crc32: stable across processes, unlike
    Python's salted hash), L2-normalised: [N, dim] float32. IDF comes from these captions, so words every
    caption shares ("a photo of", "background") weigh little and the words that differ decide."""
    counts = np.stack([caption_counts(c, dim) for c in captions]) if captions else np.zeros((0, dim), np.float32)
    return tfidf(counts, idf((counts > 0).sum(axis=0), len(captions)))


def caption_counts(text: str, dim: int) -> np.ndarray:
    """One caption's hashed unigram + bigram counts: [dim] float32."""
    counts = np.zeros(dim, dtype=np.float32)
    words = WORD_RE.findall(text.lower())
    for g in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
        counts[zlib.crc32(g.encode()) % dim] += 1.0
    return counts


def idf(document_frequency: np.ndarray, n: int) -> np.ndarray:
    """Smoothed IDF from how many of the n captions hold each bucket."""
    return np.log((1.0 + n) / (1.0 + np.asarray(document_frequency))) + 1.0


def tfidf(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Counts [N, dim] (or [dim]) and IDF weights -> L2-normalised TF-IDF rows [N, dim]."""
    return normalise(np.sqrt(np.atleast_2d(counts)) * weights)


def combine(image: Optional[np.ndarray], text: Optional[np.ndarray], image_weight: float) -> np.ndarray:
    parts = []
    if image is not None and image_weight > 0:
        parts.append(np.sqrt(image_weight) * normalise(image))
    if text is not None and image_weight < 1:
        parts.append(np.sqrt(1.0 - image_weight) * normalise(text))
    if not parts:
        raise ValueError("nothing to mine with: no image embeddings and no captions")
    return np.concatenate(parts, axis=1).astype(np.float32)


def knn(x: np.ndarray, k: int, *, exact_max: int = 50_000, nprobe: int = 16, seed: int = 0,
        nlist: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k neighbours of every row by inner product, self excluded: (indices [N, k], sims [N, k], method).

    Exact blocked search up to `exact_max` rows (memory: one block of at most EXACT_BUDGET_FLOATS
    similarities); above it faiss IVF with `nlist` lists (default ivf_lists(N)), `nprobe` probed (approximate;
    recall measured by bench/mining_scale.py).
    """
    n = x.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise ValueError(f"need at least two items to mine pairs, got {n}")
    if n <= exact_max:
        return (*_exact_knn(x, k), "exact")
    return (*_faiss_knn(x, k, nprobe=nprobe, seed=seed, nlist=nlist), "faiss-ivf")


def _exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    block = max(1, EXACT_BUDGET_FLOATS // n)
    idx = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in _progress(range(0, n, block), n, "exact k-NN (query blocks)"):
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


def _faiss_knn(x: np.ndarray, k: int, *, nprobe: int, seed: int, nlist: Optional[int] = None
               ) -> tuple[np.ndarray, np.ndarray]:
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
    index = trained_ivf(x, nprobe, seed, nlist)
    coarse_d, coarse_i = index.quantizer.search(x, nprobe)  # [N, nprobe], nearest list first
    first = np.ascontiguousarray(coarse_i[:, 0])
    index.add_core(n, faiss.swig_ptr(x), None, faiss.swig_ptr(first))
    order = np.argsort(first, kind="stable")
    # search_preassigned in the default mode 0 runs on one thread (index.search splits queries over threads
    # before calling it); mode 3 splits the queries over threads inside it
    index.parallel_mode = 3
    out_i = np.empty((n, k), dtype=np.int64)
    out_s = np.empty((n, k), dtype=np.float32)
    for start in _progress(range(0, n, QUERY_CHUNK), n, "faiss IVF k-NN (query chunks)"):
        rows = order[start:start + QUERY_CHUNK]
        sims, idx = index.search_preassigned(x[rows], k + 1, coarse_i[rows], coarse_d[rows])
        out_i[rows], out_s[rows] = _drop_self(rows, idx, sims, k)
    return out_i, out_s


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: 4 sqrt(N), at least 16, at most 4096."""
    return int(min(4096, max(16, 4 * np.sqrt(n))))


def training_sample_size(nlist: int) -> int:
    return nlist * 40  # 40 training points per list (above faiss's floor of 39; k-means costs points x lists x d)


def _progress(blocks: range, n: int, desc: str):
    from tqdm import tqdm

    return tqdm(blocks, desc=desc, disable=n < PROGRESS_MIN, mininterval=5)


def trained_ivf(x: np.ndarray, nprobe: int, seed: int, nlist: Optional[int] = None):
    """An empty faiss IVF-Flat index (inner product) trained on a seeded sample of x (ivf_lists lists unless
    told)."""
    n = x.shape[0]
    nlist = min(n, nlist or ivf_lists(n))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, training_sample_size(nlist)), replace=False))
    index = _ivf_trained_on(x[sample], nlist)
    index.nprobe = nprobe
    return index


def coarse_centroids(sample: np.ndarray, nlist: int) -> np.ndarray:
    """The nlist list centroids [nlist, d] faiss's IVF training finds on `sample` (the coarse quantizer of
    trained_ivf, for a join that routes vectors to lists itself)."""
    nlist = min(nlist, sample.shape[0])
    index = _ivf_trained_on(np.ascontiguousarray(sample, dtype=np.float32), nlist)
    return index.quantizer.reconstruct_n(0, nlist)


def _ivf_trained_on(sample: np.ndarray, nlist: int):
    try:
        import faiss
    except ImportError as err:
        raise RuntimeError("the approximate index needs faiss: pip install -e '.[faiss]'") from err
    d = sample.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    return index


def _drop_self(rows: np.ndarray, idx: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k+1 results per query -> k without the query itself (wherever it landed; where it did not appear,
    the last neighbour goes instead)."""
    keep = idx != rows[:, None]
    keep[keep.sum(axis=1) > k, k] = False  # self absent: k+1 kept, drop the last
    return idx[keep].reshape(len(rows), k), sims[keep].reshape(len(rows), k)


class Neighbour(NamedTuple):
    key: str
    caption: str
    sim: float  # combined similarity
    image_sim: Optional[float]  # cos of the image embeddings (None: mined without them)
    text_sim: Optional[float]  # cos of the caption TF-IDF (None: mined without it)


def component_sims(q: np.ndarray, m: np.ndarray, image_dim: int, image_weight: float
                   ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Image and caption cosines out of combined features: q [n, D] queries, m [n, k, D] their neighbours ->
    ([n, k] or None, [n, k] or None). The combined vector is [sqrt(w) image, sqrt(1 - w) text] (`combine`)."""
    image = text = None
    if image_weight > 0:
        image = np.einsum("nd,nkd->nk", q[:, :image_dim], m[:, :, :image_dim]) / image_weight
    if image_weight < 1:
        text = np.einsum("nd,nkd->nk", q[:, image_dim:], m[:, :, image_dim:]) / (1.0 - image_weight)
    return image, text


def select_targets(neighbours: list[Neighbour], *, low: float, high: float, per_reference: int,
                   hard_negatives: int) -> list[tuple[Neighbour, list[str]]]:
    """A reference's most similar neighbours inside [low, high] become its targets, each with the keys of the
    remaining neighbours (any similarity) as hard negatives, except those captioned exactly as the target:
    they would be right answers pushed away."""
    chosen = []
    for tgt in [n for n in neighbours if low <= n.sim <= high][:per_reference]:
        negatives = [n.key for n in neighbours if n.key != tgt.key and n.caption != tgt.caption]
        chosen.append((tgt, negatives[:hard_negatives]))
    return chosen
