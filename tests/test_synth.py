"""Triplet synthesis: mined (low quality) and toy-edited (high quality) triplets, bad input, determinism."""
from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from cir.schema import TripletSample
from synth import mining
from synth.job import run
from synth.modtext import caption_diff, modification_text
from toyworld.edits import Edit, apply_edit, mod_texts
from toyworld.parse import parse_caption
from toyworld.scene import caption as toy_caption

BEAM = ["--runner", "DirectRunner"]


def triplets(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def caption_samples(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in triplets(out)}


@pytest.fixture(scope="module")
def low(toy_captions, tmp_path_factory):
    src, _ = toy_captions
    out = tmp_path_factory.mktemp("lq") / "low"
    stats = run(["--input", str(src), "--output", str(out), "--quality", "low", "--image-weight", "0",
                 "--band-low", "0.3", "--seed", "1", *BEAM])
    return out, stats


# ---------------------------------------------------------------- low quality

def test_mined_triplets_are_consistent(low, toy_captions):
    out, stats = low
    source = caption_samples(toy_captions[0])
    rows = triplets(out)
    assert len(rows) == stats["written"] > 10
    assert stats["inputs"] == 48 and stats["candidates"] >= stats["written"]
    for t in rows:
        meta = json.loads(t["json"])
        assert meta["quality"] == "low" and meta["method"] == "mined-template" and meta["seed"] == 1
        ref, tgt = source[meta["ref_key"]], source[meta["tgt_key"]]
        assert meta["ref_key"] != meta["tgt_key"]
        assert meta["tgt_key"] not in meta["hard_negatives"] and meta["ref_key"] not in meta["hard_negatives"]
        assert set(meta["hard_negatives"]) <= set(source)
        # never an image captioned as the target: it would be a right answer pushed away
        assert all(source[k]["txt"].decode() != meta["tgt_caption"] for k in meta["hard_negatives"])
        ref_field = next(f for f in t if f.startswith("ref.") and not f.endswith("npy"))
        assert t[ref_field] == ref.get("jpg", ref.get("png"))  # the real images, untouched
        tgt_field = next(f for f in t if f.startswith("tgt.") and not f.endswith("npy"))
        assert t[tgt_field] == tgt.get("jpg", tgt.get("png"))
        assert meta["ref_caption"] == ref["txt"].decode() and meta["tgt_caption"] == tgt["txt"].decode()
        # the modification text says exactly what differs between the captions
        changes = caption_diff(meta["ref_caption"], meta["tgt_caption"])
        assert [c.__dict__ for c in changes] == meta["changes"] and 1 <= len(changes) <= 2
        mod = t["mod.txt"].decode().split()
        for c in changes:  # every changed word is named (the phrase around it too; "a" may become "the")
            assert all(w in mod for w in f"{c.before} {c.after}".split() if w not in ("a", "an"))
        assert 0.3 <= meta["scores"]["similarity"] <= 0.98


def test_same_seed_same_triplets_other_seed_other_choice(low, toy_captions, tmp_path):
    out, stats = low
    src = toy_captions[0]
    again = tmp_path / "again"
    run(["--input", str(src), "--output", str(again), "--quality", "low", "--image-weight", "0",
         "--band-low", "0.3", "--seed", "1", *BEAM])
    for tar in (out / "shards").glob("*.tar"):
        assert (again / "shards" / tar.name).read_bytes() == tar.read_bytes()
    n = stats["written"] // 2
    picks = []
    for seed in (1, 2):
        dst = tmp_path / f"seed{seed}"
        run(["--input", str(src), "--output", str(dst), "--quality", "low", "--image-weight", "0", "--band-low", "0.3",
             "--seed", str(seed), "--num-triplets", str(n), *BEAM])
        picks.append({r["key"] for r in pq.read_table(dst / "index.parquet").to_pylist()})
    assert len(picks[0]) == len(picks[1]) == n and picks[0] != picks[1]


def image_bytes(captions: Path) -> int:
    return sum(len(v) for s in triplets(captions) for k, v in s.items() if k in ("jpg", "png"))


def test_mined_images_cross_no_grouping(toy_world, tmp_path):
    """#24: a mined triplet's images join it as where they lie in their caption shard (each image once), go with
    it into its shard's grouping, and are read there: no grouping carries image bytes (stats.json's
    shuffle_bytes, on images made ~30 KiB by trailing bytes a decoder ignores, so that they would dominate any
    grouping that carried them); the triplets hold the caption dataset's bytes."""
    from pipeline.caption import run as caption

    images = tmp_path / "images"
    images.mkdir()
    for path in (toy_world / "images").iterdir():
        data = path.read_bytes()
        images.joinpath(path.name).write_bytes(data + bytes(30_000) if path.suffix in (".jpg", ".png") else data)
    caption(["--input", str(images), "--output", str(tmp_path / "cap"), "--shard-size", "10", *BEAM])
    stats = run(["--input", str(tmp_path / "cap"), "--output", str(tmp_path / "low"), "--quality", "low",
                 "--image-weight", "0", "--band-low", "0.3", "--seed", "1", *BEAM])
    moved, total = stats["shuffle_bytes"], image_bytes(tmp_path / "cap")
    assert set(moved) == {"JoinImages", "GroupByShard"} and total > 48 * 30_000
    assert moved["JoinImages"] + moved["GroupByShard"] < total / 10, moved
    source = {s["__key__"]: s.get("jpg") or s.get("png") for s in triplets(tmp_path / "cap")}
    written = triplets(tmp_path / "low")
    assert len(written) == stats["written"] > 10
    for t in written:
        meta = json.loads(t["json"])
        for role in ("ref", "tgt"):
            (member,) = [m for m in t if m in (f"{role}.jpg", f"{role}.png")]
            assert t[member] == source[meta[f"{role}_key"]] and len(t[member]) > 30_000


def test_rerun_writes_nothing_twice(low, toy_captions):
    out, first = low
    stats = run(["--input", str(toy_captions[0]), "--output", str(out), "--quality", "low", "--image-weight", "0",
                 "--band-low", "0.3", "--seed", "1", *BEAM])
    assert stats["shards_written_this_run"] == 0 and stats["written"] == first["written"]


def test_exclude_drops_copies_of_benchmark_images_before_mining(low, toy_world, toy_captions, tmp_path, capsys):
    """synth --exclude (a caption dataset made without it): a sample whose image is a copy of an image under the
    folders (resized 90%, JPEG q85) is a failed row `excluded` naming the file, and is no triplet's reference,
    target or hard negative; the rest is mined as before; a rerun writes nothing twice."""
    from PIL import Image

    src = toy_captions[0]
    key_of = {Path(r["source"]).name: r["key"] for r in pq.read_table(src / "index.parquet").to_pylist()}
    used = {k for t in triplets(low[0]) for k in (json.loads(t["json"])["ref_key"], json.loads(t["json"])["tgt_key"])}
    names = sorted(n for n, k in key_of.items() if k in used)[:3]  # images the unscreened run mined
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in names:
        img = Image.open(toy_world / "images" / name).convert("RGB")
        img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.Resampling.BICUBIC).save(
            bench / f"copy-{Path(name).stem}.jpg", quality=85)
    mine = ["--input", str(src), "--quality", "low", "--image-weight", "0", "--band-low", "0.3", "--seed", "1", *BEAM]
    args = [*mine, "--exclude", str(bench)]
    out = tmp_path / "low"
    stats = run(["--output", str(out), *args])
    excluded = {key_of[n] for n in names}
    assert stats["failed_by_reason"] == {"excluded": 3} and stats["inputs"] == 48 and stats["written"] > 10
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    assert {r["source"] for r in failed} == excluded and {r["reason"] for r in failed} == {"excluded"}
    for row in failed:
        name = next(n for n in names if key_of[n] == row["source"])
        assert str(bench / f"copy-{Path(name).stem}.jpg") in row["error"]
    for t in triplets(out):
        meta = json.loads(t["json"])
        assert not {meta["ref_key"], meta["tgt_key"], *meta["hard_negatives"]} & excluded
    card = json.loads((out / "dataset.json").read_text())
    assert card["inputs"]["excluded"]["files"] == 3 and "excluded 3" in (out / "README.md").read_text()
    again = run(["--output", str(out), *args])
    assert again["shards_written_this_run"] == 0 and again["written"] == stats["written"]
    assert len(pq.read_table(out / "failed.parquet")) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run(["--output", str(tmp_path / "o"), *mine, "--exclude", str(tmp_path / "empty")])
    assert exit_.value.code == 2 and "no image files there" in capsys.readouterr().err


@pytest.fixture(scope="module")
def embedded_captions(toy_world, tiny_clip_dir, tmp_path_factory) -> Path:
    from pipeline.caption import run as caption

    cap = tmp_path_factory.mktemp("emb") / "cap"
    caption(["--input", str(toy_world / "images"), "--output", str(cap), "--clip", str(tiny_clip_dir), *BEAM])
    return cap


MINE_BY_IMAGES = ["--quality", "low", "--image-weight", "0.5", "--band-low", "0", "--band-high", "1",
                  "--max-changes", "10"]


def test_mining_by_image_embeddings_stores_them(embedded_captions, tiny_clip_dir, tmp_path):
    from cir.backbone import clip_fingerprint, create_backbone

    out = tmp_path / "low"
    stats = run(["--input", str(embedded_captions), "--output", str(out), *MINE_BY_IMAGES, *BEAM])
    assert stats["written"] > 0
    fingerprint = clip_fingerprint(create_backbone(str(tiny_clip_dir)).model)
    for t in triplets(out):
        scores = json.loads(t["json"])["scores"]
        expected = 0.5 * scores["image_similarity"] + 0.5 * scores["caption_similarity"]
        assert abs(scores["similarity"] - expected) < 2e-3
        for role in ("ref", "tgt"):
            emb = np.load(io.BytesIO(t[f"{role}.emb.npy"]), allow_pickle=False)
            assert emb.dtype == np.float16 and abs(np.linalg.norm(emb.astype(np.float32)) - 1) < 1e-2
            # which CLIP made them travels with them, for the trainers' check
            assert json.loads(t["json"])[f"{role}_emb_clip"] == fingerprint
        # the writer's sample is the schema's encoding of it, member for member
        sample = TripletSample.from_webdataset(t)
        assert sample.ref.emb_clip == sample.tgt.emb_clip == fingerprint
        assert sample.to_webdataset() == {k: v for k, v in t.items() if not k.startswith("__") or k == "__key__"}


def _mined(out: Path) -> dict[str, dict]:
    return {t["__key__"]: {**json.loads(t["json"]), "mod": t["mod.txt"].decode()} for t in triplets(out)}


@pytest.mark.parametrize("flags, sharded", [
    (["--image-weight", "0", "--band-low", "0.3", "--seed", "1"], ["--global-max", "47"]),  # 48 images: auto
    (MINE_BY_IMAGES, ["--knn", "sharded"])], ids=["captions, auto", "images+captions, sharded"])
def test_sharded_knn_with_every_list_probed_equals_the_global_search(flags, sharded, toy_captions, embedded_captions,
                                                                     tmp_path):
    """The IVF join over workers, probing all its lists, is an exact search: the same triplets as the global
    path (exact below --exact-max), same hard negatives, same scores. --knn auto (the default) takes it above
    --global-max images, and the card records which ran."""
    src = embedded_captions if "0.5" in flags else toy_captions[0]
    base = ["--input", str(src), "--quality", "low", *flags, *BEAM]
    run(["--output", str(tmp_path / "global"), *base])
    stats = run(["--output", str(tmp_path / "sharded"), *sharded, "--nlist", "4", "--nprobe", "4", *base])
    cards = [json.loads((tmp_path / name / "dataset.json").read_text())["config"] for name in ("global", "sharded")]
    assert [c["knn"] for c in cards] == ["global", "sharded"]
    want, got = _mined(tmp_path / "global"), _mined(tmp_path / "sharded")
    assert stats["written"] == len(want) > 10 and got.keys() == want.keys()
    for key, meta in got.items():
        assert meta["provenance"]["knn"] == "sharded-ivf" and want[key]["provenance"]["knn"] == "exact"
        for field in ("ref_key", "tgt_key", "mod", "hard_negatives", "changes"):
            assert meta[field] == want[key][field]
        assert meta["scores"].keys() == want[key]["scores"].keys()
        assert all(abs(meta["scores"][s] - want[key]["scores"][s]) <= 1e-4 for s in meta["scores"])


def test_sharded_knn_is_deterministic(embedded_captions, tmp_path):
    """Probing 1 of 4 lists (approximate): the lists come from a seeded sample and k-means, so a rerun into a
    new directory writes the same shards byte for byte."""
    base = ["--input", str(embedded_captions), *MINE_BY_IMAGES, "--knn", "sharded", "--nlist", "4", "--nprobe", "1",
            *BEAM]
    for name in ("a", "b"):
        run(["--output", str(tmp_path / name), *base])
    tars = sorted((tmp_path / "a" / "shards").glob("*.tar"))
    assert tars and all((tmp_path / "b" / "shards" / t.name).read_bytes() == t.read_bytes() for t in tars)
    assert {m["provenance"]["knn"] for m in _mined(tmp_path / "a").values()} == {"sharded-ivf"}


def test_sharded_knn_recall_and_failed_rows(test_pipeline):
    """Probing 4 of 16 lists on clustered data: recall@10 against exact search >= 0.9, never itself, most
    similar first; an item without its embedding is a failed row, not a neighbour."""
    pytest.importorskip("faiss")
    from apache_beam.testing.util import assert_that

    from synth.config import SynthConfig
    from synth.knn import NeighbourGraph

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    x = mining.normalise(centres[rng.integers(0, 20, 1500)] + 0.3 * rng.normal(size=(1500, 32)))
    keys = [f"k{i:04d}" for i in range(1500)]
    items = [(key, f"caption {i % 7}", emb) for i, (key, emb) in enumerate(zip(keys, x))] + [("nemb", "x", None)]
    exact, _, _ = mining.knn(x, 10)
    cfg = SynthConfig("", "", "low", image_weight=1.0, neighbours=10, knn="sharded", nlist=16, nprobe=4)

    def check_neighbourhoods(hoods):
        assert sorted(h.key for h in hoods) == keys
        recall = []
        for h in hoods:
            found = [n.key for n in h.neighbours]
            assert h.key not in found and len(found) == 10 and h.method == "sharded-ivf"
            assert [n.sim for n in h.neighbours] == sorted((n.sim for n in h.neighbours), reverse=True)
            assert all(abs(n.sim - n.image_sim) < 1e-5 and n.text_sim is None for n in h.neighbours)
            recall.append(len({keys[j] for j in exact[int(h.key[1:])]} & set(found)) / 10)
        assert np.mean(recall) >= 0.9

    def check_failed(rows):
        assert [(r["source"], r["reason"]) for r in rows] == [("nemb", "no_embedding")]

    with test_pipeline() as p:
        hoods, failed = p | beam.Create(items) | NeighbourGraph(cfg)
        assert_that(hoods, check_neighbourhoods, label="Neighbourhoods")
        assert_that(failed, check_failed, label="Failed")


# ---------------------------------------------------------------- high quality (toy editor)

def test_toy_edited_triplets_are_exactly_right(toy_captions, tmp_path):
    out = tmp_path / "high"
    stats = run(["--input", str(toy_captions[0]), "--output", str(out), "--quality", "high", "--num-triplets", "20",
                 "--image-weight", "0",
                 *BEAM])
    assert stats["written"] == 20
    source = caption_samples(toy_captions[0])
    with_negatives = 0
    for t in triplets(out):
        meta = json.loads(t["json"])
        assert meta["quality"] == "high" and meta["method"] == "toy-exact-edit"
        # hard negatives: real images near the reference, never the reference or one captioned as the target
        negatives = meta["hard_negatives"]
        assert len(negatives) <= 3 and set(negatives) <= set(source) and meta["ref_key"] not in negatives
        assert all(source[k]["txt"].decode() != meta["tgt_caption"] for k in negatives)
        with_negatives += bool(negatives)
        ref_scene = parse_caption(meta["ref_caption"])
        edit = Edit(**meta["edit"])
        target = apply_edit(ref_scene, edit)
        assert parse_caption(meta["tgt_caption"]) == target and meta["tgt_caption"] == toy_caption(target)
        assert t["mod.txt"].decode() in mod_texts(ref_scene, edit)
        ref_img = Image.open(io.BytesIO(t.get("ref.jpg") or t["ref.png"]))
        tgt_img = Image.open(io.BytesIO(t["tgt.png"]))
        assert tgt_img.size == ref_img.size and tgt_img.mode == "RGB"
    assert with_negatives == 20
    # the sources are chosen by key (a side input filters them in place); an edited triplet carries its own
    # images from the editor into the shard grouping, the one grouping image bytes enter; only its reference's
    # nearest real images (keys and captions) join it on the way
    assert set(stats["shuffle_bytes"]) == {"JoinNeighbours", "GroupByShard"}


def test_toy_coarse_texts_are_one_to_many_and_leave_the_rest_alone(toy_captions, tmp_path, capsys):
    """--toy-coarse-fraction: a share of the colour/shape/position/background edits is described by what changes
    ("give the red circle another colour"), a text every other value answers; the triplets are otherwise the
    same as without it (same keys, images, and every other text)."""
    from toyworld.edits import coarse_edits, coarse_texts

    base = ["--input", str(toy_captions[0]), "--quality", "high", "--num-triplets", "30", "--image-weight", "0",
            "--hard-negatives", "0", *BEAM]
    exact_stats = run(["--output", str(tmp_path / "exact"), *base])
    assert set(exact_stats["shuffle_bytes"]) == {"GroupByShard"}  # no hard negatives: nothing joins the triplets
    run(["--output", str(tmp_path / "coarse"), "--toy-coarse-fraction", "0.7", *base])
    exact = {t["__key__"]: t for t in triplets(tmp_path / "exact")}
    coarse = {t["__key__"]: t for t in triplets(tmp_path / "coarse")}
    assert exact.keys() == coarse.keys()
    n_coarse = 0
    for key, t in coarse.items():
        meta, mod = json.loads(t["json"]), t["mod.txt"].decode()
        assert t["tgt.png"] == exact[key]["tgt.png"]
        if not meta["edit"].get("coarse"):
            assert mod == exact[key]["mod.txt"].decode()
            continue
        n_coarse += 1
        edit = Edit(**{k: v for k, v in meta["edit"].items() if k != "coarse"})
        ref_scene = parse_caption(meta["ref_caption"])
        assert mod in coarse_texts(edit.kind, edit.target) and mod != exact[key]["mod.txt"].decode()
        assert edit in coarse_edits(ref_scene, edit.kind, edit.target)
        assert len(coarse_edits(ref_scene, edit.kind, edit.target)) >= 2  # one-to-many: other answers exist
    assert 0 < n_coarse < len(coarse)
    with pytest.raises(SystemExit) as done:
        run(["--input", str(toy_captions[0]), "--output", str(tmp_path / "low"), "--quality", "low",
             "--toy-coarse-fraction", "0.5", "--image-weight", "0", *BEAM])
    assert done.value.code == 2 and "needs --quality high --editor toy" in capsys.readouterr().err


def test_edited_triplets_hard_negatives_by_sharded_knn(toy_captions, tmp_path):
    """High quality mines its hard negatives with either k-NN path: all lists probed, the same ones."""
    base = ["--input", str(toy_captions[0]), "--quality", "high", "--num-triplets", "10", "--image-weight", "0",
            *BEAM]
    run(["--output", str(tmp_path / "global"), *base])
    run(["--output", str(tmp_path / "sharded"), "--knn", "sharded", "--nlist", "3", "--nprobe", "3", *base])
    want, got = _mined(tmp_path / "global"), _mined(tmp_path / "sharded")
    assert got.keys() == want.keys() and len(got) == 10
    assert all(got[k]["hard_negatives"] == want[k]["hard_negatives"] for k in got)
    assert sum(len(m["hard_negatives"]) for m in got.values()) > 10
    assert {m["provenance"]["hard_negatives"]["knn"] for m in got.values()} == {"sharded-ivf"}


def test_toy_editor_rejects_captions_it_did_not_write(tmp_path):
    from pipeline.caption import run as caption

    (tmp_path / "imgs").mkdir()
    for i, text in enumerate(["a dog on a beach", "a small red circle on the left on a gray background"]):
        Image.new("RGB", (32, 32), (i * 100, 50, 50)).save(tmp_path / "imgs" / f"{i}.png")
        (tmp_path / "imgs" / f"{i}.txt").write_text(text)
    caption(["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "cap"), *BEAM])
    stats = run(["--input", str(tmp_path / "cap"), "--output", str(tmp_path / "high"), "--quality", "high",
                 "--image-weight", "0", *BEAM])
    assert stats["written"] == 1 and stats["failed_by_reason"] == {"not_a_toy_caption": 1}


def test_the_default_toy_editor_on_real_captions_is_refused_before_the_job(tmp_path, capsys):
    from pipeline.caption import run as caption

    (tmp_path / "imgs").mkdir()
    for i, text in enumerate(["a dog on a beach", "two people riding bikes"]):
        Image.new("RGB", (32, 32), (i * 100, 50, 50)).save(tmp_path / "imgs" / f"{i}.png")
        (tmp_path / "imgs" / f"{i}.txt").write_text(text)
    caption(["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "cap"), *BEAM])
    with pytest.raises(SystemExit) as exc:
        run(["--input", str(tmp_path / "cap"), "--output", str(tmp_path / "high"), "--quality", "high",
             "--image-weight", "0", *BEAM])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--editor MODEL" in err and ("'a dog on a beach'" in err or "'two people" in err)
    assert not (tmp_path / "high").exists()


# ---------------------------------------------------------------- bad input

def test_bad_inputs_are_clear_errors(toy_captions, tmp_path, capsys):
    src = toy_captions[0]

    def refused(args, message):
        with pytest.raises(SystemExit) as exc:
            run(["--output", str(tmp_path / "out"), *args, *BEAM])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    refused(["--input", str(src), "--quality", "low"], "rerun the caption job with --clip")
    refused(["--input", str(src), "--quality", "high"], "(or --hard-negatives 0)")  # HQ mines its hard negatives
    refused(["--input", str(tmp_path / "nothing"), "--quality", "low"], "not a dataset")
    refused(["--input", str(src), "--quality", "medium"], "invalid choice")
    bad_version = tmp_path / "old"
    bad_version.mkdir()
    card = json.loads((src / "dataset.json").read_text())
    (bad_version / "dataset.json").write_text(json.dumps({**card, "schema_version": 0}))
    refused(["--input", str(bad_version), "--quality", "low"], "schema version 0")


def test_fewer_than_two_images_is_an_error(tmp_path, capsys):
    from pipeline.caption import run as caption

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "only.png")
    (tmp_path / "imgs" / "only.txt").write_text("a lonely image")
    caption(["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "cap"), *BEAM])
    with pytest.raises(SystemExit) as exc:
        run(["--input", str(tmp_path / "cap"), "--output", str(tmp_path / "o"), "--quality", "low",
             "--image-weight", "0", *BEAM])
    assert exc.value.code == 2 and "needs at least two" in capsys.readouterr().err


# ---------------------------------------------------------------- units

def test_exact_knn_equals_brute_force():
    rng = np.random.default_rng(0)
    x = mining.normalise(rng.normal(size=(300, 16)))
    idx, sims, method = mining.knn(x, 5)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert method == "exact" and np.array_equal(idx, expected)
    assert np.allclose(sims, np.take_along_axis(full, expected, axis=1))


def test_faiss_knn_recall_against_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 32))
    x = mining.normalise(centres[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 32)))
    exact, _, _ = mining.knn(x, 10)
    approx, _, method = mining.knn(x, 10, exact_max=1000, nprobe=16)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert method == "faiss-ivf" and recall >= 0.9
    assert not (approx == np.arange(4000)[:, None]).any()  # never your own neighbour


def test_faiss_list_ordered_search_equals_faiss_add_and_search(monkeypatch):
    """The mining path (one coarse pass for add and search, queries list by list, in chunks) returns what
    faiss's own add + search return on the same trained index, minus each query itself."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(30, 32))
    x = mining.normalise(centres[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 32)))
    monkeypatch.setattr(mining, "QUERY_CHUNK", 700)  # several chunks, each a mix of lists
    got_i, got_s = mining._faiss_knn(x, 5, nprobe=4, seed=0)
    index = mining.trained_ivf(x, 4, 0)
    index.add(x)
    sims, idx = index.search(x, 6)
    want_i, want_s = mining._drop_self(np.arange(3000), idx, sims, 5)
    assert np.array_equal(got_i, want_i) and np.allclose(got_s, want_s)
    assert not (got_i == np.arange(3000)[:, None]).any()


def test_drop_self_wherever_it_is():
    idx = np.array([[7, 0, 5], [4, 5, 6], [3, 2, 9]])  # row 0: self second; row 1: self absent; row 2: first
    kept_i, kept_s = mining._drop_self(np.array([0, 1, 3]), idx, idx * 0.1, 2)
    assert kept_i.tolist() == [[7, 5], [4, 5], [2, 9]] and np.allclose(kept_s, kept_i * 0.1)


def test_select_targets_keeps_the_band():
    def hood(*pairs):
        return [mining.Neighbour(key, caption, sim, None, None) for key, caption, sim in pairs]

    chosen = mining.select_targets(hood(("b", "b", 0.99), ("c", "c", 0.8), ("d", "d", 0.2)), low=0.5, high=0.95,
                                   per_reference=1, hard_negatives=2)
    assert [(t.key, negatives) for t, negatives in chosen] == [("c", ["b", "d"])]  # 0.99: a near-duplicate
    # "d" is captioned like the target: a right answer, not a negative
    chosen = mining.select_targets(hood(("b", "b", 0.99), ("c", "c", 0.8), ("d", "c", 0.2)), low=0.5, high=0.95,
                                   per_reference=1, hard_negatives=2)
    assert chosen[0][1] == ["b"]
    assert mining.select_targets(hood(("b", "b", 0.3), ("c", "c", 0.2)), low=0.5, high=0.95, per_reference=1,
                                 hard_negatives=2) == []
    chosen = mining.select_targets(hood(("b", "b", 0.9), ("c", "c", 0.8), ("d", "d", 0.7)), low=0.5, high=0.95,
                                   per_reference=2, hard_negatives=1)
    assert [(t.key, negatives) for t, negatives in chosen] == [("b", ["c"]), ("c", ["b"])]


def test_modification_text_from_caption_diff():
    rng = random.Random(0)
    text, changes, _ = modification_text("a photo of a red car on a street", "a blue car on a street", rng)
    assert [(c.op, c.before, c.after) for c in changes] == [("replace", "red", "blue")]  # "a photo of" ignored
    assert "red" in text and "blue" in text
    _, changes, _ = modification_text("a dog on the grass", "a dog and a ball on the grass", rng)
    assert [(c.op, c.after) for c in changes] == [("insert", "a ball")]  # the dangling "and" trimmed
    _, changes, _ = modification_text("a cat and a dog", "a cat", rng)
    assert [(c.op, c.before) for c in changes] == [("delete", "a dog")]
    assert modification_text("a cat", "A cat", rng)[2] == "same_caption"
    assert modification_text("one two three four five", "uno two tres four cinco", rng, max_ops=2)[2] == "too_different"


def test_modification_text_names_the_phrase_that_changes():
    rng = random.Random(0)
    phrase = functools.partial(modification_text, rng=rng, span="phrase")
    # the noun phrase around the changed word, the reference's with "the": which object is meant is said
    text = phrase("a photo of a red car on a street", "a blue car on a street")[0]
    assert "the red car" in text and "a blue car" in text and "street" not in text
    words_only = modification_text("a photo of a red car on a street", "a blue car on a street", rng)[0]
    assert "red" in words_only and "blue" in words_only and "car" not in words_only  # the default
    # a preposition's object takes the phrase it belongs to along; a background after a position does not
    for _ in range(8):
        text = phrase("a small blue circle on the left on a black background",
                      "a small blue circle on the right on a black background")[0]
        assert "the small blue circle on the left" in text and "a small blue circle on the right" in text
        text, changes, _ = phrase("a large red cross on the left", "a small red cross on the right")
        assert len(changes) == 2 and " and " not in text  # the phrase changes, and where it is: one clause
        assert "the large red cross on the left" in text and "a small red cross on the right" in text
        text = phrase("a cat on the left on a black background", "a cat on the left on a gray background")[0]
        assert "the black background" in text and "a gray background" in text and "cat" not in text
        # a changed preposition brings its object (and its phrase): one clause, not "replace on with under"
        text = phrase("a dog on the couch", "a dog under the couch")[0]
        assert "the dog on the couch" in text and "a dog under the couch" in text
        # two changes in one phrase: one clause; separate phrases: one clause each
        text, changes, _ = phrase("a large red cross and a cat", "a small red square and a cat")
        assert len(changes) == 2 and " and " not in text and "the large red cross" in text
        text, changes, _ = phrase("a red cross, a cat on a mat", "a blue cross, a cat on a rug")
        assert all(p in text for p in ("the red cross", "a blue cross", "the cat on a mat", "a cat on a rug"))
        # inserted and deleted phrases as they are ("no" takes no article)
        assert phrase("a cat", "a cat and a dog")[0] in (
            "add a dog", "include a dog", "with a dog added", "also show a dog")
        assert phrase("a cat and a dog", "a cat")[0] in (
            "remove the dog", "without the dog", "take away the dog", "no dog")
    with pytest.raises(ValueError, match="span must be one of"):
        modification_text("a cat", "a dog", rng, span="nouns")


def test_mix_manifest(low, toy_captions, tmp_path):
    from cir.dataset import load_mix

    low_dir, _ = low
    manifest = tmp_path / "mix.yaml"
    manifest.write_text(f"datasets:\n  - {{path: {low_dir}, weight: 3}}\n  - {{path: {low_dir}, weight: 1}}\n")
    mix = load_mix(str(manifest))
    assert [m["weight"] for m in mix] == [0.75, 0.25] and mix[0]["kind"] == "triplet"
    assert mix[0]["shards"] and all(Path(u).is_file() for u in mix[0]["shards"])
    manifest.write_text(f"datasets:\n  - {{path: {low_dir}}}\n  - {{path: {toy_captions[0]}}}\n")
    with pytest.raises(ValueError, match="mixes dataset kinds"):
        load_mix(str(manifest))
    manifest.write_text("datasets:\n  - {path: nowhere}\n")
    with pytest.raises(ValueError, match="not a dataset"):
        load_mix(str(manifest))


def test_synthesis_without_models_does_not_load_torch(toy_captions, tmp_path):
    """Mined and toy-edited triplets need no model: the job reads and writes shards with the standard library
    (cir.dataset.shard_members, tar_bytes) and imports --llm's RunInference only when asked (Beam's ML
    package imports torch): a small job's start-up is most of its time."""
    import subprocess
    import sys

    for quality in ("low", "high"):
        code = ("import sys; from synth.job import run; "
                f"run(['--input', {str(toy_captions[0])!r}, '--output', {str(tmp_path / quality)!r}, '--quality', "
                f"{quality!r}, '--image-weight', '0', '--runner', 'DirectRunner']); "
                "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")
        done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True)
        assert done.stdout.strip().splitlines()[-1] == "[]", quality
        assert json.loads((tmp_path / quality / "stats.json").read_text())["written"] > 0
