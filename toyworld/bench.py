"""Held-out toy benchmarks written in the official CIRR, CIRCO, FashionIQ, Shoes and Fashion200k layouts.

Ground truth comes from canonical scene keys: a gallery image answers a query when it shows exactly the
reference scene with the modification applied. Each benchmark also gets `toy_scenes.json` (image name or
id -> scene) beside the official files, so tests and curious users can check every answer.

`circo_coarse` is a CIRCO-layout benchmark whose every query is coarse ("give the red circle another colour"):
several different scenes answer it, and mAP@K scores how many of them rank high (one-to-many retrieval).
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from tqdm import tqdm

from .edits import (COARSE_KINDS, Edit, apply_edit, coarse_edits, coarse_texts, enumerate_edits, mod_texts,
                    random_edit, shared_concept)
from .scene import SIZES, SLOT_WORD, SLOTS, Obj, Scene, Vocabulary, random_scene, vocabulary_of
from .world import WorldConfig, dump_json, stream, write_image

CIRR_SET_SIZE = 6  # CIRR image sets have six members, reference and target among them
CIRR_QUERIES_PER_SET = 2
CIRCO_HARD_NEGATIVES = 2  # other edits of the reference put in the gallery
CIRCO_MAX_TARGET_RENDERS = 3  # a query has 1..3 correct images
CIRCO_RANDOM_PER_QUERY = 2  # unrelated distractors per query
CIRCO_COARSE_MAX_ANSWERS = 4  # different answering scenes a coarse query puts in the gallery (2..4)
# FashionIQ's three categories are each one object of one shape (Vocabulary.fashioniq), edited in its attributes only.
FASHIONIQ_EDIT_KINDS = ("colour", "size", "position", "background")
SHOES_EDIT_KINDS = ("colour", "shape", "size", "position", "background")  # attribute changes of one or two objects
FASHION200K_MAX_IMAGES = 3  # photos per product (1..3)


def _cirr_set(rng: random.Random, used: set[str], vocab: Vocabulary) -> tuple[Scene, list]:
    """A reference and five single-edit variants, all canonical scenes new to this split's gallery."""
    while True:
        ref = random_scene(rng, vocab=vocab)
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
    """cirr/captions/cap.rc2.{train,val,test1}.json, cirr/image_splits/split.rc2.*.json, images under train/
    dev/ test1/. The train split (annotated triplets drawn like the test queries) is what a supervised upper
    bound trains on (train.supervised); each split draws from its own random streams, so adding it left val and
    test1 as they were."""
    (out / "captions").mkdir(parents=True)
    (out / "image_splits").mkdir()
    scenes: dict[str, dict] = {}
    pairid = 0
    for split, prefix in (("val", "dev"), ("test1", "test1"), ("train", "train")):
        (out / prefix).mkdir()
        rng = stream(cfg.seed, f"cirr-{split}", 0)
        used: set[str] = set()
        queries, image_split = [], {}
        n_sets = max(1, cfg.bench_queries // CIRR_QUERIES_PER_SET)
        for set_id in tqdm(range(n_sets), desc=f"toy cirr {split}", unit="set"):
            ref, variants = _cirr_set(rng, used, cfg.vocab)
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
                    "target_soft": {target: 1.0}, "caption": rng.choice(mod_texts(ref, edit, cfg.query_phrasing)),
                    "img_set": {"id": set_id, "members": member_names},
                })
                pairid += 1
        dump_json(queries, out / "captions" / f"cap.rc2.{split}.json")
        dump_json(image_split, out / "image_splits" / f"split.rc2.{split}.json")
    dump_json(scenes, out / "toy_scenes.json")


Query = tuple[str, str, list[Scene], list[Scene], set[str]]  # caption, shared concept, answers, distractors, keys


def _circo_query(ref: Scene, rng: random.Random, phrasing: str) -> Query:
    """A one-answer CIRCO query: (caption, shared concept, answer renders, distractors, answer keys)."""
    edit = random_edit(ref, rng)
    target = apply_edit(ref, edit)
    answers = [target] * rng.randint(1, CIRCO_MAX_TARGET_RENDERS)
    others = [e for e in enumerate_edits(ref) if apply_edit(ref, e).key != target.key]
    distractors = [apply_edit(ref, e) for e in rng.sample(others, min(CIRCO_HARD_NEGATIVES, len(others)))]
    distractors += [random_scene(rng, vocab=vocabulary_of(ref)) for _ in range(CIRCO_RANDOM_PER_QUERY)]
    return rng.choice(mod_texts(ref, edit, phrasing)), shared_concept(ref, edit), answers, distractors, {target.key}


def _coarse_query(ref: Scene, rng: random.Random, phrasing: str) -> Query:
    """A coarse query: some other value of one attribute; 2..4 of the scenes that answer it are in the gallery,
    with other edits of the reference (which do not answer it) as hard distractors."""
    options = [(kind, noun, accepted) for kind in COARSE_KINDS
               for noun in ([""] if kind == "background" else [o.noun for o in ref.objects])
               for accepted in [coarse_edits(ref, kind, noun)] if len(accepted) >= 2]
    kind, noun, accepted = rng.choice(options)
    keys = {apply_edit(ref, e).key for e in accepted}
    answers = [apply_edit(ref, e) for e in rng.sample(accepted, min(len(accepted), CIRCO_COARSE_MAX_ANSWERS))]
    others = [e for e in enumerate_edits(ref) if apply_edit(ref, e).key not in keys]
    distractors = [apply_edit(ref, e) for e in rng.sample(others, min(CIRCO_HARD_NEGATIVES, len(others)))]
    distractors += [random_scene(rng, vocab=vocabulary_of(ref)) for _ in range(CIRCO_RANDOM_PER_QUERY)]
    return (rng.choice(coarse_texts(kind, noun, phrasing)), shared_concept(ref, Edit(kind, noun)), answers, distractors,
            keys)


def write_circo(out: Path, cfg: WorldConfig, name: str = "circo", make_query=_circo_query) -> None:
    """CIRCO/annotations/{val,test}.json and the COCO-style gallery under COCO2017_unlabeled/. `make_query` draws
    a query for a reference (its text in the world's query phrasing); a gallery image answers it when its scene
    is one of the query's answer keys."""
    rng = stream(cfg.seed, name, 0)
    gallery: list[Scene] = []  # index into this list until ids are assigned
    queries: dict[str, list[dict]] = {"val": [], "test": []}
    for split in queries:
        for _ in range(cfg.bench_queries):
            ref = random_scene(rng, vocab=cfg.vocab)
            ref_idx = len(gallery)
            gallery.append(ref)
            caption, concept, answers, distractors, keys = make_query(ref, rng, cfg.query_phrasing)
            queries[split].append({"ref": ref_idx, "target": len(gallery), "keys": keys, "caption": caption,
                                   "shared_concept": concept})
            gallery += answers + distractors
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
    for idx, scene in enumerate(tqdm(gallery, desc=f"toy {name} gallery", unit="img")):
        img_id = ids[idx]
        file = f"{img_id:012d}"
        scenes[str(img_id)] = write_image(image_dir / file, scene, stream(cfg.seed, f"{name}-image", img_id), "jpg",
                                          cfg.image_size)
        infos.append({"id": img_id, "file_name": f"{file}.jpg", "width": cfg.image_size, "height": cfg.image_size})
    infos.sort(key=lambda d: d["id"])
    dump_json({"images": infos}, out / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    for split, qs in queries.items():
        rows = []
        for qid, q in enumerate(qs):
            target_id = ids[q["target"]]
            # gt_img_ids: every gallery image showing an answer, the designated target first.
            gt = [target_id] + sorted(i for key in q["keys"] for i in by_key.get(key, []) if i != target_id)
            rows.append({"id": qid, "reference_img_id": ids[q["ref"]], "target_img_id": target_id,
                         "relative_caption": q["caption"], "shared_concept": q["shared_concept"], "gt_img_ids": gt})
        dump_json(rows, out / "annotations" / f"{split}.json")
    dump_json(scenes, out / "toy_scenes.json")


def single_object_scenes(vocab: Vocabulary, shape: str) -> list[Scene]:
    """Every single-object scene of one shape, each canonical scene once (a toy FashionIQ category's gallery, a
    toy Fashion200k category's products)."""
    return [Scene(bg, (Obj(slot, shape, colour, size),))
            for bg, colour, size, slot in itertools.product(vocab.backgrounds, vocab.colours, SIZES, SLOTS)]


def write_fashioniq(out: Path, cfg: WorldConfig) -> None:
    """fashionIQ layout: captions/cap.{cat}.{val,train}.json, image_splits/split.{cat}.{val,train}.json, images/.
    The train split (annotated triplets drawn like the val queries, over the same gallery: a category's gallery is
    every single-object scene of its shape) is what a supervised upper bound trains on (train.supervised); it
    draws from its own random stream, so adding it left val as it was."""
    for sub in ("images", "captions", "image_splits"):
        (out / sub).mkdir(parents=True)
    scenes = {}
    for cat, shape in cfg.vocab.fashioniq.items():
        gallery = single_object_scenes(cfg.vocab, shape)
        names = [f"toy{cat}{i:04d}" for i in range(len(gallery))]
        name_of = {scene.key: name for scene, name in zip(gallery, names)}
        for i, (scene, name) in enumerate(zip(gallery, names)):
            img_rng = stream(cfg.seed, f"fashioniq-{cat}-image", i)
            scenes[name] = write_image(out / "images" / name, scene, img_rng, "png", cfg.image_size)
        for split, rng in (("val", stream(cfg.seed, f"fashioniq-{cat}", 0)),
                           ("train", stream(cfg.seed, f"fashioniq-{cat}-train", 0))):
            rows = []
            for _ in range(cfg.bench_queries):
                i = rng.randrange(len(gallery))
                edit = random_edit(gallery[i], rng, FASHIONIQ_EDIT_KINDS)
                target = apply_edit(gallery[i], edit)
                # Two annotators, two wordings: FashionIQ queries carry two captions of the same change.
                rows.append({"candidate": names[i], "target": name_of[target.key],
                             "captions": rng.sample(mod_texts(gallery[i], edit, cfg.query_phrasing), 2)})
            dump_json(rows, out / "captions" / f"cap.{cat}.{split}.json")
            dump_json(names, out / "image_splits" / f"split.{cat}.{split}.json")
    dump_json(scenes, out / "toy_scenes.json")


def write_shoes(out: Path, cfg: WorldConfig) -> None:
    """Shoes layout: relative_captions_shoes.json (both splits), {train,eval}_im_names.txt, images nested under
    attributedata/womens_toy_SPLIT/0/ (found by name, as in the real dataset). Scenes have one or two objects; a
    query is one attribute edit; a split's gallery shows each canonical scene once (one right answer): every
    query's reference and target and one unrelated scene per query."""
    entries, scenes = [], {}
    for split in ("train", "eval"):
        rng = stream(cfg.seed, f"shoes-{split}", 0)
        folder = out / "attributedata" / f"womens_toy_{split}" / "0"
        folder.mkdir(parents=True)
        used: set[str] = set()
        names: list[str] = []

        def add(scene: Scene) -> str:
            name = f"img_womens_toy_{split}_{len(names):06d}"
            scenes[f"{name}.jpg"] = write_image(folder / name, scene, stream(cfg.seed, f"shoes-{split}-image",
                                                                             len(names)), "jpg", cfg.image_size)
            names.append(f"{name}.jpg")
            used.add(scene.key)
            return names[-1]

        for _ in tqdm(range(cfg.bench_queries), desc=f"toy shoes {split}", unit="query"):
            while True:
                ref = random_scene(rng, rng.randint(1, 2), cfg.vocab)
                edit = random_edit(ref, rng, SHOES_EDIT_KINDS)
                target = apply_edit(ref, edit)
                if ref.key not in used and target.key not in used:
                    break
            text = rng.choice(mod_texts(ref, edit, cfg.query_phrasing))
            entries.append({"ReferenceImageName": add(ref), "ImageName": add(target), "RelativeCaption": text})
            other = random_scene(rng, vocab=cfg.vocab)
            if other.key not in used:
                add(other)
        (out / f"{split}_im_names.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    dump_json(entries, out / "relative_captions_shoes.json")
    dump_json(scenes, out / "toy_scenes.json")


def fashion200k_caption(scene: Scene) -> str:
    """A product title listing the single object's attributes ("small red circle left on gray"): one word per
    attribute, so two products one edit apart have titles one word apart (TIRG's queries)."""
    (o,) = scene.objects
    return f"{o.size} {o.colour} {o.shape} {SLOT_WORD[o.slot]} on {scene.background}"


def write_fashion200k(out: Path, cfg: WorldConfig) -> None:
    """Fashion200k layout: labels/{shape}_{train,test}_detect_all.txt ("path<TAB>score<TAB>title") and images
    women/{shape}/{product}/{product}_{k}.jpeg. Every single-object scene is one product per split with 1..3
    photos; test_queries.txt holds `bench_queries` "source target" pairs whose titles differ in one word."""
    (out / "labels").mkdir(parents=True)
    scenes = {}
    product = 0
    test_photos: dict[str, list[str]] = {}  # title -> photo paths (test split)
    for split in ("train", "test"):
        rng = stream(cfg.seed, f"fashion200k-{split}", 0)
        for shape in cfg.vocab.shapes:
            lines = []
            for scene in single_object_scenes(cfg.vocab, shape):
                title = fashion200k_caption(scene)
                folder = out / "women" / shape / str(product)
                folder.mkdir(parents=True)
                for k in range(rng.randint(1, FASHION200K_MAX_IMAGES)):
                    path = f"women/{shape}/{product}/{product}_{k}.jpeg"
                    scenes[path] = write_image(folder / f"{product}_{k}", scene,
                                               stream(cfg.seed, "fashion200k-image", len(scenes)), "jpg",
                                               cfg.image_size, ext="jpeg")
                    lines.append(f"{path}\t{rng.uniform(0.5, 1.0):.3f}\t{title}\n")
                    if split == "test":
                        test_photos.setdefault(title, []).append(path)
                product += 1
            (out / "labels" / f"{shape}_{split}_detect_all.txt").write_text("".join(lines), encoding="utf-8")
    rng = stream(cfg.seed, "fashion200k-queries", 0)
    titles = sorted(test_photos)
    queries = []
    for _ in range(cfg.bench_queries):
        source_photo = rng.choice(test_photos[rng.choice(titles)])
        source = Scene.from_json(scenes[source_photo])
        target_title = fashion200k_caption(apply_edit(source, random_edit(source, rng, SHOES_EDIT_KINDS)))
        queries.append(f"{source_photo} {rng.choice(test_photos[target_title])}\n")
    (out / "test_queries.txt").write_text("".join(queries), encoding="utf-8")
    dump_json(scenes, out / "toy_scenes.json")


# toyworld.world.BENCHMARKS -> its writer(out, cfg); each draws from its own random streams, so any subset is written
# as in the whole world, in any order and process (toyworld.cli.write_parts)
WRITERS = {
    "cirr": write_cirr,
    "circo": write_circo,
    "circo_coarse": lambda out, cfg: write_circo(out, cfg, "circo_coarse", _coarse_query),
    "fashioniq": write_fashioniq,
    "shoes": write_shoes,
    "fashion200k": write_fashion200k,
}
