"""Near-duplicates: the same picture resized, re-encoded, lightly cropped or recoloured.

Two images are near-duplicates when (1) their 64-bit difference hashes (imagehash.dhash) are within `bits` of
each other and their 8x8 mean colours close (close_colours), the cheap tests that find candidates, and
(2) `same_picture` confirms it on 64x64 thumbnails: after the better of a few centre zooms (a light crop), every
pixel of each thumbnail but at most `pixels` lies within `tolerance` (TOLERANCE, summed over R, G and B) of the
colours the other has within one pixel's shift (per channel, their least to their greatest). The hash alone is not
enough: on simple pictures (the toy world's few shapes on a plain background) distinct images share a hash, and a
grayscale hash ignores colour.

The caption job uses it twice (pipeline/caption.py):
- among its inputs: an image is dropped (failed row `near_duplicate`, naming the kept key) when a near-duplicate
  of it ranks before it (`rank`: the one with a caption, then more pixels, then the smaller key). Each image is
  compared with all others' hashes and mean colours (a side input of ~200 bytes and a key per image: fine to a
  few million inputs; n^2 hash comparisons); only candidates' thumbnails meet, in a join.
- against `--exclude` folders (a benchmark's images): an input that is an exact or near duplicate of any of
  them is dropped (failed row `excluded`, naming the file). The folders' hashes and mean colours are a side
  input (~200 bytes and a path per image); an excluded file's thumbnail is read again for its candidates only.
Both decisions depend only on the whole input, never on the order of work, so a rerun drops the same images.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import apache_beam as beam
import numpy as np
from PIL import Image

from cir.config import ranged
from pipeline import sources

THUMB = 64  # side of the comparison thumbnail (RGB, 12 KiB)
ZOOMS = (1.0, 1.03, 1.06, 1.1)  # centre zooms tried: a crop of up to ~10% of each side's length
# a pixel matches when its colour is within this of the other's envelope, summed over the three channels (of
# 3 x 255): JPEG noise, a light recolour. Chosen on toy CIRR dev copies (docs/reports/NEAR_DUPLICATES.md): a sum
# tells a purple object from a gray ground (10 + 70 + 40 apart) where a per-channel bound of 64 did not.
TOLERANCE = 96
SHIFT = 1  # and it may match a neighbour this many pixels away: resampling
# The cheap first tests, on the 8x8 mean colours (192 values). Toy world copies (resized 90%, JPEG q75, cropped 5%)
# differ by at most ~5 on average and 75 in any one value; two different toy scenes, mostly plain background,
# often differ little on average but much where an object differs.
MEAN_COLOURS = 12.0  # the average difference, at most
MAX_CELL = 80.0  # the largest difference, at most


@dataclass
class ExcludeConfig:
    """The settings of --exclude and of near-duplicate matching, shared by the caption and synth jobs (their
    configs extend it)."""
    exclude: list[str] = ranged([], help="folders or globs of images (a benchmark's) whose exact or near "
                                         "duplicates are dropped from the input")
    near_dup_bits: int = ranged(12, min=0, max=64, help="near-duplicate candidates: difference hashes within "
                                                        "this many of 64 bits")
    near_dup_pixels: int = ranged(2, min=0, help="near-duplicates: at most this many of a 64x64 thumbnail's "
                                                 "pixels without a match in the other")
    near_dup_tolerance: int = ranged(TOLERANCE, min=0, max=765, help="near-duplicates: a pixel matches one of "
                                                                     "the other's when their colours are within "
                                                                     "this, summed over R, G and B")


@dataclass(frozen=True)
class Fingerprint:
    """What near-duplicate matching knows of one image."""
    dhash: int  # imagehash.dhash as an unsigned 64-bit integer
    thumb: bytes  # THUMB x THUMB x 3 uint8, row-major


def fingerprint(rgb: Image.Image) -> Fingerprint:
    import imagehash

    bits = imagehash.dhash(rgb).hash.flatten()  # [64] bool, most significant first
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    thumb = np.asarray(rgb.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)
    return Fingerprint(value, thumb.tobytes())


def hamming(value: int, table: np.ndarray) -> np.ndarray:
    """Bits differing between one hash and each of `table` ([n] uint64) -> [n] int."""
    return np.bitwise_count(table ^ np.uint64(value)).astype(np.int64)


def _pixels(thumb: bytes) -> np.ndarray:
    return np.frombuffer(thumb, dtype=np.uint8).reshape(THUMB, THUMB, 3)


def coarse(thumb: bytes) -> np.ndarray:
    """[192] float32: the thumbnail's 8x8 mean colours, for the cheap first test (close_colours)."""
    return _pixels(thumb).reshape(8, THUMB // 8, 8, THUMB // 8, 3).mean((1, 3), dtype=np.float32).reshape(-1)


def near_rows(fp: "Fingerprint", table: dict, bits: int) -> np.ndarray:
    """Rows of a hash_table that may be the same picture as `fp`: hash within `bits`, mean colours close."""
    rows = np.flatnonzero(hamming(fp.dhash, table["hashes"]) <= bits)
    if len(rows):
        rows = rows[close_colours(table["coarse"][rows], coarse(fp.thumb))]
    return rows


def close_colours(many: np.ndarray, one: np.ndarray) -> np.ndarray:
    """[n, 192] and [192] mean colours -> [n] bool: within MEAN_COLOURS on average and MAX_CELL everywhere."""
    diff = np.abs(many - one[None])
    return (diff.mean(1) <= MEAN_COLOURS) & (diff.max(1) <= MAX_CELL)


class Picture:
    """A thumbnail made ready to compare: its centre zooms, each with its colour envelope (per channel, the
    least and greatest value within SHIFT pixels), the distance from it that still matches (`tolerance`, summed
    over the channels: _outside), and its 8x8 mean colours."""

    def __init__(self, thumb: bytes, tolerance: int = TOLERANCE):
        pixels = _pixels(thumb)
        self.means = coarse(thumb)
        img = Image.fromarray(pixels)
        self.zooms, self.low, self.high = [], [], []
        for z in ZOOMS:  # z: the centre 1/z of the side, resized back to THUMB
            lo = (THUMB - THUMB / z) / 2
            a = np.asarray(img.resize((THUMB, THUMB), Image.Resampling.BILINEAR, box=(lo, lo, THUMB - lo, THUMB - lo)),
                           dtype=np.int16)
            moved = _shifted(a)
            self.zooms.append(a)
            self.low.append(moved.min(0))
            self.high.append(moved.max(0))
        self.tolerance = tolerance


def _shifted(a: np.ndarray) -> np.ndarray:
    """[(2*SHIFT+1)^2, THUMB, THUMB, 3]: `a` moved by every shift up to SHIFT (edges repeated)."""
    p = np.pad(a, ((SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode="edge")
    span = range(-SHIFT, SHIFT + 1)
    return np.stack([p[SHIFT + dy:SHIFT + dy + THUMB, SHIFT + dx:SHIFT + dx + THUMB] for dy in span for dx in span])


def _unmatched(a: Picture, i: int, b: Picture, j: int) -> int:
    """Pixels of zoom i of `a` outside zoom j of `b`'s envelope, and the other way; the larger count."""
    one = (_outside(a.zooms[i], b.low[j], b.high[j]) > b.tolerance).sum()
    two = (_outside(b.zooms[j], a.low[i], a.high[i]) > a.tolerance).sum()
    return int(max(one, two))


def _outside(pixels: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[THUMB, THUMB, 3] pixels and an envelope -> [THUMB, THUMB]: how far each pixel's colour lies outside it,
    summed over the channels (0 inside)."""
    return (np.maximum(low - pixels, 0) + np.maximum(pixels - high, 0)).sum(-1)


def picture_distance(a: Picture, b: Picture) -> int:
    """The fewest unmatched pixels over the zooms of either picture against the other (0: the same picture)."""
    best = _unmatched(a, 0, b, 0)
    for i in range(1, len(ZOOMS)):
        best = min(best, _unmatched(a, i, b, 0), _unmatched(b, i, a, 0))
    return best


def same_picture(a: Picture, b: Picture, pixels: int) -> bool:
    """Near-duplicates: 8x8 mean colours close (close_colours, a cheap first test), then at most `pixels`
    unmatched (picture_distance)."""
    if not close_colours(a.means[None], b.means)[0]:
        return False
    return picture_distance(a, b) <= pixels


def rank(sample: dict) -> tuple:
    """Which of two near-duplicates is kept: the smaller rank (a caption, then more pixels, then the key)."""
    return (0 if (sample.get("caption") or "").strip() else 1, -sample["width"] * sample["height"], sample["key"])


# ------------------------------------------------------------------------------------------ Beam


def table_entry(name: str, fp: Fingerprint, *rest) -> tuple:
    """What a side-input table holds of one image: (name, dhash, 8x8 mean colours as 192 bytes, *rest); 200
    bytes and a name, where the thumbnail is 12 KiB."""
    return (name, fp.dhash, np.round(coarse(fp.thumb)).astype(np.uint8).tobytes(), *rest)


def hash_table(entries: list) -> dict:
    """[table_entry] -> {"names": [n], "hashes": [n] uint64, "coarse": [n, 192] float32, "rest": [n] tuples},
    sorted by name (the same table whatever order the entries came in)."""
    entries = sorted(entries, key=lambda e: e[0])
    means = [np.frombuffer(e[2], dtype=np.uint8) for e in entries]
    return {"names": [e[0] for e in entries], "hashes": np.array([e[1] for e in entries], dtype=np.uint64),
            "coarse": np.stack(means).astype(np.float32) if means else np.zeros((0, 192), np.float32),
            "rest": [e[3:] for e in entries]}


class NearCandidates(beam.DoFn):
    """(key, Fingerprint, rank) -> (candidate key, (key, thumb)) for each input ranked before it that near_rows
    finds (the candidates are confirmed where their thumbnails join: verify_near)."""

    def __init__(self, bits: int):
        self.bits = bits

    def process(self, item: tuple, table: dict) -> Iterator[tuple]:
        key, fp, own_rank = item
        for i in near_rows(fp, table, self.bits):
            other, (other_rank,) = table["names"][i], table["rest"][i]
            if other != key and other_rank < own_rank:
                yield other, (key, fp.thumb)


def verify_near(joined: tuple, pixels: int, tolerance: int = TOLERANCE) -> Iterator[tuple]:
    """(candidate key, {"fp": [its Fingerprint], "query": [(key, thumb)]}) -> (key, candidate key) for each query
    that is the same picture as the candidate."""
    candidate, groups = joined
    if not groups["fp"]:
        return
    picture = Picture(groups["fp"][0].thumb, tolerance)
    for key, query_thumb in groups["query"]:
        if same_picture(Picture(query_thumb, tolerance), picture, pixels):
            yield key, candidate


class MatchExcluded(beam.DoFn):
    """(key, Fingerprint) -> (key, path) of the first excluded file (by path) it duplicates."""

    def __init__(self, bits: int, pixels: int, tolerance: int = TOLERANCE):
        self.bits, self.pixels, self.tolerance = bits, pixels, tolerance

    def setup(self):
        self.picture = lru_cache(maxsize=4096)(self._file_picture)

    def _file_picture(self, path: str) -> Picture:
        return Picture(_file_fingerprint(path).thumb, self.tolerance)

    def match(self, fp: Fingerprint, table: dict) -> Optional[str]:
        """The first excluded file (by path) that `fp` duplicates, or None."""
        picture = None
        for i in near_rows(fp, table, self.bits):
            path = table["names"][i]
            picture = picture or Picture(fp.thumb, self.tolerance)
            if same_picture(picture, self.picture(path), self.pixels):
                return path
        return None

    def process(self, item: tuple, table: dict) -> Iterator[tuple]:
        key, fp = item
        path = self.match(fp, table)
        if path is not None:
            yield key, path


class ExcludedTable(beam.PTransform):
    """The images of the --exclude folders (paths) -> a one-element PCollection: their hash_table, the side
    input MatchExcluded reads. Files that are not readable images are left out (they cannot match)."""

    def expand(self, paths):
        return (paths | "HashExcluded" >> beam.Map(file_entry) | "Readable" >> beam.Filter(bool)
                | "AsList" >> beam.combiners.ToList() | "Index" >> beam.Map(hash_table))


def _file_fingerprint(path: str) -> Fingerprint:
    """An excluded file's fingerprint, its bytes decoded as the inputs' are (pipeline/images.py: EXIF
    orientation, modes, the decompression-bomb guard); ImageRejected or OSError for a file that is not one."""
    from pipeline.images import prepare_image
    from pipeline.sources import read_stamped

    return fingerprint(prepare_image(read_stamped(path)[0]).image)


def file_entry(path: str) -> Optional[tuple]:
    """The table_entry of an excluded file; None for a file that is not a readable image (it excludes
    nothing; excluded_images lists only image names)."""
    from pipeline.images import ImageRejected

    try:
        return table_entry(path, _file_fingerprint(path))
    except (ImageRejected, OSError):  # a reference folder's non-image: it cannot match any input
        return None


def excluded_images(folders: list[str]) -> dict:
    """path -> file metadata of every image under the --exclude folders or globs; one without images is an error
    (a typo would silently exclude nothing)."""
    found = {}
    for folder in folders:
        images = {path: meta for path, meta in sources.list_inputs(folder).items() if sources.is_image(path)}
        if not images:
            raise ValueError(f"--exclude {folder}: no image files there (jpg, png, webp, ...)")
        found.update(images)
    return found
