"""Annotated triplet sets in their official layouts, read as triplet streams for stage II.

A `data.train` entry `FORMAT:ROOT` (or `FORMAT:ROOT#SPLIT`, default split `train`) with FORMAT one of
fashioniq, cirr, shoes, fashion200k is read from the dataset's own annotation files and image folders; it
yields the same raw samples as a triplet shard (`ref.<ext>`, `tgt.<ext>`, `mod.txt`, `json`), so it mixes
by weight with synthetic triplet datasets (`data.weights`) and goes through the same decode and collate.

Layouts (as distributed, and as `eval` reads their validation splits):
    fashioniq:   captions/cap.{dress,shirt,toptee}.SPLIT.json ([{"candidate","target","captions":[2]}]),
                 images/NAME.png|jpg. The two captions are joined with " and " in an order drawn per epoch
                 (as CLIP4Cir's training does).
    cirr:        captions/cap.rc2.SPLIT.json ([{"pairid","reference","target_hard","caption","img_set",
                 "target_soft"}]), image_splits/split.rc2.SPLIT.json (name -> path relative to ROOT). The
                 image set's other members (not the reference, not a target_soft > 0) are hard negatives;
                 stage II's bank encodes them by name (train.negatives).
    shoes:       relative_captions_shoes.json ([{"ReferenceImageName","ImageName","RelativeCaption"}]),
                 SPLIT_im_names.txt (train_im_names.txt), images anywhere under ROOT by file name
                 (the attributedata/womens_*/ folders or flat).
    fashion200k: labels/*_SPLIT_detect_all.txt ("path<TAB>score<TAB>caption", path relative to ROOT). As in
                 TIRG's training: a source image's target is an image whose caption differs from its own in
                 one word, drawn per epoch; the modification is "replace OLD with NEW".

Every image the annotations name must exist: a missing one is a DataError listing them, before training.
Records are permuted by seed + epoch and split by rank then worker, as shard lists are.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from cir import benchmarks, jsonfile, schema
from cir.benchmarks import BenchmarkError, fashioniq_image, find_images, shoes_queries
from cir.errors import CIRError
from train.data import CountingHandler, ReadOptions, Slot, Source, in_subset, slot_share

FORMATS = ("fashioniq", "cirr", "shoes", "fashion200k")
FIELDS = ("ref.jpg", "ref.png", "tgt.jpg", "tgt.png", "mod.txt", "json")


@dataclass
class Choice:
    target: Path  # image file
    target_key: str  # its name in the dataset
    text: str  # the modification text


@dataclass
class Record:
    """One annotated triplet (or, for Fashion200k, one source image and its possible targets)."""

    reference: Path
    reference_key: str
    choices: list[Choice] | Callable[[random.Random], Choice]  # one is drawn per epoch
    hard_negatives: dict[str, Path] = field(default_factory=dict)  # name -> image file, in annotation order

    def pick(self, rng: random.Random) -> Choice:
        if callable(self.choices):
            return self.choices(rng)
        return self.choices[0] if len(self.choices) == 1 else rng.choice(self.choices)


class SupervisedError(CIRError, ValueError):
    """A supervised (annotated) training source that cannot be read; the message names the file."""


def parse_entry(entry: str) -> Optional[tuple[str, Path, str]]:
    """`FORMAT:ROOT[#SPLIT]` -> (format, root, split); None for anything else (shards, dirs, manifests)."""
    head, sep, rest = entry.partition(":")
    if not sep or head not in FORMATS or rest.startswith("//"):
        return None
    root, _, split = rest.partition("#")
    return head, Path(root), split or "train"


def _load_json(path: Path, what: str):
    return jsonfile.load_json(path, what, SupervisedError)


def load_fashioniq(root: Path, split: str) -> list[Record]:
    files = sorted((root / "captions").glob(f"cap.*.{split}.json"))
    if not files:
        raise SupervisedError(f"no FashionIQ caption files captions/cap.*.{split}.json under {root}")

    image = functools.partial(fashioniq_image, root)
    records = []
    for f in files:
        for q in _load_json(f, "FashionIQ captions"):
            a, b = (c.strip().rstrip(".") for c in q["captions"][:2])
            target = image(q["target"])
            records.append(Record(image(q["candidate"]), q["candidate"],
                                  [Choice(target, q["target"], f"{a} and {b}"),
                                   Choice(target, q["target"], f"{b} and {a}")]))
    return records


def load_cirr(root: Path, split: str) -> list[Record]:
    """cir.benchmarks' CIRR queries as records: the reference, its hard target and caption; the image set's
    other members that are no known target as hard negatives."""
    try:
        bench = benchmarks.load_cirr(root, split)
    except BenchmarkError as err:
        raise SupervisedError(str(err)) from None
    gallery, records = bench.gallery, []
    for q in bench.queries[""]:
        if not q.targets:
            raise SupervisedError(f"CIRR pair {q.qid} has no target_hard: the {split} split is not annotated")
        for name in (q.reference, *q.targets[:1], *q.subset):
            if name not in gallery:
                raise SupervisedError(f"CIRR pair {q.qid}: {name} is not in split.rc2.{split}.json")
        tgt = q.targets[0]
        negatives = {m: gallery[m] for m in q.subset if m not in q.targets}
        records.append(Record(gallery[q.reference], q.reference, [Choice(gallery[tgt], tgt, q.texts[0])], negatives))
    return records


def load_shoes(root: Path, split: str) -> list[Record]:
    try:
        entries, images = shoes_queries(root, split)
    except BenchmarkError as err:
        raise SupervisedError(str(err)) from None
    found = find_images(root, set(images))
    records = []
    for c in entries:
        ref, tgt = c["ReferenceImageName"], c["ImageName"]
        records.append(Record(found.get(ref, root / ref), ref,
                              [Choice(found.get(tgt, root / tgt), tgt, c["RelativeCaption"].strip())]))
    return records


def one_word_neighbours(captions: list[str]) -> dict[int, list[tuple[int, str, str]]]:
    """caption index -> [(other caption index, its word that differs, our word)] for captions with the same
    words but one (TIRG's "parent captions": the caption with one word removed, shared by both)."""
    parents: dict[str, list[tuple[int, str]]] = {}
    for i, caption in enumerate(captions):
        words = caption.split()
        for j, word in enumerate(words):
            parents.setdefault(" ".join(words[:j] + ["_"] + words[j + 1:]), []).append((i, word))
    out: dict[int, list[tuple[int, str, str]]] = {}
    for members in parents.values():
        for i, word_i in members:
            for k, word_k in members:
                if k != i:
                    out.setdefault(i, []).append((k, word_k, word_i))
    return out


def load_fashion200k(root: Path, split: str) -> list[Record]:
    label_files = sorted((root / "labels").glob(f"*_{split}_detect_all.txt"))
    if not label_files:
        raise SupervisedError(f"no Fashion200k labels labels/*_{split}_detect_all.txt under {root}")
    images: list[tuple[str, str]] = []
    for f in label_files:
        for line in f.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip():
                images.append((parts[0], " ".join(parts[2].strip().lower().split())))
    captions = sorted({c for _, c in images})
    caption_id = {c: i for i, c in enumerate(captions)}
    by_caption: dict[int, list[str]] = {}
    for path, c in images:
        by_caption.setdefault(caption_id[c], []).append(path)
    neighbours = one_word_neighbours(captions)
    records = []
    for path, c in images:
        options = neighbours.get(caption_id[c])
        if options:
            records.append(Record(root / path, path, _Fashion200kTarget(root, options, by_caption)))
    return records


class _Fashion200kTarget:
    """Draws (target caption, one of its images) and says "replace OLD with NEW"."""

    def __init__(self, root: Path, options: list[tuple[int, str, str]], by_caption: dict[int, list[str]]):
        self.root, self.options, self.by_caption = root, options, by_caption

    def __call__(self, rng: random.Random) -> Choice:
        other, new, old = rng.choice(self.options)
        path = rng.choice(self.by_caption[other])
        return Choice(self.root / path, path, f"replace {old} with {new}")

    def images(self) -> Iterator[Path]:
        for other, _, _ in self.options:
            yield from (self.root / p for p in self.by_caption[other])


LOADERS = {"fashioniq": load_fashioniq, "cirr": load_cirr, "shoes": load_shoes, "fashion200k": load_fashion200k}


def _image_suffix(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(ext, ext)


class TripletSource(Source):
    """An annotated triplet set as a source of raw triplet samples (what a triplet shard holds)."""

    def __init__(self, fmt: str, root: Path, split: str):
        self.fmt, self.root, self.split = fmt, root, split
        try:
            self.records = LOADERS[fmt](root, split)
        except (KeyError, TypeError, IndexError) as err:
            raise SupervisedError(f"{fmt}:{root}: annotations not in the {fmt} layout ({err!r})") from None
        if not self.records:
            raise SupervisedError(f"{fmt}:{root}#{split}: no triplets")
        missing = sorted({str(p) for p in self._images() if not p.is_file()})
        if missing:
            raise SupervisedError(f"{fmt}:{root}#{split}: {len(missing)} image(s) named by the annotations are "
                                  f"missing, e.g. {missing[:3]}")

    def _images(self) -> Iterator[Path]:
        for r in self.records:
            yield r.reference
            yield from (c.target for c in r.choices) if not callable(r.choices) else r.choices.images()
            yield from r.hard_negatives.values()

    def negative_images(self) -> dict[str, Path]:
        """Every image some record names as a hard negative: name -> file (what stage II's bank encodes)."""
        return {name: path for r in self.records for name, path in r.hard_negatives.items()}

    def negative_samples(self) -> Iterator[dict]:
        """Those images as raw samples keyed by their names (the shape of a caption shard's samples)."""
        for name, path in sorted(self.negative_images().items()):
            yield {"__key__": name, _image_suffix(path): path.read_bytes()}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"{self.fmt}:{self.root}#{self.split}"

    def first(self) -> dict:
        return self.sample(0, random.Random(0))

    def epoch(self, seed: int, epoch: int, slot: Slot, handler: CountingHandler,
              options: ReadOptions) -> Iterator[dict]:
        """This slot's records of the epoch's permutation (the permutation is the shuffle), each with its
        target/text drawn by a generator seeded by (seed, epoch, record), those of the subset kept. An image
        that cannot be read any more is skipped and counted, like a corrupt tar member."""
        for index in slot_share(range(len(self)), seed, epoch, slot):
            try:
                sample = self.sample(index, random.Random(f"{seed}:{epoch}:{index}"))
            except (OSError, schema.SchemaError) as err:  # unreadable, or not one of the sample formats
                handler(err)
                continue
            if in_subset(sample["__key__"], options.fraction):
                yield sample

    def sample(self, index: int, rng: random.Random) -> dict:
        """Raw sample (bytes) of record `index`, its target/text drawn with rng."""
        record = self.records[index]
        choice = record.pick(rng)
        key = hashlib.sha256(json.dumps([self.fmt, record.reference_key, choice.target_key, choice.text]).encode()
                             ).hexdigest()[:32]
        meta = {"ref_key": record.reference_key, "tgt_key": choice.target_key, "ref_caption": "", "tgt_caption": "",
                "quality": "supervised", "method": self.fmt, "scores": {}, "hard_negatives": list(record.hard_negatives),
                "seed": None}
        ref = schema.Picture(record.reference.read_bytes(), _image_suffix(record.reference))
        tgt = schema.Picture(choice.target.read_bytes(), _image_suffix(choice.target))
        return schema.TripletSample(key, ref, tgt, choice.text, meta).to_webdataset()


@functools.lru_cache(maxsize=8)
def triplet_source(fmt: str, root: Path, split: str) -> TripletSource:
    """One TripletSource per entry for the negative bank's several looks (annotations read and checked once)."""
    return TripletSource(fmt, root, split)
