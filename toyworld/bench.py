"""Held-out toy benchmarks written in the official CIRR, CIRCO and FashionIQ layouts.

Ground truth comes from canonical scene keys: a gallery image answers a query when it shows exactly the
reference scene with the modification applied. Each benchmark also gets `toy_scenes.json` (image name or
id -> scene) beside the official files, so tests and curious users can check every answer.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from tqdm import tqdm

from .edits import apply_edit, enumerate_edits, mod_texts, random_edit, shared_concept
from .scene import BACKGROUNDS, COLOURS, SIZES, SLOTS, Obj, Scene, random_scene
from .world import WorldConfig, dump_json, stream, write_image

CIRR_SET_SIZE = 6  # CIRR image sets have six members, reference and target among them
CIRR_QUERIES_PER_SET = 2
CIRCO_HARD_NEGATIVES = 2  # other edits of the reference put in the gallery
CIRCO_MAX_TARGET_RENDERS = 3  # a query has 1..3 correct images
CIRCO_RANDOM_PER_QUERY = 2  # unrelated distractors per query
# FashionIQ's three categories; each is one object of one shape, edited in its attributes only.
FASHIONIQ_SHAPES = {"dress": "triangle", "shirt": "square", "toptee": "circle"}
FASHIONIQ_EDIT_KINDS = ("colour", "size", "position", "background")


def _cirr_set(rng: random.Random, used: set[str]) -> tuple[Scene, list]:
    """A reference and five single-edit variants, all canonical scenes new to this split's gallery."""
    while True:
        ref = random_scene(rng)
        if ref.key in used:
            continue
        candidates = enumerate_edits(ref)
        rng.shuffle(candidates)
        variants, keys = [], {ref.key}
        for edit in candidates:
            target = apply_edit(ref, edit)
            if target.key not in keys and target.key not in used:
                variants.append((edit, target))
                keys.add(target.key)
            if len(variants) == CIRR_SET_SIZE - 1:
                used |= keys
                return ref, variants


def write_cirr(out: Path, cfg: WorldConfig) -> None:
    """cirr/captions/cap.rc2.{val,test1}.json, cirr/image_splits/split.rc2.*.json, images under dev/ test1/."""
    (out / "captions").mkdir(parents=True)
    (out / "image_splits").mkdir()
    scenes: dict[str, dict] = {}
    pairid = 0
    for split, prefix in (("val", "dev"), ("test1", "test1")):
        (out / prefix).mkdir()
        rng = stream(cfg.seed, f"cirr-{split}", 0)
        used: set[str] = set()
        queries, image_split = [], {}
        n_sets = max(1, cfg.bench_queries // CIRR_QUERIES_PER_SET)
        for set_id in tqdm(range(n_sets), desc=f"toy cirr {split}", unit="set"):
            ref, variants = _cirr_set(rng, used)
            members = [ref] + [t for _, t in variants]
            order = list(range(CIRR_SET_SIZE))
            rng.shuffle(order)  # the reference is not always member 0
            names = {}
            for slot, idx in enumerate(order):
                name = f"{prefix}-{set_id}-{slot}-img0"
                names[idx] = name
                img_rng = stream(cfg.seed, f"cirr-{split}-image", set_id * CIRR_SET_SIZE + slot)
                scenes[name] = write_image(out / prefix / name, members[idx], img_rng, "png", cfg.image_size)
                image_split[name] = f"./{prefix}/{name}.png"
            member_names = [f"{prefix}-{set_id}-{slot}-img0" for slot in range(CIRR_SET_SIZE)]
            for v in rng.sample(range(len(variants)), CIRR_QUERIES_PER_SET):
                edit, _ = variants[v]
                target = names[v + 1]
                queries.append({
                    "pairid": pairid, "reference": names[0], "target_hard": target,
                    "target_soft": {target: 1.0}, "caption": rng.choice(mod_texts(ref, edit)),
                    "img_set": {"id": set_id, "members": member_names},
                })
                pairid += 1
        dump_json(queries, out / "captions" / f"cap.rc2.{split}.json")
        dump_json(image_split, out / "image_splits" / f"split.rc2.{split}.json")
    dump_json(scenes, out / "toy_scenes.json")


def write_circo(out: Path, cfg: WorldConfig) -> None:
    """CIRCO/annotations/{val,test}.json and the COCO-style gallery under COCO2017_unlabeled/."""
    rng = stream(cfg.seed, "circo", 0)
    gallery: list[Scene] = []  # index into this list until ids are assigned
    queries: dict[str, list[dict]] = {"val": [], "test": []}
    for split in queries:
        for _ in range(cfg.bench_queries):
            ref = random_scene(rng)
            edit = random_edit(ref, rng)
            target = apply_edit(ref, edit)
            ref_idx = len(gallery)
            gallery.append(ref)
            target_idx = len(gallery)
            gallery += [target] * rng.randint(1, CIRCO_MAX_TARGET_RENDERS)
            others = [e for e in enumerate_edits(ref) if apply_edit(ref, e).key != target.key]
            gallery += [apply_edit(ref, e) for e in rng.sample(others, min(CIRCO_HARD_NEGATIVES, len(others)))]
            gallery += [random_scene(rng) for _ in range(CIRCO_RANDOM_PER_QUERY)]
            queries[split].append({"ref": ref_idx, "target": target_idx, "target_scene": target,
                                   "caption": rng.choice(mod_texts(ref, edit)),
                                   "shared_concept": shared_concept(ref, edit)})
    # Shuffle before numbering so a query's answers are not adjacent ids.
    order = list(range(len(gallery)))
    rng.shuffle(order)
    ids = {idx: pos + 1 for pos, idx in enumerate(order)}
    by_key: dict[str, list[int]] = {}
    for idx, scene in enumerate(gallery):
        by_key.setdefault(scene.key, []).append(ids[idx])

    image_dir = out / "COCO2017_unlabeled" / "unlabeled2017"
    image_dir.mkdir(parents=True)
    (out / "COCO2017_unlabeled" / "annotations").mkdir()
    (out / "annotations").mkdir()
    scenes, infos = {}, []
    for idx, scene in enumerate(tqdm(gallery, desc="toy circo gallery", unit="img")):
        img_id = ids[idx]
        name = f"{img_id:012d}"
        scenes[str(img_id)] = write_image(image_dir / name, scene, stream(cfg.seed, "circo-image", img_id), "jpg",
                                          cfg.image_size)
        infos.append({"id": img_id, "file_name": f"{name}.jpg", "width": cfg.image_size, "height": cfg.image_size})
    infos.sort(key=lambda d: d["id"])
    dump_json({"images": infos}, out / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    for split, qs in queries.items():
        rows = []
        for qid, q in enumerate(qs):
            target_id = ids[q["target"]]
            # gt_img_ids: every gallery image showing the target scene, the designated target first.
            gt = [target_id] + sorted(i for i in by_key[q["target_scene"].key] if i != target_id)
            rows.append({"id": qid, "reference_img_id": ids[q["ref"]], "target_img_id": target_id,
                         "relative_caption": q["caption"], "shared_concept": q["shared_concept"], "gt_img_ids": gt})
        dump_json(rows, out / "annotations" / f"{split}.json")
    dump_json(scenes, out / "toy_scenes.json")


def fashioniq_gallery(shape: str) -> list[Scene]:
    """Every single-object scene of one shape: the category's gallery, each canonical scene once."""
    return [Scene(bg, (Obj(slot, shape, colour, size),))
            for bg, colour, size, slot in itertools.product(BACKGROUNDS, COLOURS, SIZES, SLOTS)]


def write_fashioniq(out: Path, cfg: WorldConfig) -> None:
    """fashionIQ layout: captions/cap.{cat}.val.json, image_splits/split.{cat}.val.json, images/."""
    for sub in ("images", "captions", "image_splits"):
        (out / sub).mkdir(parents=True)
    scenes = {}
    for cat, shape in FASHIONIQ_SHAPES.items():
        rng = stream(cfg.seed, f"fashioniq-{cat}", 0)
        gallery = fashioniq_gallery(shape)
        names = [f"toy{cat}{i:04d}" for i in range(len(gallery))]
        name_of = {scene.key: name for scene, name in zip(gallery, names)}
        for i, (scene, name) in enumerate(zip(gallery, names)):
            img_rng = stream(cfg.seed, f"fashioniq-{cat}-image", i)
            scenes[name] = write_image(out / "images" / name, scene, img_rng, "png", cfg.image_size)
        rows = []
        for _ in range(cfg.bench_queries):
            i = rng.randrange(len(gallery))
            edit = random_edit(gallery[i], rng, FASHIONIQ_EDIT_KINDS)
            target = apply_edit(gallery[i], edit)
            # Two annotators, two wordings: FashionIQ queries carry two captions of the same change.
            rows.append({"candidate": names[i], "target": name_of[target.key],
                         "captions": rng.sample(mod_texts(gallery[i], edit), 2)})
        dump_json(rows, out / "captions" / f"cap.{cat}.val.json")
        dump_json(names, out / "image_splits" / f"split.{cat}.val.json")
    dump_json(scenes, out / "toy_scenes.json")


def write_benchmarks(out: Path, cfg: WorldConfig) -> None:
    write_cirr(out / "cirr", cfg)
    write_circo(out / "circo", cfg)
    write_fashioniq(out / "fashioniq", cfg)
