"""High-quality synthesis for real data: keyword-swap caption edits, a tiny InstructPix2Pix, CLIP filters."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from synth.job import run

BEAM = ["--runner", "DirectRunner"]
COMMON = ["--quality", "high", "--image-weight", "0", "--num-triplets", "6", "--samples-per-source", "3", "--steps", "2",
          "--swap-low", "-1", "--swap-high", "1", "--min-caption-image", "-1", "--min-directional", "-1", "--seed", "5"]


def triplets(out):
    return list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False,
                               empty_check=False))


def test_instruct_pix2pix_with_clip_filters(toy_captions, tiny_ip2p, tiny_clip_dir, tmp_path):
    src = toy_captions[0]
    model = ["--input", str(src), "--editor", str(tiny_ip2p), "--clip", str(tiny_clip_dir), *COMMON, *BEAM]
    # 1) no image filter, keep every candidate: see all the scores
    everything = tmp_path / "all"
    stats = run(["--output", str(everything), *model, "--min-image-image", "-1", "--keep-per-source", "3"])
    rows = triplets(everything)
    assert stats["written"] == len(rows) == 18  # 6 sources x 3 candidates
    scores = sorted(json.loads(t["json"])["scores"]["image_image"] for t in rows)
    threshold = float(np.median(scores))
    for t in rows:
        meta = json.loads(t["json"])
        scales = meta["provenance"]["guidance"], meta["provenance"]["image_guidance"]
        assert scales[0] in (5, 7.5, 10) and scales[1] in (1.2, 1.5, 1.8)  # the default grids
        swap = meta["provenance"]["swap"]
        assert meta["ref_caption"] != meta["tgt_caption"]
        assert re.sub(rf"\b{swap['from']}\b", swap["to"], meta["ref_caption"], count=1, flags=re.I) == meta["tgt_caption"]
        mod = t["mod.txt"].decode()
        assert swap["from"] in mod and swap["to"] in mod
        assert t["tgt.png"] and (t.get("ref.jpg") or t.get("ref.png"))
    # 2) the image-image filter at the median keeps the candidates above it, at most one per source
    filtered = tmp_path / "filtered"
    stats = run(["--output", str(filtered), *model, "--min-image-image", str(threshold)])
    kept = triplets(filtered)
    assert 0 < len(kept) <= 6
    assert stats["rejected_by_reason"].get("below_image_image", 0) > 0
    by_source = {}
    for t in kept:
        meta = json.loads(t["json"])
        assert meta["scores"]["image_image"] >= threshold and meta["quality"] == "high"
        by_source.setdefault(meta["ref_key"], []).append(t)
    assert all(len(v) == 1 for v in by_source.values())
    # same seed, same edits: the targets are byte-identical to the unfiltered run's
    all_targets = {t["tgt.png"] for t in rows}
    assert all(t["tgt.png"] in all_targets for t in kept)
    # filter_scores.parquet: every scored candidate once, kept or with the reason it was not, the kept ones'
    # scores those of the written triplets
    scored = pq.read_table(filtered / "filter_scores.parquet").to_pylist()
    assert len(scored) == 18 and sum(r["kept"] for r in scored) == len(kept)
    rejected = Counter(r["rejected"] for r in scored if not r["kept"])
    assert dict(rejected) == {k: v for k, v in stats["rejected_by_reason"].items()
                              if k in ("below_image_image", "below_caption_image", "below_directional",
                                       "beyond_keep_per_source")}
    assert all((r["image_image"] >= threshold) == (r["rejected"] != "below_image_image") for r in scored)
    assert sorted(r["image_image"] for r in scored if r["kept"]) == sorted(
        json.loads(t["json"])["scores"]["image_image"] for t in kept)


def test_diffusers_editor_needs_clip(toy_captions, tiny_ip2p, tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        run(["--input", str(toy_captions[0]), "--output", str(tmp_path / "o"), "--quality", "high",
             "--image-weight", "0", "--editor", str(tiny_ip2p), *BEAM])
    assert exc.value.code == 2 and "needs --clip" in capsys.readouterr().err


def test_captions_without_words_to_swap_are_refused_before_the_job(tiny_ip2p, tiny_clip_dir, tmp_path, capsys):
    """A captioner that writes one word leaves keyword swaps nothing to draw from: exit 2 naming the way out
    (an LLM's caption edits), not a crash in the job's first worker; no output is made."""
    import pytest
    from PIL import Image

    from pipeline.caption import run as caption

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("the")
    caption(["--input", str(images), "--output", str(tmp_path / "captions"), *BEAM])
    with pytest.raises(SystemExit) as exc:
        run(["--input", str(tmp_path / "captions"), "--output", str(tmp_path / "o"), "--editor", str(tiny_ip2p),
             "--clip", str(tiny_clip_dir), *COMMON, *BEAM])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "keyword swaps have nothing to draw from" in err and "--caption-edit llm" in err
    assert not (tmp_path / "o").exists()


def test_llm_caption_edits_feed_the_editor(toy_captions, tiny_ip2p, tiny_clip_dir, tiny_causal_lm, tmp_path,
                                           monkeypatch):
    """--caption-edit llm: the model's 'instruction | edited caption' replaces the keyword swap."""
    from synth import llm

    model = ["--input", str(toy_captions[0]), "--editor", str(tiny_ip2p), "--clip", str(tiny_clip_dir), *COMMON,
             "--min-image-image", "-1", "--samples-per-source", "1", "--caption-edit", "llm", "--llm", str(tiny_causal_lm),
             *BEAM]
    # The tiny random LM writes word soup without a '|': every source is rejected as unparsable, none crashes.
    stats = run(["--output", str(tmp_path / "soup"), *model])
    assert stats["written"] == 0 and stats["rejected_by_reason"] == {"llm_unparsable": 6}

    def answer(self, prompt: str) -> str:  # a model that follows the prompt (DirectRunner runs in this process)
        caption = prompt.split("Image: ")[1].split("\n")[0]
        return f' "put it on a red background | {caption} on a red background"\nmore text'

    monkeypatch.setattr(llm.CausalGenerator, "__call__", answer)
    out = tmp_path / "edited"
    stats = run(["--output", str(out), *model, "--text-guidance", "6", "--image-guidance", "1.3"])
    rows = triplets(out)
    assert stats["written"] == len(rows) == 6
    # one pair of scales: every candidate of a shard is edited in a batch of --batch-size (4 by default)
    assert stats["shuffle_bytes"]["GroupByGuidance"] > 0
    for t in rows:
        meta = json.loads(t["json"])
        assert (meta["provenance"]["guidance"], meta["provenance"]["image_guidance"]) == (6.0, 1.3)
        assert meta["tgt_caption"] == meta["ref_caption"] + " on a red background"
        assert t["mod.txt"].decode() == "put it on a red background" and "mod_template" not in meta
        assert meta["provenance"]["llm_edit"]["model"] == str(tiny_causal_lm) and "swap" not in meta["provenance"]


def test_llm_edit_answers_are_parsed_or_rejected():
    from synth.llm import parse_edit

    assert parse_edit("Edit: make it blue | a blue circle\nnoise", "a red circle") == (
        ("make it blue", "a blue circle"), "")
    assert parse_edit("make it blue", "a red circle") == (None, "llm_unparsable")
    assert parse_edit(" | a blue circle", "a red circle") == (None, "llm_unparsable")
    assert parse_edit("keep it | A red circle", "a red circle") == (None, "llm_no_change")


def test_caption_edit_llm_needs_the_diffusers_editor_and_a_model(toy_captions, tiny_ip2p, tmp_path, capsys):
    import pytest

    for args in (["--caption-edit", "llm", "--llm", str(tmp_path)],  # toy editor
                 ["--editor", str(tiny_ip2p), "--clip", str(tmp_path), "--caption-edit", "llm"]):  # no --llm
        with pytest.raises(SystemExit) as exc:
            run(["--input", str(toy_captions[0]), "--output", str(tmp_path / "o"), "--quality", "high",
                 "--image-weight", "0", *args, *BEAM])
        assert exc.value.code == 2 and "--caption-edit llm edits captions" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # filters on a randomly initialised real CLIP: refused before the job
        run(["--input", str(toy_captions[0]), "--output", str(tmp_path / "o"), "--quality", "high",
             "--image-weight", "0", "--editor", str(tiny_ip2p), "--clip", "ViT-B-32", *BEAM])
    assert exc.value.code == 2 and "randomly initialised" in capsys.readouterr().err


def test_the_report_draws_the_rejected_candidates_scores(toy_captions, tiny_ip2p, tiny_clip_dir, tmp_path):
    from pipeline.inspect import run as inspect

    out = tmp_path / "filtered"
    run(["--output", str(out), "--input", str(toy_captions[0]), "--editor", str(tiny_ip2p), "--clip",
         str(tiny_clip_dir), *COMMON, *BEAM, "--min-image-image", "0.5"])
    assert any(not r["kept"] for r in pq.read_table(out / "filter_scores.parquet").to_pylist())
    assert inspect([str(out), "--report", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "src='scores.png'" in page and "rejected (grey, from filter_scores.parquet)" in page


def test_the_editor_works_at_its_models_size_and_returns_the_references():
    """A 1024 px photo is edited at Stable Diffusion 1.5's 512 (multiples of 8, aspect kept), not at its own size
    (4x the UNet's work); the edit comes back at the reference's size."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from synth.editing import InstructPix2PixHandler, model_size

    assert model_size((1024, 768), 512) == (512, 384)
    assert model_size((300, 200), 512) == (512, 344)  # 341.3 -> the nearest multiple of 8
    assert model_size((64, 48), 32) == (32, 24)
    seen = []

    def pipeline(image, prompt, generator, **kwargs):  # stands in for diffusers' pipeline: records its inputs
        assert len(image) == len(prompt) == len(generator)
        seen.append([im.size for im in image])
        return SimpleNamespace(images=[im.copy() for im in image])

    pipeline.unet = SimpleNamespace(config=SimpleNamespace(sample_size=64))
    pipeline.vae_scale_factor = 8

    def candidate(size, seed):
        buf = io.BytesIO()
        Image.new("RGB", size, "red").save(buf, format="JPEG")
        return {"sample": {"image": buf.getvalue()}, "instruction": "make it blue", "guidance": 7.5,
                "image_guidance": 1.5, "edit_seed": seed}

    # one batch: two references of one model size edited in one call, the third in its own
    results = list(InstructPix2PixHandler("m", steps=2).run_inference(
        [[candidate((1000, 640), 1), candidate((500, 320), 2), candidate((640, 640), 3)]], pipeline))
    assert seen == [[(512, 328), (512, 328)], [(512, 512)]]
    assert [Image.open(io.BytesIO(r.inference)).size for r in results] == [(1000, 640), (500, 320), (640, 640)]
    assert [r.example["edit_seed"] for r in results] == [1, 2, 3]


def test_edit_batches_are_fixed_by_the_data():
    """Candidates sharing guidance scales in a shard are cut into batches of at most --batch-size in an order of
    their own (reference size, source, candidate number): whatever order they arrive in, the same batches."""
    import io
    import random

    from PIL import Image

    from synth.editing import batch_group, edit_batches

    def png(size):
        buf = io.BytesIO()
        Image.new("RGB", size).save(buf, format="PNG")
        return buf.getvalue()

    images = {"a": png((32, 24)), "b": png((24, 32)), "c": png((32, 24)), "d": png((32, 24))}
    candidates = [{"source_key": k, "candidate": i, "sample": {"image": images[k], "shard": 0}, "guidance": 7.5,
                   "image_guidance": 1.5} for k in images for i in range(2)]
    key = batch_group(candidates[0])[0]
    assert key == (0, 7.5, 1.5) and {batch_group(c)[0] for c in candidates} == {key}
    batches = list(edit_batches((key, candidates), 3))
    assert [[(c["source_key"], c["candidate"]) for c in b] for b in batches] == [
        [("b", 0), ("b", 1), ("a", 0)], [("a", 1), ("c", 0), ("c", 1)], [("d", 0), ("d", 1)]]
    for seed in range(5):
        shuffled = random.Random(seed).sample(candidates, len(candidates))
        assert list(edit_batches((key, shuffled), 3)) == batches


def test_a_batched_edit_is_each_candidates_own(tiny_ip2p):
    """Each row of a batched call draws its noise from its own seed: a candidate edited beside others comes out
    as when edited alone (up to the batched kernels' rounding), and two seeds give two different edits."""
    import io

    import numpy as np
    from PIL import Image

    from synth.editing import InstructPix2PixHandler

    handler = InstructPix2PixHandler(str(tiny_ip2p), steps=2)
    model = handler.load_model()
    rng = np.random.default_rng(0)

    def candidate(seed, text):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        return {"sample": {"image": buf.getvalue()}, "instruction": text, "guidance": 7.5, "image_guidance": 1.5,
                "edit_seed": seed}

    batch = [candidate(1, "make it blue"), candidate(2, "add a dog"), candidate(3, "make it night")]

    def pixels(results):
        return [np.asarray(Image.open(io.BytesIO(r.inference)), dtype=np.int16) for r in results]

    together = pixels(handler.run_inference([batch], model))
    alone = [pixels(handler.run_inference([[c]], model))[0] for c in batch]
    for t, a in zip(together, alone):
        assert t.shape == (48, 64, 3) and np.abs(t - a).max() <= 2
    again = pixels(handler.run_inference([[{**batch[0], "edit_seed": 9}]], model))[0]
    assert np.abs(again - alone[0]).mean() > 5
