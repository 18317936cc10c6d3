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

from cir.config import ConfigError, add_arguments, from_args

from .bench import write_benchmarks
from .scene import SIZES, SLOTS
from .world import WorldConfig, dump_json, write_training_images

MARKER = "world.json"  # a directory holding this was written by us and may be replaced with --overwrite
SCHEMA_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beam_runner.py toy", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="directory to create (images/ and bench/ go inside)")
    add_arguments(p, WorldConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy world in --output")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorldConfig:
    try:
        cfg = from_args(WorldConfig, args)
        _ = cfg.benchmark_names  # a ValueError naming an unknown benchmark
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        parser.error(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            parser.error(f"--output {out} exists and is not empty; pass --overwrite to replace a toy world there")
        if not (out / MARKER).is_file():
            parser.error(f"--output {out} is not a toy world (no {MARKER}); refusing to delete it")
    return cfg


def world_card(cfg: WorldConfig, num_images: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "config": dataclasses.asdict(cfg),
        "counts": {"images": num_images},
        "vocabulary": {"shapes": list(cfg.vocab.shapes), "colours": list(cfg.vocab.colours),
                       "backgrounds": list(cfg.vocab.backgrounds), "sizes": list(SIZES), "slots": list(SLOTS)},
        "fashioniq_categories": cfg.vocab.fashioniq,
        "layout": {"images": "images/{name}.{jpg,png} + {name}.txt caption + {name}.json scene",
                   "bench": "bench/{" + ",".join(cfg.benchmark_names) + "} in the official layouts "
                            "(circo_coarse: CIRCO's, every query one-to-many) + toy_scenes.json"},
    }


def run(argv: Optional[list[str]] = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = _check_args(parser, args)
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
