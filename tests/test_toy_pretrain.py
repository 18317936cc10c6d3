"""The pretrained toy CLIP: its corpus (broad, true captions, deterministic, disjoint from the benchmarks), its
rebuild command, and the shipped weights with their card."""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from toyworld import pretrain
from toyworld.pretrain import CAPTION_KINDS, CorpusConfig, corpus_scene, describe, write_corpus_part
from toyworld.render import layout, render
from toyworld.scene import EXTRA_WORDS, OPEN_DOMAIN, SLOTS, VOCABULARIES, Obj, Scene

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "toyworld" / "pretrained" / "toy-clip-64"
COLOUR_SHAPE = re.compile(rf"\b(?:(small|large) )?({'|'.join(OPEN_DOMAIN.colours)}) ({'|'.join(OPEN_DOMAIN.shapes)})\b")


def assert_true_of(scene: Scene, text: str) -> None:
    """Every object a caption names is in the scene with the size it gives; a background, a relation and a count it
    states are the scene's."""
    by_noun = {o.noun: o for o in scene.objects}
    for size, colour, shape in COLOUR_SHAPE.findall(text):
        obj = by_noun.get(f"{colour} {shape}")
        assert obj is not None, f"{text!r} names a {colour} {shape}; the scene is {scene.key}"
        assert not size or size == obj.size, f"{text!r}: the {colour} {shape} is {obj.size}"
    for bg in OPEN_DOMAIN.backgrounds:
        if re.search(rf"\b{bg}\b", text):
            assert bg == scene.background, f"{text!r} names {bg}; the scene is {scene.key}"
    relation = re.search(r"(\w+ \w+) to the (left|right) of (?:a|an) (?:small |large )?(\w+ \w+)", text)
    if relation:
        a, side, b = relation.groups()
        a, b = by_noun[a], by_noun[b]
        assert (SLOTS.index(a.slot) < SLOTS.index(b.slot)) == (side == "left"), (text, scene.key)
    count = re.search(r"\b(one|two|three) (?:shape|object)", text)
    if count:
        assert pretrain.NUMBERS[len(scene.objects)] == count.group(1), (text, scene.key)


def test_captions_are_true_and_of_every_kind():
    kinds = set()
    for i in range(600):
        scene, _ = corpus_scene(7, i)
        kind, text = describe(scene, random.Random(i))
        kinds.add(kind)
        assert_true_of(scene, text)
    assert kinds == set(CAPTION_KINDS)


def test_the_checker_catches_a_false_caption():
    """The check above can fail: a wrong colour, background, side or count is caught."""
    scene = Scene("gray", (Obj("left", "circle", "red", "large"), Obj("right", "star", "teal", "small")))
    assert_true_of(scene, "a large red circle to the left of a teal star on gray")
    for false in ("a blue circle", "a small red circle", "a red circle on sky",
                  "a teal star to the left of a red circle", "three shapes on a gray background"):
        with pytest.raises((AssertionError, KeyError)):
            assert_true_of(scene, false)


def test_corpus_is_broader_than_every_world():
    scenes = [corpus_scene(0, i)[0] for i in range(2000)]
    words = {w for s in scenes for o in s.objects for w in (o.shape, o.colour)} | {s.background for s in scenes}
    for vocab in (*VOCABULARIES.values(), EXTRA_WORDS):  # every world's words and the extra ones, all drawn
        assert set(vocab.shapes) | set(vocab.colours) | set(vocab.backgrounds) <= words, vocab.name
    for shape in OPEN_DOMAIN.shapes:  # and every shape draws
        s = Scene("sky", (Obj("center", shape, "gold", "large"),))
        assert render(s, layout(s, random.Random(0)), 32).getcolors(4096)


def test_corpus_is_deterministic_and_skips_benchmark_scenes(tmp_path):
    cfg = CorpusConfig(seed=3, num_scenes=12, captions_per_scene=2, image_size=32)
    first_scenes = {corpus_scene(3, i)[0].key for i in range(12)}
    excluded = frozenset(sorted(first_scenes)[:4])  # as if a benchmark showed four of them
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    counts = write_corpus_part(a, cfg, 0, 12, excluded)
    assert write_corpus_part(b, cfg, 0, 12, excluded) == counts
    assert counts["skipped_benchmark_scenes"] >= 4
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == 12 * 2 * 3  # image + .txt + .json for each drawing
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    keys = {json.loads(p.read_text())["key"] for p in a.glob("*.json")}
    assert len(keys) == 12 and not keys & excluded
    texts = [p.read_text().strip() for p in a.glob("*_0.txt")]
    assert len(set(texts)) > 6  # captions vary


def test_recall_counts_the_right_image_rank():
    import torch

    sims = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.1, 0.2, 0.3]])  # row i's right image is i
    assert pretrain.recall(sims, 1) == pytest.approx(100 * 2 / 3)  # row 1 ranks its image second
    assert pretrain.recall(sims, 2) == 100.0


def test_pretrain_command_builds_a_clip_with_its_card_and_reuses_its_steps(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--work", str(work), "--out", str(out), "--num-scenes", "40", "--image-size", "32", "--check-queries",
            "3", "--heldout", "50", "clip.model=tiny-clip-32", "max_steps=2", "data.batch_size=8",
            "data.shuffle_buffer=10", "log_every=1", "save_every=2", "optim.warmup_steps=0"]
    assert pretrain.run(argv) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["corpus"]["images"] == 80 and card["steps"] == 2
    assert card["weights_sha256"] == hashlib.sha256((out / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert set(card["heldout_caption_to_image"]) == {"open", *VOCABULARIES}
    assert "R@1" in (out / "README.md").read_text()
    corpus_keys = {json.loads(p.read_text())["key"] for p in (work / "corpus" / "images").glob("*.json")}
    assert not corpus_keys & pretrain.benchmark_keys(work / "check_worlds" / v for v in pretrain.CHECK_WORLDS)
    stamp = (work / "corpus" / "corpus.json").stat().st_mtime_ns
    assert pretrain.run(argv) == 0  # a rerun reuses the corpus, the caption job and the finished stage 0
    assert (work / "corpus" / "corpus.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "card.json").read_text())["weights_sha256"] == card["weights_sha256"]
    with pytest.raises(SystemExit) as exited:  # another corpus config over this corpus: refused
        pretrain.run([*argv[:4], "--num-scenes", "41", *argv[6:]])
    assert exited.value.code == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exited:  # an --out that is not a pretrained CLIP is never deleted
        pretrain.run([*argv[:2], "--out", str(tmp_path / "mine"), *argv[4:]])
    assert exited.value.code == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_shipped_clip_matches_its_card_and_tells_the_worlds_scenes_apart():
    """The committed weights are the ones the card describes, within the size limit, and far above chance on the
    held-out check in both benchmark worlds (200 scenes: chance is R@5 = 2.5%)."""
    card = json.loads((SHIPPED / "card.json").read_text())
    weights = (SHIPPED / "open_clip_model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == card["weights_sha256"] and len(weights) <= 50 * 2**20
    assert card["corpus"]["skipped_benchmark_scenes"] >= 0 and card["corpus"]["checked_benchmark_scenes"] > 10000
    from cir.backbone import create_backbone

    clip = create_backbone(str(SHIPPED))
    for vocab in VOCABULARIES.values():
        assert pretrain.caption_retrieval(clip, vocab, n=200)["r5"] > 40, vocab.name
