"""`python -m eval COMMAND ...`: score predictions files; run a checkpoint on a benchmark; ablations and the
claims report. Searching a gallery of one's own is `python -m search`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from cir.benchmarks import BENCHMARKS
from cir.config import add_arguments, from_args
from cir.errors import CIRError
from eval.config import RunConfig
from eval.score import (PredictionError, load_json, score_circo, score_cirr, score_fashion200k, score_fashioniq,
                        score_shoes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="metrics from a predictions file, as the official code computes them")
    s.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    s.add_argument("--annotations", required=True,
                   help="CIRR: cap.rc2.<split>.json; CIRCO: annotations/<split>.json; "
                        "FashionIQ: the dataset root, its captions/ folder or one cap.<cat>.<split>.json; "
                        "Shoes / Fashion200k: the dataset root")
    s.add_argument("--predictions", required=True, help="predictions JSON in the test-server format (SPEC.md)")
    s.add_argument("--subset-predictions", help="CIRR: the recall_subset predictions file")
    s.add_argument("--categories", help="FashionIQ: comma-separated subset of categories (default: all)")
    s.add_argument("--split", default="val", help="FashionIQ split of the caption files")
    r = sub.add_parser("run", help="encode, rank and score a benchmark with a checkpoint")
    add_arguments(r, RunConfig)
    a = sub.add_parser("ablate", help="train + evaluate a grid of data mixes; table and plot")
    a.add_argument("--config", required=True, help="ablation YAML (see eval/ablate.py)")
    c = sub.add_parser("claims", help="train + evaluate what the papers' claims need; claims.md / claims.json")
    c.add_argument("--config", required=True, help="claims YAML (see eval/claims.py, experiments/claims.yaml)")
    c.add_argument("overrides", nargs="*", metavar="key=value",
                   help="set config fields, e.g. world_vocabulary=gems output_dir=runs/claims_gems")
    return p


def score(args: argparse.Namespace) -> dict:
    predictions = load_json(args.predictions, "predictions")
    if args.benchmark == "cirr":
        subset = load_json(args.subset_predictions, "subset predictions") if args.subset_predictions else None
        return score_cirr(args.annotations, predictions, subset)
    if args.benchmark == "circo":
        return score_circo(args.annotations, predictions)
    if args.benchmark == "shoes":
        return score_shoes(args.annotations, predictions)
    if args.benchmark == "fashion200k":
        return score_fashion200k(args.annotations, predictions)
    categories = args.categories.split(",") if args.categories else None
    return score_fashioniq(args.annotations, predictions, categories, args.split)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("index", "search", "serve"):  # where these commands were before search/ had its own
        print(f"python -m eval: `{argv[0]}` is `python -m search {argv[0]}` now (docs/SEARCH.md)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ablate":
            from eval.ablate import ablate, load

            try:
                cfg = load(args.config)
            except (ValueError, FileNotFoundError) as err:
                raise PredictionError(str(err)) from err
            rows = ablate(cfg)
            print(f"ablation: {len(rows)} rows in {cfg.output_dir}/ablation.csv, ablation.md, ablation.png",
                  file=sys.stderr)
            result = {"rows": len(rows), "output_dir": cfg.output_dir}
        elif args.command == "claims":
            import os
            from pathlib import Path

            from eval.claims import ROOT, anchored, claims, load

            # the user's paths mean what they say where the command ran; the steps run from the repository
            # (beam_runner, the stage configs' own relative paths such as init_from)
            cfg = anchored(load(args.config, args.overrides), Path.cwd())
            os.chdir(ROOT)
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            report = claims(cfg)
            print(f"claims: {cfg.output_dir}/{cfg.report}.md, {cfg.output_dir}/{cfg.report}.json", file=sys.stderr)
            result = {c["id"]: c["verdict"] for c in report["claims"]}
        elif args.command == "run":
            from eval.run import evaluate

            result = evaluate(from_args(RunConfig, args))
        else:
            result = score(args)
    except CIRError as err:  # a benchmark's files, predictions, a config, a checkpoint: what the user can fix
        print(f"python -m eval {args.command}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
