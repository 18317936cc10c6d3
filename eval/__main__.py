"""`python -m eval COMMAND ...`: score predictions files (more commands land with their issues)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from eval.score import (PredictionError, load_json, score_circo, score_cirr, score_fashion200k, score_fashioniq,
                        score_shoes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="metrics from a predictions file, as the official code computes them")
    s.add_argument("--benchmark", required=True, choices=("cirr", "circo", "fashioniq", "shoes", "fashion200k"))
    s.add_argument("--annotations", required=True,
                   help="CIRR: cap.rc2.<split>.json; CIRCO: annotations/<split>.json; "
                        "FashionIQ: the dataset root, its captions/ folder or one cap.<cat>.<split>.json; "
                        "Shoes / Fashion200k: the dataset root")
    s.add_argument("--predictions", required=True, help="predictions JSON in the test-server format (SPEC.md)")
    s.add_argument("--subset-predictions", help="CIRR: the recall_subset predictions file")
    s.add_argument("--categories", help="FashionIQ: comma-separated subset of categories (default: all)")
    s.add_argument("--split", default="val", help="FashionIQ split of the caption files")
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
    args = build_parser().parse_args(argv)
    try:
        result = score(args)
    except PredictionError as err:
        print(f"python -m eval {args.command}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
