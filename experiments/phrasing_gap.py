"""How much each row loses when the same queries are phrased as no training text is: a claims run's rows on a
benchmark and on its held-out-phrased twin (BenchSpec.phrasing), the same queries, images and answers.

For every benchmark of the config with `phrasing: held-out`, its twin is the benchmark with the same layout,
folder and split in the default phrasing; every row evaluated on both (the rows of the claims that name the
held-out one) gets, per metric those claims judge, its mean on each and the paired per-query difference
(editor − held-out, seed i against seed i) with a 95% interval over seeds and queries (eval.stats). Reads the
finished cells of `python -m eval claims --config CONFIG`; trains and evaluates nothing. Prints JSON and a
markdown table.

    python experiments/phrasing_gap.py --config experiments/claims.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import stats  # noqa: E402
from eval.claims import ClaimsConfig, evaluation_dir, load, row_seeds  # noqa: E402


def twins(cfg: ClaimsConfig) -> dict[str, str]:
    """held-out benchmark name -> its default-phrasing twin's name."""
    out = {}
    for name, spec in cfg.benchmarks.items():
        if spec.phrasing == "editor":
            continue
        same = [n for n, s in cfg.benchmarks.items() if s.phrasing == "editor" and
                (s.benchmark, s.name, s.split) == (spec.benchmark, spec.name, spec.split)]
        if not same:
            raise SystemExit(f"benchmark {name}: no benchmark of the same layout, folder and split in the editor "
                             f"phrasing to compare it with")
        out[name] = same[0]
    return out


def per_seed(cfg: ClaimsConfig, row: str, bench: str, metric: str) -> list[dict]:
    values = []
    for seed in row_seeds(cfg, row):
        path = evaluation_dir(cfg, row, seed, bench) / "per_query.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python -m eval claims --config ...` first")
        values.append(json.loads(path.read_text())[metric])
    return values


def gaps(cfg: ClaimsConfig) -> list[dict]:
    out = []
    for held_out, editor in twins(cfg).items():
        judged = [c for c in cfg.claims if held_out in c.benchmarks]
        rows = list(dict.fromkeys(r for c in judged for r in [*c.better, *c.than]))
        for metric in dict.fromkeys(c.benchmarks[held_out] for c in judged):
            for row in rows:
                ours, theirs = per_seed(cfg, row, editor, metric), per_seed(cfg, row, held_out, metric)
                diffs = [stats.paired_difference(a, b) for a, b in zip(ours, theirs)]
                out.append({"row": row, "benchmark": editor, "held_out": held_out, "metric": metric,
                            "editor": round(stats.metric_of(stats.mean_over(ours)), 2),
                            "held_out_value": round(stats.metric_of(stats.mean_over(theirs)), 2),
                            "difference": round(stats.metric_of(stats.mean_over(diffs)), 2),
                            "ci95": list(stats.bootstrap_ci_over_seeds(diffs))})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| row | benchmark | metric | editor's phrasing | held-out phrasing | editor − held-out [95%] |",
             "|---|---|---|---|---|---|"]
    show = stats.shown  # the stored values, rounded as a reader of the JSON rounds them
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['row']} | {r['benchmark']} | {r['metric']} | {show(r['editor'])} | "
                     f"{show(r['held_out_value'])} | {show(r['difference'], True)} "
                     f"[{show(lo, True)}, {show(hi, True)}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the claims config the cells were made with")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the overrides they were made with")
    args = p.parse_args(argv)
    rows = gaps(load(args.config, args.overrides))
    print(markdown(rows), file=sys.stderr)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
