"""`python beam_runner.py toy --output DIR [--num-images N] [--seed S]`: render the toy world.

The world is written to a temporary sibling directory and renamed into place at the end, so a killed run
never leaves a half-written world where a later step would take it for a whole one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .bench import write_benchmarks
from .scene import SIZES, SLOTS, VOCABULARIES
from .world import WorldConfig, dump_json, write_training_images

MARKER = "world.json"  # a directory holding this was written by us and may be replaced with --overwrite
SCHEMA_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beam_runner.py toy", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="directory to create (images/ and bench/ go inside)")
    p.add_argument("--num-images", type=int, default=WorldConfig.num_images, help="training images")
    p.add_argument("--seed", type=int, default=WorldConfig.seed)
    p.add_argument("--image-size", type=int, default=WorldConfig.image_size, help="side in pixels")
    p.add_argument("--family-size", type=int, default=WorldConfig.family_size,
                   help="training images come in families of this many edited variants")
    p.add_argument("--bench-queries", type=int, default=WorldConfig.bench_queries,
                   help="queries per benchmark split (per category for FashionIQ)")
    p.add_argument("--vocabulary", choices=sorted(VOCABULARIES), default=WorldConfig.vocabulary,
                   help="the world's words: shapes (the default world) or gems (a second world for transfer checks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy world in --output")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("num_images", "family_size", "bench_queries"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 16 <= args.image_size <= 1024:
        parser.error(f"--image-size must be between 16 and 1024, got {args.image_size}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        parser.error(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            parser.error(f"--output {out} exists and is not empty; pass --overwrite to replace a toy world there")
        if not (out / MARKER).is_file():
            parser.error(f"--output {out} is not a toy world (no {MARKER}); refusing to delete it")


def world_card(cfg: WorldConfig, num_images: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "config": dataclasses.asdict(cfg),
        "counts": {"images": num_images},
        "vocabulary": {"shapes": list(cfg.vocab.shapes), "colours": list(cfg.vocab.colours),
                       "backgrounds": list(cfg.vocab.backgrounds), "sizes": list(SIZES), "slots": list(SLOTS)},
        "fashioniq_categories": cfg.vocab.fashioniq,
        "layout": {"images": "images/{name}.{jpg,png} + {name}.txt caption + {name}.json scene",
                   "bench": "bench/{cirr,circo,circo_coarse,fashioniq,shoes,fashion200k} in the official layouts "
                            "(circo_coarse: CIRCO's, every query one-to-many) + toy_scenes.json"},
    }


def run(argv: Optional[list[str]] = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    cfg = WorldConfig(seed=args.seed, num_images=args.num_images, image_size=args.image_size,
                      family_size=args.family_size, bench_queries=args.bench_queries, vocabulary=args.vocabulary)
    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.time()
        n = write_training_images(tmp, cfg)
        write_benchmarks(tmp / "bench", cfg)
        # The card carries no timing or paths: same seed -> byte-identical tree, card included.
        dump_json(world_card(cfg, n), tmp / MARKER)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"toy world: {n} training images in {out / 'images'}, benchmarks in {out / 'bench'} "
          f"({time.time() - start:.1f}s)", file=sys.stderr)
    return out
