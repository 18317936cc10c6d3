"""How `caption --exclude` and near-duplicate screening scale (issue #43, item 2).

Both compare each input with a side-input table (pipeline/neardup.py: hash_table, near_rows): the excluded
images' (or all inputs') 64-bit hashes and 8x8 mean colours, ~200 bytes and a name each. This measures, on one
core, the cost of that lookup per input against tables of 100k and 1M rows (hashes of photographs behave like
random bits: candidates are rare, so the lookup is the cost), and the table's memory; then extrapolates:

- exclusion, 100M inputs against a 100k-image benchmark: inputs x lookup(100k);
- near-duplicates among N inputs: N x lookup(N) (the side input is the whole input; quadratic).

    python bench/exclude_scale.py [--queries 20000] [--out bench_exclude.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import neardup  # noqa: E402


def table(n: int, rng: np.random.Generator) -> dict:
    return {"names": [f"{i:032x}" for i in range(n)],
            "hashes": rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1),
            "coarse": rng.integers(0, 256, size=(n, 192)).astype(np.float32), "rest": [()] * n}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 256, size=neardup.THUMB * neardup.THUMB * 3, dtype=np.uint8).tobytes()
    result = {"queries": args.queries, "bits": 12, "tables": {}}
    for n in (100_000, 1_000_000):
        t = table(n, rng)
        mib = (t["hashes"].nbytes + n * 192 + sum(len(x) + 49 for x in t["names"])) / 2**20  # entries as stored
        hashes = rng.integers(0, 2**63, size=args.queries, dtype=np.int64).astype(np.uint64)
        fps = [neardup.Fingerprint(int(h), thumb) for h in hashes]
        start = time.perf_counter()
        candidates = sum(len(neardup.near_rows(fp, t, 12)) for fp in fps)
        per_query = (time.perf_counter() - start) / args.queries
        result["tables"][n] = {"lookup_ms": round(per_query * 1e3, 4), "table_mib": round(mib, 1),
                               "candidates_per_query": candidates / args.queries}
        print(f"table of {n:>9,}: {per_query * 1e3:.3f} ms per input, {candidates / args.queries:.4f} candidates, "
              f"~{mib:.0f} MiB", flush=True)
    per_100k, per_1m = (result["tables"][n]["lookup_ms"] / 1e3 for n in (100_000, 1_000_000))
    result["extrapolated_core_hours"] = {
        "exclude_100M_inputs_vs_100k": round(1e8 * per_100k / 3600, 1),
        "exclude_1M_inputs_vs_100k": round(1e6 * per_100k / 3600, 2),
        "near_duplicates_among_1M": round(1e6 * per_1m / 3600, 1),
        "near_duplicates_among_100M (per_1m x 100, x 100 inputs)": round(1e8 * per_1m * 100 / 3600, 0)}
    print(json.dumps(result["extrapolated_core_hours"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
