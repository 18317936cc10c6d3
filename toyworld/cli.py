"""`python beam_runner.py toy --output DIR [--num-images N] [--seed S]`: render the toy world.

The world is written to a temporary sibling directory and renamed into place at the end, so a killed run
never leaves a half-written world where a later step would take it for a whole one.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from cir.cli import cores
from cir.config import ConfigError, add_arguments, from_args

from .bench import WRITERS
from .scene import SIZES, SLOTS
from .world import WorldConfig, dump_json, write_training_images, written_into_place

MARKER = "world.json"  # a directory holding this was written by us and may be replaced with --overwrite
SCHEMA_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beam_runner.py toy", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="directory to create (images/ and bench/ go inside)")
    add_arguments(p, WorldConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy world in --output")
    p.add_argument("--jobs", type=int, default=0,
                   help="processes writing the training images and the benchmarks at once (0: one per core, 1: all "
                        "in this process); the world is the same byte for byte")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorldConfig:
    try:
        cfg = from_args(WorldConfig, args)
        _ = cfg.benchmark_names  # a ValueError naming an unknown benchmark
        if args.jobs < 0:
            raise ValueError(f"--jobs must be 0 (one per core) or more, not {args.jobs}")
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


def _write_part(out: Path, cfg: WorldConfig, part: str) -> int:
    """One independent part of the world: the training images (their count) or one benchmark (0)."""
    if part == "images":
        return write_training_images(out, cfg)
    WRITERS[part](out / "bench" / part, cfg)
    return 0


def _quiet_worker() -> None:
    """Progress bars of parts written side by side would overwrite each other: a worker's stderr goes nowhere
    (its errors come back through its future)."""
    sys.stderr = open(os.devnull, "w", encoding="utf-8")


def write_parts(out: Path, cfg: WorldConfig, jobs: int) -> int:
    """The training images and each benchmark, `jobs` processes at once (0: one per core). Each part draws
    from random streams of its own (toyworld.bench.WRITERS), so the files do not depend on who writes them;
    the number of training images written."""
    parts = [*cfg.benchmark_names, "images"]  # the benchmarks first: CIRCO's large gallery is the longest part
    jobs = min(len(parts), jobs if jobs > 0 else cores())
    if jobs == 1:
        return sum(_write_part(out, cfg, part) for part in parts)
    # spawn, not fork: the caller (the demo, a test) may have run torch, whose thread pools do not survive a fork
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker) as pool:
        futures = {part: pool.submit(_write_part, out, cfg, part) for part in parts}
        written = 0
        for part, future in futures.items():
            written += future.result()
            print(f"toy world: {part} written", file=sys.stderr)
    return written


def run(argv: Optional[list[str]] = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = _check_args(parser, args)
    out = Path(args.output).resolve()
    start = time.time()
    with written_into_place(out) as tmp:
        n = write_parts(tmp, cfg, args.jobs)
        # The card carries no timing or paths: same seed -> byte-identical tree, card included.
        dump_json(world_card(cfg, n), tmp / MARKER)
    print(f"toy world: {n} training images in {out / 'images'}, benchmarks in {out / 'bench'} "
          f"({time.time() - start:.1f}s)", file=sys.stderr)
    return out
