"""How often does the claims report say "holds" when nothing is there? Null comparisons through the real intervals.

    python experiments/verdict_calibration.py [--sims 500] [--out runs/verdict_calibration.json]

A comparison's per-query paired differences are simulated with a true effect of zero, as a claims run makes
them: each query has a part every seed shares (which queries the benchmark drew), each seed shifts every query
by its own amount (a training run lands elsewhere: the seed spread), and each (seed, query) has its own noise.
For each setting (seeds, seed spread, query noise) `--sims` comparisons are judged with the two-level bootstrap
over seeds and queries (`eval.claims.interval(..., "seeds")`, the report's interval until issue 41) and with the
seed-level interval the report now uses (`"seed-level"`: eval.stats.seed_level_ci, a t interval over the seeds'
metrics widened by the queries' bootstrap spread). The rate of "holds" (lower bound above 0; min_effect aside)
should be near 2.5% for a 95% interval. Prints a table and writes JSON. Trains nothing; about 0.05 s per
comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.claims import interval  # noqa: E402

QUERIES = 1000
# (seeds, seed spread sd, query noise: sd of the shared per-query part, sd of each seed's own per-query part)
SETTINGS = [(3, 0.0, 10.0, 10.0), (3, 0.5, 10.0, 10.0), (3, 2.0, 10.0, 10.0), (5, 2.0, 10.0, 10.0)]


def null_runs(rng: np.random.Generator, seeds: int, seed_sd: float, shared_sd: float, own_sd: float) -> list[dict]:
    """Per-seed per-query differences [seeds x QUERIES] with no true effect, as metric groups."""
    shared = rng.normal(0.0, shared_sd, QUERIES)
    return [{"": list(shared + rng.normal(0.0, seed_sd) + rng.normal(0.0, own_sd, QUERIES))} for _ in range(seeds)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sims", type=int, default=500)
    p.add_argument("--out", default="runs/verdict_calibration.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for seeds, seed_sd, shared_sd, own_sd in SETTINGS:
        report = seed_level = 0
        for _ in range(args.sims):
            runs = null_runs(rng, seeds, seed_sd, shared_sd, own_sd)
            report += interval(runs, "seeds")[0] > 0
            seed_level += interval(runs, "seed-level")[0] > 0
        rows.append({"seeds": seeds, "seed_sd": seed_sd, "shared_sd": shared_sd, "own_sd": own_sd,
                     "query_se": round(float(np.hypot(shared_sd, own_sd / np.sqrt(seeds)) / np.sqrt(QUERIES)), 2),
                     "sims": args.sims, "holds_report": round(100 * float(report) / args.sims, 1),
                     "holds_seed_level": round(100 * float(seed_level) / args.sims, 1)})
        print(rows[-1], file=sys.stderr, flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print("| seeds | seed spread (sd) | query se | false 'holds', bootstrap over seeds and queries | seed-level t interval |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seeds']} | {r['seed_sd']} | {r['query_se']} | {r['holds_report']}% | {r['holds_seed_level']}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
