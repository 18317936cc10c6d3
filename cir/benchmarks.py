"""One reader per benchmark layout: the gallery and the queries of CIRR, CIRCO, FashionIQ, Shoes and Fashion200k,
built as each benchmark's official evaluation code builds them. `eval run` ranks them and `eval score` checks
predictions against the same readers, so a layout is parsed in one place.

    bench = load("shoes", "/data/shoes", "test")
    bench.gallery        # name -> image file, in the names the predictions file uses
    bench.queries[""]    # [Query(qid, reference, texts, exclude_reference, subset, targets)]

Layouts (as distributed):
    cirr:        captions/cap.rc2.SPLIT.json, image_splits/split.rc2.SPLIT.json (name -> path under ROOT)
    circo:       annotations/SPLIT.json, COCO2017_unlabeled/annotations/image_info_unlabeled2017.json and
                 COCO2017_unlabeled/unlabeled2017/<file_name>
    fashioniq:   captions/cap.{dress,shirt,toptee}.SPLIT.json, image_splits/split.CAT.SPLIT.json, images/NAME.png|jpg
    shoes:       relative_captions_shoes.json, {eval,train}_im_names.txt, images anywhere under ROOT by file name
    fashion200k: labels/*_{test,train}_detect_all.txt ("path<TAB>score<TAB>caption", path relative to ROOT) and,
                 for evaluation, test_queries.txt ("source target" paths, one query a line)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cir import jsonfile
from cir.errors import CIRError

BENCHMARKS = ("cirr", "circo", "fashioniq", "shoes", "fashion200k")
# How a query is built (cir/encoder.py): a stage I/II export's composed query, or a baseline every table shows
QUERY_METHODS = ("model", "image_only", "text_only", "sum")
# the split names a user may pass -> the name in the files; the first is the default evaluation split
SPLITS = {
    "cirr": {"val": "val", "test": "test1", "test1": "test1", "train": "train"},
    "circo": {"val": "val", "test": "test"},
    "fashioniq": {"val": "val", "test": "test", "train": "train"},
    "shoes": {"test": "eval", "eval": "eval", "train": "train"},  # Shoes has no validation split
    "fashion200k": {"test": "test", "train": "train"},  # nor has Fashion200k
}
IMAGE_EXTENSIONS = ("png", "jpg")  # FashionIQ's images/NAME.<ext>, tried in this order


class BenchmarkError(CIRError, ValueError):
    """A benchmark's files are missing or do not fit its layout; the message names the file or the query."""


@dataclass
class Query:
    qid: str  # key in the predictions file
    reference: str  # gallery name of the reference image
    texts: list[str]  # one caption, or several whose features are averaged (FashionIQ's two orders)
    exclude_reference: bool  # CIRR, Shoes and Fashion200k remove the reference from the ranking
    subset: Optional[list[str]] = None  # CIRR: the image set members other than the reference
    targets: tuple[str, ...] = ()  # gallery names of the known target(s), for grids (empty on test splits)


@dataclass
class Benchmark:
    gallery: dict[str, Path]  # name -> image file (names as the predictions file uses them)
    queries: dict[str, list[Query]]  # group (FashionIQ category, else "") -> queries
    ids: Callable[[str], object]  # gallery name -> what the predictions file lists (CIRCO: int ids)
    group_gallery: Optional[dict[str, list[str]]] = None  # FashionIQ: each category ranks its own gallery


def load_json(path: str | Path, what: str):
    return jsonfile.load_json(path, what, BenchmarkError)


def split_name(benchmark: str, split: Optional[str]) -> str:
    """The split as the benchmark's files name it; None is the benchmark's evaluation split."""
    if benchmark not in SPLITS:
        raise BenchmarkError(f"unknown benchmark {benchmark!r}; one of {BENCHMARKS}")
    names = SPLITS[benchmark]
    if split is None:
        return next(iter(names.values()))
    if split not in names:
        raise BenchmarkError(f"{benchmark} has no split {split!r}; use one of {sorted(names)}")
    return names[split]


def load(benchmark: str, root: str | Path, split: Optional[str] = None, shared_concept: bool = False) -> Benchmark:
    """The benchmark at `root` (its official layout), split None = its evaluation split (CIRR/CIRCO/FashionIQ val,
    Shoes/Fashion200k test). `shared_concept` (CIRCO) prepends the shared concept to the caption."""
    name = split_name(benchmark, split)
    root = Path(root)
    if benchmark == "circo":
        return load_circo(root, name, shared_concept)
    return {"cirr": load_cirr, "fashioniq": load_fashioniq, "shoes": load_shoes,
            "fashion200k": load_fashion200k}[benchmark](root, name)


# ------------------------------------------------------------------------------------------ CIRR, CIRCO, FashionIQ

def cirr_image_root(root: Path, relative: list[str]) -> Path:
    """The folder CIRR's image_splits paths ("./dev/dev-0-0-img0.png") are relative to: the dataset root itself,
    its img_raw/ (the official download's NLVR2 images), or the folder above (CLIP4Cir's cirr_dataset/ with the
    annotations in cirr_dataset/cirr/). The first that holds the split's first images; the root when none does
    (the missing images are then named as such)."""
    sample = relative[:3]
    for base in (root, root / "img_raw", root.parent):
        if sample and all((base / rel).is_file() for rel in sample):
            return base
    return root


def load_cirr(root: Path, split: str) -> Benchmark:
    """Queries with their image set (`subset`) and known targets: `target_hard`, then any other image the
    annotators scored above 0 in `target_soft` (none on the test split). Evaluation, and training on CIRR
    (train.supervised: the set's other members are hard negatives), read CIRR through this."""
    names = load_json(root / "image_splits" / f"split.rc2.{split}.json", "CIRR image split")
    images = cirr_image_root(root, list(names.values()))
    gallery = {n: images / rel for n, rel in names.items()}
    queries = []
    for q in load_json(root / "captions" / f"cap.rc2.{split}.json", "CIRR captions"):
        try:
            hard = (q["target_hard"],) if "target_hard" in q else ()
            soft = tuple(n for n, v in sorted((q.get("target_soft") or {}).items()) if v > 0 and n not in hard)
            queries.append(Query(str(q["pairid"]), q["reference"], [q["caption"]], True,
                                 [m for m in q["img_set"]["members"] if m != q["reference"]], hard + soft))
        except (KeyError, TypeError) as err:
            raise BenchmarkError(f"cap.rc2.{split}.json: query {q.get('pairid', '?') if isinstance(q, dict) else q!r} "
                                 f"lacks {err} (CIRR's fields: pairid, reference, caption, img_set.members)") from None
    return Benchmark(gallery, {"": queries}, str)


def load_circo(root: Path, split: str, shared_concept: bool = False) -> Benchmark:
    info = load_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", "CIRCO images")
    image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    gallery = {str(i["id"]): image_dir / i["file_name"] for i in info["images"]}
    queries = []
    for q in load_json(root / "annotations" / f"{split}.json", "CIRCO annotations"):
        text = f"{q['shared_concept']} that {q['relative_caption']}" if shared_concept else q["relative_caption"]
        queries.append(Query(str(q["id"]), str(q["reference_img_id"]), [text], False,
                             targets=tuple(str(t) for t in q.get("gt_img_ids", ()))))
    return Benchmark(gallery, {"": queries}, int)


def fashioniq_files(annotations: str | Path, split: str = "val") -> dict[str, Path]:
    """category -> caption file, from the dataset root, its captions/ folder, or one cap.{cat}.{split}.json."""
    path = Path(annotations)
    if path.is_file():
        return {path.name.split(".")[1]: path}
    folder = path / "captions" if (path / "captions").is_dir() else path
    files = {p.name.split(".")[1]: p for p in sorted(folder.glob(f"cap.*.{split}.json"))}
    if not files:
        raise BenchmarkError(f"no FashionIQ caption files cap.*.{split}.json under {folder}")
    return files


def fashioniq_image(root: Path, name: str) -> Path:
    """images/NAME.png or .jpg, whichever exists (the .png path when neither does, for the error message)."""
    candidates = [root / "images" / f"{name}.{ext}" for ext in IMAGE_EXTENSIONS]
    return next((p for p in candidates if p.is_file()), candidates[0])


def load_fashioniq(root: Path, split: str) -> Benchmark:
    gallery, groups, group_gallery = {}, {}, {}
    for cat, caption_file in fashioniq_files(root, split).items():
        group_gallery[cat] = load_json(root / "image_splits" / f"split.{cat}.{split}.json", "FashionIQ split")
        gallery.update({name: fashioniq_image(root, name) for name in group_gallery[cat]})
        groups[cat] = [Query(str(i), q["candidate"], [f"{q['captions'][0]} and {q['captions'][1]}",
                                                      f"{q['captions'][1]} and {q['captions'][0]}"], False,
                             targets=(q["target"],) if "target" in q else ())
                       for i, q in enumerate(load_json(caption_file, "FashionIQ captions"))]
    return Benchmark(gallery, groups, str, group_gallery)


# ------------------------------------------------------------------------------------------ Shoes

def find_images(root: Path, names: set[str]) -> dict[str, Path]:
    """name -> file for the named images anywhere under root (Shoes ships them in attributedata/womens_*/ folders
    or flat); the first found in sorted walk order wins. Names not found are left out."""
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name in names:
                found.setdefault(name, Path(folder) / name)
    return found


def shoes_queries(root: str | Path, split: str = "eval") -> tuple[list[dict], list[str]]:
    """relative_captions_shoes.json entries whose reference and target are both in SPLIT_im_names.txt, in file
    order (the evaluation queries, or the training triplets), and the split's images (the evaluation gallery)."""
    root = Path(root)
    captions = load_json(root / "relative_captions_shoes.json", "Shoes captions")
    names_file = root / f"{split}_im_names.txt"
    if not names_file.is_file():
        raise BenchmarkError(f"Shoes split not found: {names_file}")
    images = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    in_split = set(images)
    queries = [c for c in captions if c["ImageName"] in in_split and c["ReferenceImageName"] in in_split]
    return queries, images


def load_shoes(root: Path, split: str) -> Benchmark:
    """Shoes as CTI-IR / FashionVLP evaluate it: one query per caption entry, the gallery every image of the split,
    the reference removed from the ranking."""
    entries, images = shoes_queries(root, split)
    found = find_images(root, set(images))
    gallery = {name: found.get(name, root / name) for name in images}
    queries = [Query(str(i), c["ReferenceImageName"], [c["RelativeCaption"].strip()], True,
                     targets=(c["ImageName"],)) for i, c in enumerate(entries)]
    return Benchmark(gallery, {"": queries}, str)


# ------------------------------------------------------------------------------------------ Fashion200k

def fashion200k_captions(root: str | Path, split: str = "test") -> dict[str, str]:
    """image path (relative to ROOT) -> caption, from labels/*_SPLIT_detect_all.txt."""
    root = Path(root)
    captions: dict[str, str] = {}
    for label_file in sorted((root / "labels").glob(f"*_{split}_detect_all.txt")):
        for line in label_file.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip():
                captions[parts[0]] = parts[2].strip()
    if not captions:
        raise BenchmarkError(f"no Fashion200k labels labels/*_{split}_detect_all.txt under {root}")
    return captions


def fashion200k_queries(root: str | Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """TIRG's test protocol: test_queries.txt lists "source target" image paths, one query a line; the test labels
    give the gallery (every test image) and the captions that decide hits."""
    root = Path(root)
    captions = fashion200k_captions(root, "test")
    queries_file = root / "test_queries.txt"
    if not queries_file.is_file():
        raise BenchmarkError(f"Fashion200k queries not found: {queries_file}")
    queries = [tuple(line.split()[:2]) for line in queries_file.read_text().splitlines() if line.strip()]
    unknown = [p for q in queries for p in q if p not in captions]
    if unknown:
        raise BenchmarkError(f"test_queries.txt names images without a test caption, e.g. {unknown[0]}")
    return queries, captions


def different_word(source: str, target: str) -> Optional[tuple[str, str]]:
    """TIRG's `get_different_word`: the first word of the source caption that the target lacks and the first word
    of the target that the source lacks; None when either caption has no such word."""
    a, b = source.split(), target.split()
    old = next((w for w in a if w not in b), None)
    new = next((w for w in b if w not in a), None)
    return (old, new) if old is not None and new is not None else None


def load_fashion200k(root: Path, split: str) -> Benchmark:
    """The test queries with TIRG's modification text "replace OLD with NEW" (`different_word` of the source's and
    the target's captions); the targets are every image with the target's caption."""
    if split != "test":
        raise BenchmarkError("Fashion200k is evaluated on its test split (test_queries.txt); "
                             "its train split is read for training (train.supervised)")
    pairs, captions = fashion200k_queries(root)
    by_caption: dict[str, list[str]] = {}
    for path, caption in captions.items():
        by_caption.setdefault(caption, []).append(path)
    queries = []
    for i, (source, target) in enumerate(pairs):
        change = different_word(captions[source], captions[target])
        if change is None:
            raise BenchmarkError(f"test_queries.txt line {i + 1}: the captions of {source} and {target} have no word "
                                 f"to replace ({captions[source]!r} / {captions[target]!r})")
        queries.append(Query(str(i), source, [f"replace {change[0]} with {change[1]}"], True,
                             targets=tuple(by_caption[captions[target]])))
    return Benchmark({path: root / path for path in captions}, {"": queries}, str)
