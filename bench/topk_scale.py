"""Exact top-k over a large gallery: `eval`'s top-k (faiss.knn on the features when faiss is installed, as
shipped), its torch chunked fallback, faiss IndexFlatIP, and one torch.mm + topk.

    python bench/topk_scale.py                      # 1,000 queries x 1,000,000 x 512, k = 50
    python bench/topk_scale.py --gallery 100000     # smaller

Each method runs in its own process on the same seeded random unit features, so its peak RSS is its own
(the features themselves are 2 GB at 1M x 512 fp32; "above the features" is the peak minus the RSS just
before the search, so the temporary blocks of making the features do not count). Printed: seconds for the search alone, peak RSS, the
overlap of each method's top-k with faiss's, and the ratio faiss seconds / eval top-k seconds (>= 1: ours is at
least as fast). The last line of stdout is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def features(n: int, dim: int, seed: int) -> np.ndarray:
    """Seeded random unit vectors, made in blocks (no float64 copy of the whole gallery)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak is the search's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(method: str, args: argparse.Namespace) -> dict:
    import torch

    gallery, queries = features(args.gallery, args.dim, 0), features(args.queries, args.dim, 1)
    if method == "faiss_flat":
        import faiss

        index = faiss.IndexFlatIP(args.dim)  # adding is a copy of the features: made before the baseline
        index.add(gallery)
    if method in ("ours", "torch_chunked"):  # imported before the clock starts: the package pulls in open_clip
        sys.path.insert(0, ROOT)
        from cir.encoder import top_k
    base_rss = rss_mib()  # the features and the libraries, before the search
    reset_peak()
    start = time.perf_counter()
    if method in ("ours", "torch_chunked"):
        _, idx = top_k(torch.from_numpy(queries), torch.from_numpy(gallery), args.k, [-1] * args.queries,
                       use_faiss=method == "ours")
        idx = idx.numpy()
    elif method == "faiss_flat":
        _, idx = index.search(queries, args.k)
    else:  # one big matmul, as a naive script does
        scores = torch.from_numpy(queries) @ torch.from_numpy(gallery).T
        idx = scores.topk(args.k, dim=1).indices.numpy()
    seconds = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    np.save(args.out_prefix + f"{method}.npy", idx.astype(np.int64), allow_pickle=False)
    return {"method": method, "seconds": round(seconds, 2), "peak_rss_mib": round(peak),
            "features_rss_mib": round(base_rss), "above_features_mib": round(peak - base_rss)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--methods", default="ours,torch_chunked,faiss_flat,mm_topk")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--out-prefix", default="/tmp/topk_scale_", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--gallery", str(args.gallery), "--queries",
               str(args.queries), "--dim", str(args.dim), "--k", str(args.k), "--out-prefix", args.out_prefix]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{method}: failed: {done.stderr[-800:]}", file=sys.stderr)
            continue
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{method:>11}: {rows[method]['seconds']:7.2f} s, peak RSS {rows[method]['peak_rss_mib']} MiB "
              f"({rows[method]['above_features_mib']} MiB above the features)", file=sys.stderr)
    ref = args.out_prefix + "faiss_flat.npy"
    if os.path.exists(ref) and "faiss_flat" in rows:
        truth = np.load(ref)
        for method in rows:
            got = np.load(args.out_prefix + f"{method}.npy")
            rows[method]["overlap_with_faiss"] = round(float(np.mean(
                [len(set(a) & set(b)) / args.k for a, b in zip(got, truth)])), 4)
    summary = {"gallery": args.gallery, "queries": args.queries, "dim": args.dim, "k": args.k, "rows": rows}
    if "ours" in rows and "faiss_flat" in rows:
        summary["faiss_over_ours"] = round(rows["faiss_flat"]["seconds"] / rows["ours"]["seconds"], 2)
        print(f"faiss IndexFlatIP seconds / eval top-k seconds = {summary['faiss_over_ours']} "
              f"(target >= 1)", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
