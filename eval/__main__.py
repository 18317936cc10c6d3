"""`python -m eval COMMAND ...`: score predictions files; run a checkpoint on a benchmark; index, search and
browse a gallery."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from cir.benchmarks import BENCHMARKS, BenchmarkError
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
    r.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    r.add_argument("--data", required=True, help="the benchmark's root in its official layout")
    r.add_argument("--checkpoint", required=True, help="a stage I/II export (or any CLIP for the baselines)")
    r.add_argument("--pretrained", help="with a CLIP architecture name (baselines): its open_clip tag or weights file")
    r.add_argument("--split", help="default: the benchmark's evaluation split (val; test for Shoes and Fashion200k)")
    r.add_argument("--method", default="model", choices=("model", "image_only", "text_only", "sum"))
    r.add_argument("--output", help="where predictions, submission files and metrics go (default: "
                                    "CHECKPOINT/eval/BENCHMARK-SPLIT-METHOD; runs/eval/NAME/... for a CLIP by name)")
    r.add_argument("--template", default=None,
                   help="query prompt, $ = the pseudo tokens (default: the export's own, as trained)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--device", default="cpu")
    r.add_argument("--shared-concept", action="store_true", help="CIRCO: prepend the shared concept to the caption")
    r.add_argument("--grids", type=int, default=6, help="queries shown in OUTPUT/examples.png (0: none)")
    i = sub.add_parser("index", help="encode a gallery once into an index on disk (incremental)")
    i.add_argument("--checkpoint", required=True, help="a stage I/II export or any CLIP")
    i.add_argument("--pretrained", help="with a CLIP architecture name: its open_clip tag or weights file")
    i.add_argument("--images", required=True, help="a folder, a glob, webdataset tars or a caption dataset dir")
    i.add_argument("--output", required=True, help="the index directory (created, or extended)")
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--device", default="cpu")
    i.add_argument("--thumb-size", type=int, default=256, help="longest side of the stored thumbnails")
    i.add_argument("--faiss-min", type=int, default=100_000, help="galleries this large also get a faiss index")
    q = sub.add_parser("search", help="ranked results of a composed, text-only or image-only query")
    q.add_argument("--index", required=True)
    q.add_argument("--image", help="the reference image (a file)")
    q.add_argument("--reference", help="the reference image, by its name in the index")
    q.add_argument("--text", help="the modification text")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--checkpoint", help="default: the one the index was built with")
    q.add_argument("--pretrained", help="with a CLIP architecture name: its tag or weights file (default: the index's)")
    q.add_argument("--keep-reference", action="store_true", help="let the reference itself be a result")
    q.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    q.add_argument("--grid", help="also write the results as a PNG grid here")
    q.add_argument("--device", default="cpu")
    v = sub.add_parser("serve", help="a local web page for searching an index")
    v.add_argument("--index", required=True)
    v.add_argument("--checkpoint", help="default: the one the index was built with")
    v.add_argument("--pretrained", help="with a CLIP architecture name: its tag or weights file (default: the index's)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    v.add_argument("--port", type=port, default=7860, help="1-65535 (default 7860)")
    v.add_argument("--device", default="cpu")
    a = sub.add_parser("ablate", help="train + evaluate a grid of data mixes; table and plot")
    a.add_argument("--config", required=True, help="ablation YAML (see eval/ablate.py)")
    c = sub.add_parser("claims", help="train + evaluate what the papers' claims need; claims.md / claims.json")
    c.add_argument("--config", required=True, help="claims YAML (see eval/claims.py, experiments/claims.yaml)")
    return p


def port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return value


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
            from eval.claims import claims, load

            cfg = load(args.config)
            report = claims(cfg)
            print(f"claims: {cfg.output_dir}/claims.md, {cfg.output_dir}/claims.json", file=sys.stderr)
            result = {c["id"]: c["verdict"] for c in report["claims"]}
        elif args.command == "run":
            from eval.run import run

            result = run(args.benchmark, args.data, args.checkpoint, args.split, args.method, args.output,
                         args.template, args.batch_size, args.device, args.shared_concept, args.grids,
                         args.pretrained)
        elif args.command in ("index", "search", "serve"):
            from eval import gallery_cli

            return getattr(gallery_cli, args.command)(args)
        else:
            result = score(args)
    except BenchmarkError as err:  # PredictionError, GalleryError and errors in a benchmark's files
        print(f"python -m eval {args.command}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
