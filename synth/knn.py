"""The k-NN graph of a caption dataset as Beam transforms: (key, caption, emb) items -> one Neighbourhood each.

`--knn auto` (default) is `global` up to --global-max images (1M), `sharded` above.
`--knn global`: every item in one worker (ToList), then synth.mining.knn: exact blocked search up
    to --exact-max items, faiss IVF above. 1M x 512 mines in about 7 minutes on 2 cores; the features of
    every item must fit in that worker's memory.
`--knn sharded`: an IVF join spread over the workers, for datasets no single worker holds:

    items --features (TF-IDF: IDF from a global document-frequency sum)--> seeded sample --k-means--> centroids
    each item --(centroids as a side input)--> member of its nearest list, query of its --nprobe nearest lists
    group by list --> exact top-k of the list's queries among the list's members
    combine per query --> its top-k over the lists it probed

    The lists and probes are those of a faiss IVF-Flat index, so recall is faiss's at the same nprobe;
    with --nprobe >= lists the join is exact. Memory per worker: one list's members and queries.

Both give neighbours in the same order (similarity, then key), so mining does not depend on which ran.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np

from cir import dataset as ds
from pipeline import jobs
from synth import mining
from synth.mining import Neighbour
from synth.specs import FAILED

if TYPE_CHECKING:
    from synth.config import SynthConfig

LOG = logging.getLogger("synth")


class Neighbourhood(NamedTuple):
    key: str
    caption: str
    neighbours: list  # [Neighbour], most similar first
    method: str  # how they were found: exact | faiss-ivf | sharded-ivf


def NeighbourGraph(cfg: "SynthConfig") -> beam.PTransform:
    """(key, caption, emb) items -> (neighbourhoods, failed rows): items without an embedding while the
    similarity uses them are failed rows, not neighbours."""
    return ShardedKnn(cfg) if cfg.knn == "sharded" else GlobalKnn(cfg)


def _without_embedding(item: tuple, image_weight: float) -> bool:
    return image_weight > 0 and item[2] is None


def _missing_row(item: tuple) -> dict:
    return ds.failed_row(item[0], "mine", "no_embedding", "no emb.npy")


# ------------------------------------------------------------------------------------------ global

class GlobalKnn(beam.PTransform):
    def __init__(self, cfg: "SynthConfig"):
        super().__init__()
        self.cfg = cfg

    def expand(self, items):
        graph = (items | "AllItems" >> beam.combiners.ToList()
                 | "Graph" >> beam.ParDo(_GlobalGraph(self.cfg)).with_outputs(FAILED, main="neighbourhoods"))
        return graph.neighbourhoods, graph[FAILED]


class _GlobalGraph(beam.DoFn):
    def __init__(self, cfg: "SynthConfig"):
        self.cfg = cfg

    def process(self, items: list) -> Iterator:
        cfg = self.cfg
        items = sorted(items, key=lambda t: t[0])  # input order must not change the result
        for item in items:
            if _without_embedding(item, cfg.image_weight):
                yield beam.pvalue.TaggedOutput(FAILED, _missing_row(item))
        items = [t for t in items if not _without_embedding(t, cfg.image_weight)]
        keys = [k for k, _, _ in items]
        captions = [c for _, c, _ in items]
        features = mining.combine(mining.normalise(np.stack([e for _, _, e in items])) if cfg.image_weight > 0
                                  else None,
                                  mining.hashed_tfidf(captions, cfg.text_dim) if cfg.image_weight < 1 else None,
                                  cfg.image_weight)
        idx, sims, method = mining.knn(features, cfg.neighbours, exact_max=cfg.exact_max, nprobe=cfg.nprobe,
                                       seed=cfg.seed, nlist=cfg.nlist)
        LOG.info("mined %d x %d neighbours (%s)", len(keys), idx.shape[1], method)
        image_dim = features.shape[1] - (cfg.text_dim if cfg.image_weight < 1 else 0)
        for start in range(0, len(keys), ROWS_PER_CHUNK):
            rows = np.arange(start, min(len(keys), start + ROWS_PER_CHUNK))
            image, text = _rows(*mining.component_sims(features[rows], features[idx[rows]], image_dim,
                                                       cfg.image_weight), len(rows), idx.shape[1])
            for i, (r, found, found_s) in enumerate(zip(rows.tolist(), idx[rows].tolist(), sims[rows].tolist())):
                yield Neighbourhood(keys[r], captions[r], [
                    Neighbour(keys[j], captions[j], sim, im, tx)
                    for j, sim, im, tx in zip(found, found_s, image[i], text[i])], method)


ROWS_PER_CHUNK = 1024  # rows whose neighbours' features are gathered at once (50 MB at k 8, 1,536-d)


def _rows(image: Optional[np.ndarray], text: Optional[np.ndarray], n: int, k: int) -> tuple[list, list]:
    """component_sims' [n, k] arrays as Python rows (None where the similarity did not use that part): one
    tolist per block instead of a numpy scalar per neighbour (this runs for every neighbour of every image)."""
    none = [[None] * k] * n
    return (none if image is None else image.tolist()), (none if text is None else text.tolist())


# ------------------------------------------------------------------------------------------ sharded

class ShardedKnn(beam.PTransform):
    def __init__(self, cfg: "SynthConfig"):
        super().__init__()
        self.cfg = cfg

    def expand(self, items):
        cfg = self.cfg
        checked = items | "NeedEmbeddings" >> beam.ParDo(_CheckEmbedding(cfg.image_weight)).with_outputs(
            FAILED, main="items")
        items = checked["items"]
        n = items | "CountItems" >> beam.combiners.Count.Globally()
        weights = None
        if cfg.image_weight < 1:
            weights = beam.pvalue.AsSingleton(items | "DocumentFrequency" >> beam.CombineGlobally(
                DocumentFrequency(cfg.text_dim)))
        features = items | "Features" >> beam.Map(_features, cfg, weights)
        centroids = (features | "Sample" >> beam.Filter(_in_sample, cfg, beam.pvalue.AsSingleton(n))
                     | "Samples" >> beam.combiners.ToList()
                     | "KMeans" >> beam.Map(_centroids, cfg, beam.pvalue.AsSingleton(n)))
        neighbourhoods = (features
                          | "Batch" >> beam.BatchElements(min_batch_size=256, max_batch_size=ROUTE_BATCH)
                          | "Route" >> beam.FlatMap(_route, beam.pvalue.AsSingleton(centroids), cfg.nprobe
                                                  ).with_output_types(Tuple[int, Any])
                          | "ByList" >> jobs.MeasuredGroupByKey()
                          | "ScanList" >> beam.FlatMap(_scan_list, cfg).with_output_types(Tuple[Tuple[str, str], Any])
                          | "MergeTopK" >> beam.CombinePerKey(TopNeighbours(cfg.neighbours))
                          | "Neighbourhoods" >> beam.MapTuple(_neighbourhood))
        return neighbourhoods, checked[FAILED]


class _CheckEmbedding(beam.DoFn):
    def __init__(self, image_weight: float):
        self.image_weight = image_weight

    def process(self, item: tuple) -> Iterator:
        if _without_embedding(item, self.image_weight):
            yield beam.pvalue.TaggedOutput(FAILED, _missing_row(item))
        else:
            yield item


class DocumentFrequency(beam.CombineFn):
    """Captions -> the IDF weights of their hashed TF-IDF (mining.hashed_tfidf's, computed across workers)."""

    def __init__(self, dim: int):
        self.dim = dim

    def create_accumulator(self):
        return np.zeros(self.dim, dtype=np.int64), 0

    def add_input(self, acc, item):
        df, n = acc
        df += mining.caption_counts(item[1], self.dim) > 0
        return df, n + 1

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a[0] for a in accs), sum(a[1] for a in accs)

    def extract_output(self, acc):
        df, n = acc
        return mining.idf(df, n)


def _features(item: tuple, cfg: "SynthConfig", idf: Optional[np.ndarray]) -> tuple[str, str, np.ndarray]:
    """(key, caption, emb) -> (key, caption, combined feature [D]), as mining.combine builds them globally."""
    key, caption, emb = item
    image = mining.normalise(emb[None]) if cfg.image_weight > 0 else None
    text = mining.tfidf(mining.caption_counts(caption, cfg.text_dim), idf) if cfg.image_weight < 1 else None
    return key, caption, mining.combine(image, text, cfg.image_weight)[0]


def _lists(cfg: "SynthConfig", n: int) -> int:
    return cfg.nlist or mining.ivf_lists(n)


def _in_sample(item: tuple, cfg: "SynthConfig", n: int) -> bool:
    """A seeded sample of about training_sample_size(lists) items, chosen by key (any worker, same answer)."""
    share = mining.training_sample_size(_lists(cfg, n)) / max(n, 1)
    draw = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{item[0]}".encode()).digest()[:8], "big") / 2.0 ** 64
    return draw < share


def _centroids(sample: list, cfg: "SynthConfig", n: int) -> np.ndarray:
    if not sample:
        raise ValueError("sharded k-NN: the k-means sample came out empty")
    sample = sorted(sample, key=lambda t: t[0])  # arrival order must not change the centroids
    centroids = mining.coarse_centroids(np.stack([f for _, _, f in sample]), _lists(cfg, n))
    LOG.info("sharded k-NN: %d lists trained on %d of %d items", len(centroids), len(sample), n)
    return centroids


ROUTE_BATCH = 4096  # items routed per numpy call: one [batch, lists] matmul, one chunk per list touched


def _route(batch: list, centroids: np.ndarray, nprobe: int) -> Iterator[tuple[int, tuple]]:
    """Items -> (list, chunk) for every list they touch: an item is a member of its nearest list and a query of
    its nprobe nearest (faiss IVF's add and search assignments). A chunk is (keys, captions, features [n, D],
    member mask [n]): one element per list per batch, not one per item and probe."""
    keys = np.array([key for key, _, _ in batch], dtype=object)
    captions = np.array([caption for _, caption, _ in batch], dtype=object)
    features = np.stack([f for _, _, f in batch])
    probes = np.argsort(-(features @ centroids.T), axis=1, kind="stable")[:, :nprobe]  # nearest first
    flat = probes.ravel()
    rows = np.repeat(np.arange(len(batch)), probes.shape[1])
    order = np.argsort(flat, kind="stable")
    flat, rows = flat[order], rows[order]
    starts = np.r_[0, np.flatnonzero(np.diff(flat)) + 1]
    for lst, group in zip(flat[starts], np.split(rows, starts[1:])):
        yield int(lst), (keys[group].tolist(), captions[group].tolist(), features[group], probes[group, 0] == lst)


def _scan_list(element: tuple, cfg: "SynthConfig") -> Iterator[tuple[tuple[str, str], list]]:
    """One list: every query's top-k among the list's members, itself excluded -> ((key, caption),
    [(-sim, key, caption, image sim, text sim)]) per query (an empty list when the list holds nothing else, so
    that every item reaches the merge)."""
    _, chunks = element
    chunks = list(chunks)
    keys = [key for c in chunks for key in c[0]]
    order = np.argsort(np.array(keys, dtype=object), kind="stable")  # arrival order must not change the result
    keys = [keys[i] for i in order]
    captions = [caption for c in chunks for caption in c[1]]
    captions = [captions[i] for i in order]
    features = np.concatenate([c[2] for c in chunks])[order]
    members = np.flatnonzero(np.concatenate([c[3] for c in chunks])[order])
    if not len(members):
        for key, caption in zip(keys, captions):
            yield (key, caption), []
        return
    m = features[members]
    own = {keys[j]: i for i, j in enumerate(members)}
    image_dim = m.shape[1] - (cfg.text_dim if cfg.image_weight < 1 else 0)
    k = min(cfg.neighbours, len(members))
    chunk = max(1, mining.EXACT_BUDGET_FLOATS // len(members))
    for start in range(0, len(keys), chunk):
        stop = min(len(keys), start + chunk)
        q = features[start:stop]
        sims = q @ m.T
        for i in range(stop - start):
            if keys[start + i] in own:
                sims[i, own[keys[start + i]]] = -np.inf  # not your own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(sims, top, axis=1)
        image, text = _rows(*mining.component_sims(q, m[top], image_dim, cfg.image_weight), stop - start, k)
        top_keys = [[keys[j] for j in row] for row in members[top].tolist()]
        top_captions = [[captions[j] for j in row] for row in members[top].tolist()]
        for i, row_s in enumerate((-top_s).tolist()):
            # (-sim, key, ...) tuples sort most similar first, ties by key, with no key function (this runs
            # N x nprobe times)
            found = [n for n in zip(row_s, top_keys[i], top_captions[i], image[i], text[i]) if n[0] != np.inf]
            found.sort()
            yield (keys[start + i], captions[start + i]), found


class TopNeighbours(beam.CombineFn):
    """A query's (-sim, key, ...) from each list it probed -> its k best (a member lives in one list: no
    repeats)."""

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return []

    def add_input(self, acc, found):
        return list(heapq.merge(acc, found))[:self.k]

    def merge_accumulators(self, accs):
        return sorted(n for acc in accs for n in acc)[:self.k]

    def extract_output(self, acc):
        return acc


def _neighbourhood(query, found):  # no type hints: Beam would infer a schema coder for the NamedTuple
    key, caption = query
    return Neighbourhood(key, caption, [Neighbour(n_key, n_caption, -neg_sim, image, text)
                                        for neg_sim, n_key, n_caption, image, text in found], "sharded-ivf")
