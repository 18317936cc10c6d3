"""The toy world on disk: training images with sidecars, and held-out benchmarks in official layouts.

Every image is drawn from its own named random stream (`random.Random("{seed}:{stream}:{i}")`, which is
seeded through SHA-512 of the string and so does not depend on PYTHONHASHSEED), so the same seed gives
byte-identical files whatever order or process they are written in.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from cir.config import ranged

from .edits import PHRASINGS, apply_edit, random_edit
from .render import encode, layout, render
from .scene import VOCABULARIES, Scene, Vocabulary, caption, random_scene

PNG_SHARE = 0.2  # some training images are PNG so every reader handles both formats


BENCHMARKS = ("cirr", "circo", "circo_coarse", "fashioniq", "shoes", "fashion200k")  # toyworld/bench.py writes them


@dataclass
class WorldConfig:
    """The world's settings; each field is also a flag of `beam_runner.py toy` (cir.config.add_arguments)."""
    seed: int = ranged(0, help="root of every random stream")
    num_images: int = ranged(2000, min=1, help="training images under images/")
    image_size: int = ranged(64, min=16, max=1024, help="side in pixels")
    family_size: int = ranged(4, min=1, help="training images come in families of this many edited variants, so "
                                             "pair mining finds pairs")
    bench_queries: int = ranged(100, min=1, help="queries per benchmark split (per category for FashionIQ)")
    vocabulary: str = ranged("shapes", choices=tuple(sorted(VOCABULARIES)),
                             help="the world's words: shapes (the default world), gems (a second world for transfer "
                                  "checks) or glyphs (a third, on which nothing was ever chosen)")
    query_phrasing: str = ranged("editor", choices=PHRASINGS,
                                 help="the benchmarks' modification texts: editor (the toy editor's phrasings, which "
                                      "the high-quality triplets carry too) or held-out (phrased as no training "
                                      "text is; same queries, images and answers)")
    benchmarks: str = ranged("all", help=f"the benchmarks to write, comma-separated ({','.join(BENCHMARKS)}), or "
                                         f"all")

    @property
    def benchmark_names(self) -> list[str]:
        """The benchmarks to write, in BENCHMARKS order; ValueError naming an unknown one."""
        if self.benchmarks == "all":
            return list(BENCHMARKS)
        asked = [b.strip() for b in self.benchmarks.split(",") if b.strip()]
        unknown = [b for b in asked if b not in BENCHMARKS]
        if unknown or not asked:
            raise ValueError(f"--benchmarks: unknown {unknown or 'empty list'}; known: {', '.join(BENCHMARKS)}, all")
        return [b for b in BENCHMARKS if b in asked]

    @property
    def vocab(self) -> Vocabulary:
        return VOCABULARIES[self.vocabulary]


def stream(seed: int, name: str, i: int) -> random.Random:
    return random.Random(f"{seed}:{name}:{i}")


@contextlib.contextmanager
def written_into_place(out: Path) -> Iterator[Path]:
    """A temporary sibling folder to write into, renamed to `out` (replacing what is there) when the block ends,
    deleted if it raises: a killed writer never leaves a half-written folder where a whole one is expected."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dump_json(obj, path: Path) -> None:
    """Sorted keys and a fixed layout: JSON files are part of the byte-identical output."""
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_image(path_stem: Path, scene: Scene, rng: random.Random, fmt: str, size: int, ext: str = "") -> dict:
    """Render one scene to `{path_stem}.{ext or fmt}`; returns the scene json with its layout."""
    placed = layout(scene, rng)
    path_stem.with_name(f"{path_stem.name}.{ext or fmt}").write_bytes(encode(render(scene, placed, size), fmt))
    return {**scene.to_json(), "layout": placed}


def family_scenes(rng: random.Random, n: int, vocab: Vocabulary) -> list[Scene]:
    """A base scene and n-1 variants, each one random edit of an earlier member."""
    scenes = [random_scene(rng, vocab=vocab)]
    while len(scenes) < n:
        parent = rng.choice(scenes)
        scenes.append(apply_edit(parent, random_edit(parent, rng)))
    return scenes


def write_training_images(out: Path, cfg: WorldConfig) -> int:
    images = out / "images"
    images.mkdir(parents=True)
    i = 0
    family = 0
    with tqdm(total=cfg.num_images, desc="toy images", unit="img") as bar:
        while i < cfg.num_images:
            for scene in family_scenes(stream(cfg.seed, "train-family", family), cfg.family_size, cfg.vocab):
                if i == cfg.num_images:
                    break
                rng = stream(cfg.seed, "train-image", i)
                fmt = "png" if rng.random() < PNG_SHARE else "jpg"
                stem = images / f"toy_{i:06d}"
                text = caption(scene, rng)
                meta = write_image(stem, scene, rng, fmt, cfg.image_size)
                meta.update(caption=text, family=family, file=f"{stem.name}.{fmt}")
                stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
                dump_json(meta, stem.with_suffix(".json"))
                i += 1
                bar.update(1)
            family += 1
    return i
