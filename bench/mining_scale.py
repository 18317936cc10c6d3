"""Pair-mining scale (issue: Beam triplet synthesis, "Performance").

For N clustered synthetic 512-d embeddings, the k-NN step the synth job runs (`synth.mining.knn`): seconds,
peak memory (each N in its own process, ru_maxrss), method (exact blocked / faiss IVF), and recall@10
against exact search on 1,000 sampled queries. Targets: near-linear time, bounded memory, recall >= 0.9,
1M in <= 10 minutes on 2 cores.

`--knn sharded` times the synth job's other path instead: the IVF join as Beam transforms (synth.knn), run
by the DirectRunner with one worker (the items are made inside the pipeline, as shards would be read). It
is built to spread over many workers, so its time here is per-element overhead, not its speed on Dataflow.

    python bench/mining_scale.py [--sizes 10000,100000,1000000] [--knn global|sharded]
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clustered(n: int, dim: int = 512, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    from synth.mining import normalise

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal(size=(clusters, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # float32 chunks: the data must not cost more than the features
        stop = min(n, start + 100_000)
        x[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        x[start:stop] += 0.5 * rng.standard_normal(size=(stop - start, dim), dtype=np.float32)
    return normalise(x)


def one(n: int, k: int, queries: int, how: str) -> dict:
    from synth.mining import knn

    x = clustered(n)
    start = time.time()
    if how == "sharded":
        idx, method = sharded_knn(n, k), "sharded-ivf (Beam, DirectRunner)"
    else:
        idx, _, method = knn(x, k)
    seconds = time.time() - start
    peak_mining = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rng = np.random.default_rng(1)
    sample = rng.choice(n, size=min(queries, n), replace=False)
    hits = []
    for chunk in np.array_split(sample, max(1, len(sample) // 50)):  # exact top-k of the sampled queries
        sims = x[chunk] @ x.T  # [<=50, N]
        sims[np.arange(len(chunk)), chunk] = -np.inf
        exact = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += [len(set(a) & set(e)) / k for a, e in zip(idx[chunk], exact)]
    recall = float(np.mean(hits))
    return {"n": n, "method": method, "seconds": round(seconds, 1), "recall_at_10": round(recall, 3),
            "peak_rss_gb_mining": round(peak_mining, 2),
            "features_gb": round(x.nbytes / 2**30, 2)}


CHUNK = 20_000  # items made per element of the pipeline's source


@functools.lru_cache(maxsize=1)
def _features(n: int) -> np.ndarray:
    return clustered(n)  # the same features as the exact search's (seeded), made once per worker process


def _items(start: int, n: int):
    x = _features(n)
    for i in range(start, min(n, start + CHUNK)):
        yield f"{i:09d}", "", x[i]


def sharded_knn(n: int, k: int) -> np.ndarray:
    """Neighbour rows [n, k] found by synth.knn's sharded transform (a missing neighbour is -1)."""
    import tempfile

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.jobs import new_pipeline
    from synth.job import SynthConfig
    from synth.knn import NeighbourGraph

    cfg = SynthConfig("", "", "low", image_weight=1.0, neighbours=k, knn="sharded")
    with tempfile.TemporaryDirectory() as tmp:
        with new_pipeline(PipelineOptions(["--runner", "DirectRunner"])) as p:  # the jobs' local runner
            hoods, _ = p | beam.Create(list(range(0, n, CHUNK))) | beam.FlatMap(_items, n) | NeighbourGraph(cfg)
            _ = (hoods | beam.Map(lambda h: json.dumps([int(h.key), [int(m.key) for m in h.neighbours]]))
                 | beam.io.WriteToText(f"{tmp}/hoods"))
        idx = np.full((n, k), -1, dtype=np.int64)
        for path in Path(tmp).glob("hoods*"):
            for line in path.read_text().splitlines():
                row, found = json.loads(line)
                idx[row, :len(found)] = found
    return idx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--knn", default="global", choices=("global", "sharded"), help="which path of the synth job")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure one size
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.k, args.queries, args.knn)))
        return 0
    for n in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--k", str(args.k), "--queries",
                              str(args.queries), "--knn", args.knn], check=True, capture_output=True, text=True).stdout
        print(out.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
