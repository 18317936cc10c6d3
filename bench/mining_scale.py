"""Pair-mining scale (issue: Beam triplet synthesis, "Performance").

For N clustered synthetic 512-d embeddings, the k-NN step the synth job runs (`synth.mining.knn`): seconds,
peak memory (each N in its own process, ru_maxrss), method (exact blocked / faiss IVF), and recall@10
against exact search on 1,000 sampled queries. Targets: near-linear time, bounded memory, recall >= 0.9,
1M in <= 10 minutes on 2 cores.

    python bench/mining_scale.py [--sizes 10000,100000,1000000]
"""
from __future__ import annotations

import argparse
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


def one(n: int, k: int, queries: int) -> dict:
    from synth.mining import knn

    x = clustered(n)
    start = time.time()
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure one size
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.k, args.queries)))
        return 0
    for n in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--k", str(args.k), "--queries",
                              str(args.queries)], check=True, capture_output=True, text=True).stdout
        print(out.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
