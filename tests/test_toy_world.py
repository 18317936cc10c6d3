"""The toy world: determinism, sidecars that match the pixels, and benchmarks whose answers are right."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from toyworld.cli import run
from toyworld.edits import apply_edit, coarse_edits, coarse_texts, enumerate_edits, mod_texts
from toyworld.scene import Scene, vocabulary_of

ROOT = Path(__file__).resolve().parents[1]


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def edits_matching(ref: Scene, text: str, phrasing: str = "editor") -> list:
    """Every edit of the reference that this modification text (of one phrasing family) can describe."""
    return [e for e in enumerate_edits(ref) if text in mod_texts(ref, e, phrasing)]


def assert_text_describes(ref: Scene, text: str, target: Scene, phrasing: str = "editor") -> None:
    results = {apply_edit(ref, e).key for e in edits_matching(ref, text, phrasing)}
    assert results == {target.key}, f"{text!r} on {ref.key} gives {results}, target is {target.key}"


# ---------------------------------------------------------------- determinism and layout

def test_same_seed_gives_byte_identical_tree_however_many_processes_write_it(tmp_path, toy_world):
    """The shared world is written by one process per core (its parts side by side); this one in one process."""
    again = tmp_path / "again"
    run(["--output", str(again), "--num-images", "48", "--bench-queries", "12", "--seed", "7", "--jobs", "1"])
    assert tree_hash(again) == tree_hash(toy_world)


def test_other_seed_gives_other_world(tmp_path, toy_world):
    other = tmp_path / "other"
    run(["--output", str(other), "--num-images", "48", "--bench-queries", "12", "--seed", "8"])
    assert tree_hash(other) != tree_hash(toy_world)


def test_layout(toy_world):
    card = load(toy_world / "world.json")
    assert card["config"]["seed"] == 7 and card["counts"]["images"] == 48
    images = sorted(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))
    assert len(images) == 48
    assert {p.suffix for p in images} == {".jpg", ".png"}  # both formats, so readers handle both
    for p in images:
        assert p.with_suffix(".txt").is_file() and p.with_suffix(".json").is_file()
    for bench, files in {"cirr": [f"{kind}.rc2.{split}.json" for split in ("train", "val", "test1")
                                  for kind in ("captions/cap", "image_splits/split")],
                         "circo": ["annotations/val.json", "annotations/test.json",
                                   "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"],
                         "circo_coarse": ["annotations/val.json", "annotations/test.json"],
                         "fashioniq": [f"{kind}/{pre}.{cat}.{split}.json" for cat in ("dress", "shirt", "toptee")
                                       for kind, pre in (("captions", "cap"), ("image_splits", "split"))
                                       for split in ("val", "train")],
                         "shoes": ["relative_captions_shoes.json", "train_im_names.txt", "eval_im_names.txt"],
                         "fashion200k": ["test_queries.txt", "labels/circle_train_detect_all.txt",
                                         "labels/circle_test_detect_all.txt"]}.items():
        for f in files:
            assert (toy_world / "bench" / bench / f).is_file(), f"missing {bench}/{f}"


# ---------------------------------------------------------------- training images

def test_sidecars_describe_the_pixels(toy_world):
    for meta_path in sorted((toy_world / "images").glob("*.json")):
        meta = load(meta_path)
        scene = Scene.from_json(meta)
        assert scene.key == meta["key"] and scene.valid()
        text = meta_path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert text == meta["caption"]
        assert text.endswith(f"on a {scene.background} background")
        for obj in scene.objects:
            assert obj.phrase() in text
        img = Image.open(toy_world / "images" / meta["file"])
        assert img.size == (64, 64) and img.mode == "RGB"
        # The object's centre pixel has the object's colour (JPEG may shift it a little).
        for obj, place in zip(scene.objects, meta["layout"]):
            px = img.getpixel((int(place["x"] * 64), int(place["y"] * 64)))
            assert max(abs(a - b) for a, b in zip(px, vocabulary_of(scene).colours[obj.colour])) < 40, (meta["file"], obj, px)


def test_training_images_come_in_families_of_edits(toy_world):
    by_family: dict[int, list[Scene]] = {}
    for meta_path in sorted((toy_world / "images").glob("*.json")):
        meta = load(meta_path)
        by_family.setdefault(meta["family"], []).append(Scene.from_json(meta))
    assert len(by_family) == 12  # 48 images / family size 4
    for scenes in by_family.values():
        # every later member is one edit away from some earlier member
        for i, scene in enumerate(scenes[1:], start=1):
            assert any(scene.key in {apply_edit(p, e).key for e in enumerate_edits(p)} for p in scenes[:i])


# ---------------------------------------------------------------- benchmarks

def test_cirr_queries_are_consistent(toy_world):
    root = toy_world / "bench" / "cirr"
    scenes = load(root / "toy_scenes.json")
    for split in ("val", "test1", "train"):
        queries = load(root / "captions" / f"cap.rc2.{split}.json")
        image_split = load(root / "image_splits" / f"split.rc2.{split}.json")
        assert len(queries) == 12
        keys = [Scene.from_json(scenes[name]).key for name in image_split]
        assert len(set(keys)) == len(keys), "a CIRR gallery shows each canonical scene once: one right answer"
        for name, rel in image_split.items():
            assert (root / rel).is_file()
        for q in queries:
            assert set(q) == {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}
            members = q["img_set"]["members"]
            assert len(members) == 6 and len(set(members)) == 6
            assert q["reference"] in members and q["target_hard"] in members
            assert set(members) <= set(image_split)
            assert q["target_soft"] == {q["target_hard"]: 1.0}
            assert_text_describes(Scene.from_json(scenes[q["reference"]]), q["caption"],
                                  Scene.from_json(scenes[q["target_hard"]]))
    pairids = [q["pairid"] for s in ("val", "test1", "train") for q in load(root / "captions" / f"cap.rc2.{s}.json")]
    assert len(set(pairids)) == len(pairids)


def test_the_cirr_train_split_is_a_supervised_source(toy_world):
    """The toy CIRR's train split reads as annotated triplets (the supervised upper bound's data), its image sets'
    other members as hard negatives, in images of its own (train/), not the evaluation splits'."""
    from train.supervised import TripletSource

    source = TripletSource("cirr", toy_world / "bench" / "cirr", "train")
    records = source.records
    assert len(records) == 12
    negatives = source.negative_images()
    assert negatives and all(name.startswith("train-") for name in negatives)


def test_circo_ground_truth_is_complete(toy_world):
    root = toy_world / "bench" / "circo"
    scenes = {int(k): Scene.from_json(v) for k, v in load(root / "toy_scenes.json").items()}
    infos = load(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")["images"]
    assert {i["id"] for i in infos} == set(scenes)
    for info in infos:
        assert (root / "COCO2017_unlabeled" / "unlabeled2017" / info["file_name"]).is_file()
    multi = 0
    for split in ("val", "test"):
        for q in load(root / "annotations" / f"{split}.json"):
            assert set(q) == {"id", "reference_img_id", "target_img_id", "relative_caption", "shared_concept",
                              "gt_img_ids"}
            target = scenes[q["target_img_id"]]
            every_answer = sorted(i for i, s in scenes.items() if s.key == target.key)
            assert q["gt_img_ids"][0] == q["target_img_id"]
            assert sorted(q["gt_img_ids"]) == every_answer
            assert q["reference_img_id"] not in q["gt_img_ids"]
            assert q["shared_concept"]
            assert_text_describes(scenes[q["reference_img_id"]], q["relative_caption"], target)
            multi += len(q["gt_img_ids"]) > 1
    assert multi > 0, "some queries have several correct images"


@pytest.mark.parametrize("split", ["val", "train"])
def test_fashioniq_queries_are_consistent(toy_world, split):
    """Both splits (train: what a supervised upper bound trains on, its own queries over the same gallery)."""
    root = toy_world / "bench" / "fashioniq"
    scenes = load(root / "toy_scenes.json")
    for cat in ("dress", "shirt", "toptee"):
        names = load(root / "image_splits" / f"split.{cat}.{split}.json")
        for name in names:
            assert (root / "images" / f"{name}.png").is_file()
        shapes = {Scene.from_json(scenes[n]).objects[0].shape for n in names}
        assert len(shapes) == 1  # one category, one kind of object
        if split == "train":
            assert load(root / "captions" / f"cap.{cat}.train.json") != load(root / "captions" / f"cap.{cat}.val.json")
        for q in load(root / "captions" / f"cap.{cat}.{split}.json"):
            assert set(q) == {"candidate", "target", "captions"}
            assert q["candidate"] in names and q["target"] in names
            assert len(q["captions"]) == 2 and q["captions"][0] != q["captions"][1]
            for text in q["captions"]:
                assert_text_describes(Scene.from_json(scenes[q["candidate"]]), text,
                                      Scene.from_json(scenes[q["target"]]))


def test_coarse_circo_queries_list_every_answer(toy_world):
    """A coarse query ("give the red circle another colour") is answered by several different scenes: its
    ground truth is every gallery image showing any edit of that kind of that object, and nothing else."""
    root = toy_world / "bench" / "circo_coarse"
    scenes = {int(k): Scene.from_json(v) for k, v in load(root / "toy_scenes.json").items()}
    for split in ("val", "test"):
        queries = load(root / "annotations" / f"{split}.json")
        assert len(queries) == 12
        for q in queries:
            ref = scenes[q["reference_img_id"]]
            requests = [(kind, noun) for kind in ("colour", "shape", "position", "background")
                        for noun in ([""] if kind == "background" else [o.noun for o in ref.objects])
                        if q["relative_caption"] in coarse_texts(kind, noun)]
            assert len(requests) == 1, q["relative_caption"]
            answers = {apply_edit(ref, e).key for e in coarse_edits(ref, *requests[0])}
            assert len(answers) >= 2
            assert sorted(q["gt_img_ids"]) == sorted(i for i, s in scenes.items() if s.key in answers)
            assert len({scenes[i].key for i in q["gt_img_ids"]}) >= 2, "several different scenes answer"
            assert q["gt_img_ids"][0] == q["target_img_id"]


def test_shoes_queries_are_consistent(toy_world):
    """Shoes: the images live in nested folders and are named in {train,eval}_im_names.txt; each split shows a
    canonical scene once, so the edited reference is the one right answer."""
    from cir.benchmarks import find_images, shoes_queries

    root = toy_world / "bench" / "shoes"
    scenes = load(root / "toy_scenes.json")
    splits = {}
    for split in ("train", "eval"):
        entries, names = shoes_queries(root, split)
        splits[split] = set(names)
        assert len(entries) == 12
        keys = [Scene.from_json(scenes[n]).key for n in names]
        assert len(set(keys)) == len(keys)
        found = find_images(root, set(names))
        assert set(found) == set(names) and all(p.parent != root for p in found.values())
        for c in entries:
            assert set(c) == {"ReferenceImageName", "ImageName", "RelativeCaption"}
            assert_text_describes(Scene.from_json(scenes[c["ReferenceImageName"]]), c["RelativeCaption"],
                                  Scene.from_json(scenes[c["ImageName"]]))
    assert not splits["train"] & splits["eval"]


def test_fashion200k_queries_differ_in_one_title_word(toy_world):
    """Fashion200k: the title names every attribute of the one object, so an image's title is its scene; a
    query's source and target titles differ in one word, which TIRG's "replace OLD with NEW" names."""
    from cir.benchmarks import different_word, fashion200k_captions, fashion200k_queries
    from toyworld.bench import fashion200k_caption

    root = toy_world / "bench" / "fashion200k"
    scenes = load(root / "toy_scenes.json")
    queries, titles = fashion200k_queries(root)
    assert len(queries) == 12 and len(set(titles.values())) == 6 * 3 * 2 * 4 * 3  # every product once per split
    assert not set(titles) & set(fashion200k_captions(root, "train"))
    for path, title in titles.items():
        assert (root / path).is_file() and path.endswith(".jpeg")
        assert fashion200k_caption(Scene.from_json(scenes[path])) == title
    for source, target in queries:
        a, b = titles[source].split(), titles[target].split()
        assert sum(x != y for x, y in zip(a, b)) == 1
        old, new = different_word(titles[source], titles[target])
        assert old in a and new in b and old not in b


def test_benchmark_images_are_disjoint_from_training_images(toy_world):
    def digests(paths):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    train = digests(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))
    bench = digests(p for p in (toy_world / "bench").rglob("*") if p.suffix in (".jpg", ".jpeg", ".png"))
    assert len(bench) > 100 and not train & bench


# ---------------------------------------------------------------- held-out query phrasings

def test_held_out_phrasings_share_no_sentence_with_any_training_text():
    """The held-out family: four phrasings of every edit (so a benchmark draws the same queries with either),
    none of them a text the toy editor or the caption-diff templates write for that pair, and each naming exactly
    one target scene among all edits of the reference; the same for coarse requests."""
    import random

    from synth.modtext import SPANS, modification_text
    from toyworld.edits import COARSE_KINDS
    from toyworld.scene import GEMS_WORLD, SHAPES_WORLD, caption, random_scene

    checked = 0
    for i in range(40):
        ref = random_scene(random.Random(i), vocab=GEMS_WORLD if i % 2 else SHAPES_WORLD)
        targets: dict[str, set] = {}
        for e in enumerate_edits(ref)[::3]:
            target = apply_edit(ref, e)
            held_out = mod_texts(ref, e, "held-out")
            assert len(held_out) == len(set(held_out)) == len(mod_texts(ref, e)) == 4
            mined = {modification_text(caption(ref), caption(target), random.Random(s), span=span)[0]
                     for span in SPANS for s in range(12)}
            assert not set(held_out) & (set(mod_texts(ref, e)) | mined), (ref.key, e)
            checked += 1
        for e in enumerate_edits(ref):
            for text in mod_texts(ref, e, "held-out"):
                targets.setdefault(text, set()).add(apply_edit(ref, e).key)
        assert all(len(keys) == 1 for keys in targets.values()), [t for t, k in targets.items() if len(k) > 1]
        for kind in COARSE_KINDS:
            for noun in [""] if kind == "background" else [o.noun for o in ref.objects]:
                coarse = coarse_texts(kind, noun, "held-out")
                assert len(set(coarse)) == 4 and not set(coarse) & set(coarse_texts(kind, noun))
    assert checked > 300
    with pytest.raises(ValueError, match="phrasing must be one of"):
        mod_texts(ref, e, "poetic")


def test_a_held_out_phrased_world_differs_only_in_its_query_texts(toy_world, tmp_path):
    """--query-phrasing held-out: the same training images and benchmark images, queries and answers as the
    world of the same seed; only the modification texts differ, each still naming exactly its target."""
    out = tmp_path / "held_out"
    run(["--output", str(out), "--num-images", "48", "--bench-queries", "12", "--seed", "7",
         "--query-phrasing", "held-out"])

    def text_fields(rel: Path) -> list[str]:  # the fields of a benchmark file that hold query texts
        if rel.name.startswith("cap.rc2."):
            return ["caption"]
        if rel.name.startswith("cap."):
            return ["captions"]
        if rel.parent.name == "annotations" and rel.parent.parent.name in ("circo", "circo_coarse"):
            return ["relative_caption"]
        return ["RelativeCaption"] if rel.name == "relative_captions_shoes.json" else []

    differ = 0
    for path in sorted(p for p in toy_world.rglob("*") if p.is_file()):
        rel = path.relative_to(toy_world)
        mine = out / rel
        if rel.name == "world.json":
            assert load(mine)["config"]["query_phrasing"] == "held-out"
            continue
        fields = text_fields(rel)
        if not fields:
            assert mine.read_bytes() == path.read_bytes(), rel
            continue
        theirs, ours = load(path), load(mine)
        assert len(theirs) == len(ours) > 0, rel
        for a, b in zip(theirs, ours):
            assert {k: v for k, v in a.items() if k not in fields} == {k: v for k, v in b.items() if k not in fields}
            for f in fields:
                assert a[f] != b[f], (rel, a[f])
                differ += 1
    assert differ == 12 * (3 + 2 + 2 + 3 * 2 + 2)  # queries per split: CIRR's 3 splits, CIRCO's and coarse
    # CIRCO's 2, FashionIQ's 3 categories of 2 splits, Shoes' 2 splits
    scenes = load(out / "bench" / "cirr" / "toy_scenes.json")
    for q in load(out / "bench" / "cirr" / "captions" / "cap.rc2.test1.json"):
        assert_text_describes(Scene.from_json(scenes[q["reference"]]), q["caption"],
                              Scene.from_json(scenes[q["target_hard"]]), "held-out")
    scenes = load(out / "bench" / "fashioniq" / "toy_scenes.json")
    for q in load(out / "bench" / "fashioniq" / "captions" / "cap.dress.val.json"):
        for text in q["captions"]:
            assert_text_describes(Scene.from_json(scenes[q["candidate"]]), text,
                                  Scene.from_json(scenes[q["target"]]), "held-out")
    result = toy_cli("--output", str(tmp_path / "x"), "--query-phrasing", "poetic")
    assert result.returncode == 2 and "held-out" in result.stderr


# ---------------------------------------------------------------- the second world

def test_vocabularies_share_no_word():
    """A scene's words say which world it belongs to: no shape, colour or background word is in two worlds."""
    from toyworld.scene import VOCABULARIES

    seen: dict[str, str] = {}
    for vocab in VOCABULARIES.values():
        for word in (*vocab.shapes, *vocab.colours, *vocab.backgrounds):
            assert word not in seen, f"{word!r} is in {seen.get(word)} and {vocab.name}"
            seen[word] = vocab.name
        assert set(vocab.fashioniq.values()) <= set(vocab.shapes)


@pytest.mark.parametrize("name", ["gems", "glyphs"])
def test_the_other_worlds_have_their_own_words_and_parse_back(tmp_path, name):
    """The second and third worlds: other shapes, colours, backgrounds and caption openings; their captions parse
    back to the scenes they were written from (the exact toy editor relies on it); their benchmarks are as
    consistent."""
    from toyworld.parse import parse_caption
    from toyworld.scene import SHAPES_WORLD, VOCABULARIES

    vocab = VOCABULARIES[name]
    world = tmp_path / name
    run(["--output", str(world), "--num-images", "24", "--bench-queries", "6", "--seed", "3", "--vocabulary", name])
    assert load(world / "world.json")["vocabulary"]["shapes"] == list(vocab.shapes)
    prefixes = set()
    for meta_path in sorted((world / "images").glob("*.json")):
        meta = load(meta_path)
        scene = Scene.from_json(meta)
        assert vocabulary_of(scene) is vocab and scene.valid()
        assert parse_caption(meta["caption"]) == scene
        prefixes |= {p for p in vocab.caption_prefixes if p and meta["caption"].startswith(p)}
        img = Image.open(world / "images" / meta["file"])
        for obj, place in zip(scene.objects, meta["layout"]):  # filled shapes show their colour at the centre
            if obj.shape in ("ring", "arrow"):  # a ring is hollow, an arrow's centre may be its shaft's edge
                continue
            px = img.getpixel((int(place["x"] * 64), int(place["y"] * 64)))
            assert max(abs(a - b) for a, b in zip(px, vocab.colours[obj.colour])) < 40, (meta["file"], obj, px)
    assert prefixes and not prefixes & set(SHAPES_WORLD.caption_prefixes)
    scenes = load(world / "bench" / "cirr" / "toy_scenes.json")
    for q in load(world / "bench" / "cirr" / "captions" / "cap.rc2.test1.json"):
        assert_text_describes(Scene.from_json(scenes[q["reference"]]), q["caption"],
                              Scene.from_json(scenes[q["target_hard"]]))
    cats = load(world / "world.json")["fashioniq_categories"]
    assert cats == vocab.fashioniq


# ---------------------------------------------------------------- command line

def toy_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "beam_runner.py", "toy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--num-images", "0"], "--num-images: must be at least 1, got 0"),
    (["--bench-queries", "-1"], "--bench-queries: must be at least 1, got -1"),
    (["--image-size", "2000"], "--image-size: must be at most 1024, got 2000"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--jobs", "-1"], "--jobs must be 0 (one per core) or more, not -1"),
])
def test_bad_flags_exit_2(tmp_path, args, message):
    result = toy_cli("--output", str(tmp_path / "w"), *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "w").exists()


def test_non_empty_output_needs_overwrite_and_must_be_a_toy_world(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = toy_cli("--output", str(out), "--num-images", "4", "--bench-queries", "2")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    result = toy_cli("--output", str(out), "--num-images", "4", "--bench-queries", "2", "--overwrite")
    assert result.returncode == 2 and "not a toy world" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_a_toy_world(tmp_path):
    out = tmp_path / "w"
    assert toy_cli("--output", str(out), "--num-images", "4", "--bench-queries", "2").returncode == 0
    result = toy_cli("--output", str(out), "--num-images", "6", "--bench-queries", "2", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert len(list((out / "images").glob("*.txt"))) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w.tmp-")]  # no temp dir left behind


def test_unknown_command_exits_2():
    result = subprocess.run([sys.executable, "beam_runner.py", "frobnicate"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown command" in result.stderr


def test_a_subset_of_the_benchmarks_is_written_as_in_the_whole_world(toy_world, tmp_path):
    """--benchmarks: only the named ones are written, each byte for byte as in the whole world (own streams);
    an unknown name exits 2 naming it."""
    from toyworld.bench import WRITERS
    from toyworld.world import BENCHMARKS

    assert tuple(WRITERS) == BENCHMARKS  # one list of the world's benchmarks, one writer each
    out = tmp_path / "w"
    run(["--output", str(out), "--num-images", "48", "--bench-queries", "12", "--seed", "7",
         "--benchmarks", "circo,cirr"])
    assert sorted(p.name for p in (out / "bench").iterdir()) == ["circo", "cirr"]
    for name in ("cirr", "circo"):
        whole, subset = (sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
                         for root in (toy_world / "bench" / name, out / "bench" / name))
        assert whole == subset and len(whole) > 20
        assert all((toy_world / "bench" / name / f).read_bytes() == (out / "bench" / name / f).read_bytes()
                   for f in whole)
    result = toy_cli("--output", str(tmp_path / "x"), "--benchmarks", "cirr,shose")
    assert result.returncode == 2 and "unknown ['shose']" in result.stderr
