"""Annotated triplet sets (FashionIQ, CIRR, Shoes, Fashion200k) read from tiny fixtures written in their official
layouts, as triplet streams for stage II."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from train.data import DataError, TrainStream, decode_sample
from train.sources import expand_weighted_sources
from train.supervised import TripletSource, one_word_neighbours, parse_entry

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}


def _png(path: Path, colour: str, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), COLOURS[colour]).save(path)


def _jpg(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), COLOURS[colour]).save(path, quality=90)


def write_fashioniq(root: Path) -> None:
    for name, colour in (("B001", "red"), ("B002", "blue"), ("B003", "green")):
        _png(root / "images" / f"{name}.png", colour)
    (root / "captions").mkdir(parents=True)
    (root / "captions" / "cap.dress.train.json").write_text(json.dumps([
        {"candidate": "B001", "target": "B002", "captions": ["is blue", "has no red."]},
        {"candidate": "B002", "target": "B003", "captions": ["is green", "is greener"]}]))
    (root / "captions" / "cap.shirt.train.json").write_text(json.dumps([
        {"candidate": "B003", "target": "B001", "captions": ["is red", "is more red"]}]))


def write_cirr(root: Path) -> None:
    names = {"train-1-0-img0": "red", "train-1-0-img1": "blue", "train-1-0-img2": "green", "train-1-0-img3": "white"}
    for name, colour in names.items():
        _png(root / "train" / "1" / f"{name}.png", colour)
    (root / "image_splits").mkdir(parents=True)
    (root / "image_splits" / "split.rc2.train.json").write_text(
        json.dumps({n: f"./train/1/{n}.png" for n in names}))
    (root / "captions").mkdir(parents=True)
    members = list(names)
    (root / "captions" / "cap.rc2.train.json").write_text(json.dumps([
        {"pairid": 7, "reference": members[0], "target_hard": members[1], "caption": "make it blue",
         "target_soft": {members[1]: 1.0, members[3]: 0.5}, "img_set": {"id": 3, "members": members}},
        {"pairid": 8, "reference": members[2], "target_hard": members[0], "caption": "make it red",
         "target_soft": {members[0]: 1.0}, "img_set": {"id": 3, "members": members}}]))


def write_shoes(root: Path) -> None:
    for name, colour in (("img_womens_clogs_1.jpg", "red"), ("img_womens_clogs_2.jpg", "blue"),
                         ("img_womens_pumps_3.jpg", "green"), ("img_womens_pumps_4.jpg", "white")):
        _jpg(root / "attributedata" / name.split("_")[2].join(["womens_", ""]) / name, colour)
    (root / "train_im_names.txt").write_text("img_womens_clogs_1.jpg\nimg_womens_clogs_2.jpg\nimg_womens_pumps_3.jpg\n")
    (root / "eval_im_names.txt").write_text("img_womens_pumps_4.jpg\n")
    (root / "relative_captions_shoes.json").write_text(json.dumps([
        {"ReferenceImageName": "img_womens_clogs_1.jpg", "ImageName": "img_womens_clogs_2.jpg",
         "RelativeCaption": "is blue "},
        {"ReferenceImageName": "img_womens_clogs_2.jpg", "ImageName": "img_womens_pumps_3.jpg",
         "RelativeCaption": "is a green pump"},
        {"ReferenceImageName": "img_womens_pumps_3.jpg", "ImageName": "img_womens_pumps_4.jpg",
         "RelativeCaption": "is white (an eval image: not a training triplet)"}]))


F200K = [("women/dresses/casual/1/a.jpeg", "red", "Red  midi dress"), ("women/dresses/casual/2/b.jpeg", "blue",
                                                                     "blue midi dress"),
         ("women/dresses/casual/3/c.jpeg", "blue", "blue midi dress"), ("women/skirts/4/d.jpeg", "green",
                                                                        "green mini skirt"),
         ("women/dresses/casual/5/e.jpeg", "white", "red maxi dress")]


def write_fashion200k(root: Path) -> None:
    for path, colour, _ in F200K:
        _jpg(root / path, colour)
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "dress_train_detect_all.txt").write_text(
        "".join(f"{p}\t0.9\t{c}\n" for p, _, c in F200K))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("annotated")
    out = {}
    for name, write in (("fashioniq", write_fashioniq), ("cirr", write_cirr), ("shoes", write_shoes),
                        ("fashion200k", write_fashion200k)):
        out[name] = base / name
        write(out[name])
    return out


def _drawn(source: TripletSource, seeds=range(20)) -> list[tuple[str, str, str]]:
    out = []
    for i in range(len(source)):
        for seed in seeds:
            s = decode_sample(source.sample(i, random.Random(seed)))
            out.append((s["json"]["ref_key"], s["json"]["tgt_key"], s["mod.txt"]))
    return out


def test_entries_parse_and_other_entries_do_not():
    assert parse_entry("cirr:/data/cirr") == ("cirr", Path("/data/cirr"), "train")
    assert parse_entry("fashioniq:/d/fiq#val") == ("fashioniq", Path("/d/fiq"), "val")
    for other in ("runs/demo/triplets_low", "gs://bucket/x-{0..3}.tar", "mix.yaml", "pipe:cat a.tar", "cirr://x"):
        assert parse_entry(other) is None


def test_fashioniq_joins_both_caption_orders(layouts):
    source = TripletSource("fashioniq", layouts["fashioniq"], "train")
    drawn = set(_drawn(source))
    assert ("B001", "B002", "is blue and has no red") in drawn and ("B001", "B002", "has no red and is blue") in drawn
    assert {(r, t) for r, t, _ in drawn} == {("B001", "B002"), ("B002", "B003"), ("B003", "B001")}  # both categories
    s = decode_sample(source.sample(0, random.Random(0)))
    assert s["ref.png"].getpixel((0, 0)) == COLOURS["red"] and s["tgt.png"].getpixel((0, 0)) == COLOURS["blue"]


def test_the_toy_fashioniq_train_split_is_read_as_triplets(toy_world):
    """The toy world's FashionIQ train split (issue 41: MUR's and CTI-IR's supervised setting): 12 queries per
    category, each a reference and target of its category's gallery with both captions joined."""
    root = toy_world / "bench" / "fashioniq"
    source = TripletSource("fashioniq", root, "train")
    assert len(source) == 3 * 12
    s = decode_sample(source.sample(0, random.Random(0)))
    assert s["json"]["ref_key"] != s["json"]["tgt_key"] and " and " in s["mod.txt"]


def test_cirr_triplets_and_set_members_as_hard_negatives(layouts):
    source = TripletSource("cirr", layouts["cirr"], "train")
    first, second = (decode_sample(source.sample(i, random.Random(0))) for i in range(2))
    assert (first["json"]["ref_key"], first["json"]["tgt_key"], first["mod.txt"]) == (
        "train-1-0-img0", "train-1-0-img1", "make it blue")
    # not the reference, not the target, not a soft positive (img3 has 0.5)
    assert first["json"]["hard_negatives"] == ["train-1-0-img2"]
    assert second["json"]["hard_negatives"] == ["train-1-0-img1", "train-1-0-img3"]
    assert first["tgt.png"].getpixel((0, 0)) == COLOURS["blue"]


def test_shoes_keeps_training_pairs_and_finds_nested_images(layouts):
    source = TripletSource("shoes", layouts["shoes"], "train")
    assert sorted(set(_drawn(source, [0]))) == [("img_womens_clogs_1.jpg", "img_womens_clogs_2.jpg", "is blue"),
                                                ("img_womens_clogs_2.jpg", "img_womens_pumps_3.jpg", "is a green pump")]
    s = decode_sample(source.sample(1, random.Random(0)))
    assert "ref.jpg" in s and max(abs(a - b) for a, b in zip(s["tgt.jpg"].getpixel((5, 5)), COLOURS["green"])) < 8


def test_fashion200k_pairs_captions_one_word_apart(layouts):
    assert one_word_neighbours(["red midi dress", "blue midi dress", "green mini skirt", "red maxi dress"]) == {
        0: [(1, "blue", "red"), (3, "maxi", "midi")], 1: [(0, "red", "blue")], 3: [(0, "midi", "maxi")]}
    source = TripletSource("fashion200k", layouts["fashion200k"], "train")
    caption = {p: " ".join(c.lower().split()) for p, _, c in F200K}
    drawn = set(_drawn(source))
    assert "women/skirts/4/d.jpeg" not in {r for r, _, _ in drawn}  # no caption one word away
    for ref, tgt, text in drawn:
        old, new = text.removeprefix("replace ").split(" with ")
        assert caption[ref].split() != caption[tgt].split()
        assert caption[ref].replace(old, new) == caption[tgt], (ref, tgt, text)
    # both blue dresses are drawn as targets of the red one
    assert {t for r, t, text in drawn if r == "women/dresses/casual/1/a.jpeg" and "blue" in text} == {
        "women/dresses/casual/2/b.jpeg", "women/dresses/casual/3/c.jpeg"}


def test_missing_images_and_wrong_layouts_are_clear_errors(layouts, tmp_path):
    import shutil

    broken = tmp_path / "cirr"
    shutil.copytree(layouts["cirr"], broken)
    (broken / "train" / "1" / "train-1-0-img1.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) named by the annotations are missing.*img1"):
        expand_weighted_sources([f"cirr:{broken}"])
    with pytest.raises(DataError, match="annotations not in the fashioniq layout.*captions"):
        expand_weighted_sources([f"fashioniq:{layouts['cirr']}"])  # CIRR's cap.rc2.train.json has no "captions"
    with pytest.raises(DataError, match="no FashionIQ caption files"):
        expand_weighted_sources([f"fashioniq:{tmp_path}"])
    with pytest.raises(DataError, match="Shoes split not found"):
        expand_weighted_sources([f"shoes:{layouts['shoes']}#test"])


def test_stream_is_seeded_split_by_rank_and_mixes_with_other_sources(layouts, monkeypatch):
    sources = [s for s, _ in expand_weighted_sources([f"cirr:{layouts['cirr']}", f"fashion200k:{layouts['fashion200k']}"])]

    def keys(rank: int, world: int, source_list, seed=0, n=6):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        stream = TrainStream(source_list, None, 1, seed, 0, lambda b: b[0])
        it = iter(stream)
        return [(s["json"]["method"], s["json"]["ref_key"]) for s in (next(it) for _ in range(n))]

    assert keys(0, 1, sources) == keys(0, 1, sources)
    assert keys(0, 1, sources) != keys(0, 1, sources, seed=1)
    assert {m for m, _ in keys(0, 1, sources, n=20)} == {"cirr", "fashion200k"}
    f200k = sources[1:]  # 4 records: each rank reads half of each epoch, disjoint
    first_epoch = [set(r for _, r in keys(rank, 2, f200k, n=2)) for rank in (0, 1)]
    assert not first_epoch[0] & first_epoch[1] and len(first_epoch[0] | first_epoch[1]) == 4


def test_stage2_trains_on_the_four_layouts(layouts, tiny_stage1_export, tmp_path):
    from train.stage2 import main

    out = tmp_path / "s2"
    entries = [f"{name}:{root}" for name, root in layouts.items()]
    assert main([f"output_dir={out}", f"init_from={tiny_stage1_export}", f"data.train={entries}", "max_steps=3",
                 "data.batch_size=4", "save_every=100", "log_every=1", "adapters.bottleneck=8",
                 "hard_negatives.weight=1.0"]) == 0
    assert (out / "final" / "adapters.safetensors").is_file()
    # CIRR's set members are hard negatives by name: the bank encodes exactly those images of the CIRR set
    bank = json.loads((out / "negative_bank" / "bank.json").read_text())
    assert bank["datasets"] == [f"cirr:{layouts['cirr']}"]
    assert bank["keys"] == sorted(TripletSource("cirr", layouts["cirr"], "train").negative_images())
    assert set(bank["keys"]) == {"train-1-0-img1", "train-1-0-img2", "train-1-0-img3"}
    from train.stage1 import main as stage1_main  # a triplet set is not a caption dataset

    assert stage1_main([f"output_dir={tmp_path / 's1'}", f"data.train=['cirr:{layouts['cirr']}']", "max_steps=1",
                        "clip.model=tiny-clip-32"]) == 2
