"""The caption job: SPEC.md output, hostile inputs, tar and parquet inputs, resume and exactly-once."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from cir.dataset import KEY_RE, content_key
from pipeline.caption import CaptionConfig, PrepareImage, run
from pipeline.sources import FAILED
from tests.zoo import jpeg, write_zoo

ROOT = Path(__file__).resolve().parents[1]
BEAM = ["--runner", "DirectRunner"]


def read_dataset(out: Path) -> dict[str, dict]:
    """Every sample of every shard, read back with webdataset (no decoding: raw bytes)."""
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples, "a key written twice"
        samples[sample["__key__"]] = sample
    return samples


def image_ext(sample: dict) -> str:
    return next(e for e in ("jpg", "png", "webp") if e in sample)


# ---------------------------------------------------------------- the toy world through the job

def test_toy_world_captions_follow_the_spec(toy_world, toy_captions):
    out, stats = toy_captions
    assert stats["inputs"] == stats["written"] == 48 and stats["failed"] == 0
    samples = read_dataset(out)
    assert len(samples) == 48 and stats["shards"] == 5  # ceil(48 / 10)
    sidecars = {}
    for txt in (toy_world / "images").glob("*.txt"):
        for ext in ("jpg", "png"):
            img = txt.with_suffix(f".{ext}")
            if img.exists():
                sidecars[content_key(img.read_bytes())] = (img.read_bytes(), txt.read_text().strip())
    for key, sample in samples.items():
        assert KEY_RE.match(key)
        ext = image_ext(sample)
        data, caption = sidecars[key]
        assert sample[ext] == data  # original bytes, not re-encoded
        assert Image.open(io.BytesIO(sample[ext])).format == {"jpg": "JPEG", "png": "PNG"}[ext]
        assert sample["txt"].decode() == caption
        meta = json.loads(sample["json"])
        assert {"key", "source", "width", "height", "sha256", "caption", "captioner"} <= set(meta)
        assert meta["key"] == key and meta["caption"] == caption and meta["captioner"] == "sidecar"
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and (meta["width"], meta["height"]) == (64, 64)


def test_index_rows_equal_shard_samples(toy_captions):
    out, _ = toy_captions
    index = pq.read_table(out / "index.parquet").to_pylist()
    by_shard: dict[str, set] = {}
    for row in index:
        by_shard.setdefault(row["shard"], set()).add(row["key"])
    for tar_path in (out / "shards").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
            assert all(m.mtime == tar.getmembers()[0].mtime for m in tar.getmembers())  # fixed mtime
        assert keys == by_shard[tar_path.stem]
    assert len(index) == sum(len(v) for v in by_shard.values())
    assert pq.read_table(out / "failed.parquet").num_rows == 0
    card = json.loads((out / "dataset.json").read_text())
    assert card["kind"] == "caption" and card["config"]["shard_size"] == 10


def test_rerun_writes_nothing_twice(toy_world, toy_captions):
    out, first = toy_captions
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    stats = run(["--input", str(toy_world / "images"), "--output", str(out), "--shard-size", "10", *BEAM])
    assert stats["shards_written_this_run"] == 0 and stats["written"] == first["written"]
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before


def test_same_input_gives_identical_shards(toy_world, toy_captions, tmp_path):
    out, _ = toy_captions
    run(["--input", str(toy_world / "images"), "--output", str(tmp_path / "again"), "--shard-size", "10", *BEAM])
    for tar_path in (out / "shards").glob("*.tar"):
        assert (tmp_path / "again" / "shards" / tar_path.name).read_bytes() == tar_path.read_bytes()


def test_other_configuration_in_same_output_is_refused(toy_world, toy_captions, capsys):
    out, _ = toy_captions
    with pytest.raises(SystemExit) as exc:
        run(["--input", str(toy_world / "images"), "--output", str(out), "--shard-size", "7", *BEAM])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_unknown_flag_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--shard_sise", "3", *BEAM])
    assert exc.value.code == 2 and "shard_sise" in capsys.readouterr().err


# ---------------------------------------------------------------- hostile inputs

def test_hostile_inputs_become_failed_rows(tmp_path):
    items = write_zoo(tmp_path / "zoo")
    out = tmp_path / "out"
    # the zoo's plain test pictures are near-duplicates of each other (tests/test_neardup.py covers those)
    stats = run(["--input", str(tmp_path / "zoo"), "--output", str(out), "--min-size", "8", "--no-near-duplicates",
                 *BEAM])
    failed = {Path(r["source"]).name: r for r in pq.read_table(out / "failed.parquet").to_pylist()}
    samples = read_dataset(out)
    written = {Path(json.loads(s["json"])["source"]).name: s for s in samples.values()}
    for name, (_, _, outcome) in items.items():
        if outcome == "ok":
            assert name in written, f"{name} should be written"
        elif outcome == "duplicate":
            assert name not in written and name not in failed
        else:
            assert failed[name]["reason"] == outcome, (name, failed.get(name))
            assert failed[name]["error"]
    assert stats["duplicates"] == 1
    assert stats["inputs"] == stats["written"] + stats["failed"] + stats["duplicates"] == len(items)
    assert stats["failed_by_reason"]["corrupt"] == 1

    # What was written is what a model should see: RGB, oriented, the first frame, 16 bits scaled not clipped.
    def decoded(name):
        s = written[name]
        return Image.open(io.BytesIO(s[image_ext(s)]))

    assert decoded("cmyk.jpg").mode == "RGB"
    deep = decoded("deep.png").convert("L")
    assert deep.getextrema()[0] < 20 and deep.getextrema()[1] > 230  # the gradient survives
    assert decoded("rotated.jpg").size == (20, 40)
    assert decoded("anim.gif").convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    assert image_ext(written["anim.gif"]) == "png" and decoded("palette alpha.png").mode == "RGB"
    good = written["good.jpg"]
    assert good["jpg"] == items["good.jpg"][0]  # untouched files keep their bytes
    for s in samples.values():
        assert "." not in s["__key__"] and "/" not in s["__key__"]


def test_prepare_image_dofn_with_test_pipeline(test_pipeline):
    good = jpeg()
    records = [{"source": "a.jpg", "data": good, "caption": "c"}, {"source": "b.jpg", "data": b"", "caption": "c"}]
    with test_pipeline() as p:
        out = p | beam.Create([records]) | beam.ParDo(PrepareImage(CaptionConfig("", ""))).with_outputs(FAILED,
                                                                                                         main="ok")
        assert_that(out.ok | beam.Map(lambda s: (s["key"], s["ext"], s["width"])),
                    equal_to([(content_key(good), "jpg", 40)]), label="ok")
        assert_that(out[FAILED] | beam.Map(lambda r: (r["source"], r["reason"])), equal_to([("b.jpg", "empty")]),
                    label="failed")


def test_large_images_are_prepared_on_threads_with_the_same_results(test_pipeline):
    """Images of LARGE_IMAGE bytes or more are decoded and hashed on a thread pool: results, failures and the
    pixel guard are those of the inline path, and PIL's global limit is never touched."""
    import numpy as np

    from pipeline.caption import LARGE_IMAGE

    def noisy_jpeg(seed: int, side: int = 256) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    big = [noisy_jpeg(i) for i in range(5)]
    assert all(len(b) >= LARGE_IMAGE for b in big)
    records = [{"source": f"big{i}.jpg", "data": b, "caption": "c"} for i, b in enumerate(big)]
    records += [{"source": "small.jpg", "data": jpeg(), "caption": "c"},
                {"source": "garbage.jpg", "data": os.urandom(LARGE_IMAGE + 1), "caption": "c"},  # on a thread
                {"source": "cut.jpg", "data": big[0][: len(big[0]) - 4000], "caption": "c"}]
    limit = Image.MAX_IMAGE_PIXELS
    with test_pipeline() as p:
        out = (p | beam.Create([records[:4], records[4:]])
               | beam.ParDo(PrepareImage(CaptionConfig("", "", max_pixels=250 * 250 + 1))).with_outputs(FAILED,
                                                                                                          main="ok"))
        assert_that(out.ok | beam.Map(lambda s: (s["source"], s["key"], s["width"])),
                    equal_to([("small.jpg", content_key(jpeg()), 40)]), label="ok")
        assert_that(out[FAILED] | beam.Map(lambda r: (r["source"], r["reason"])),
                    equal_to([(f"big{i}.jpg", "too_many_pixels") for i in range(5)]
                             + [("garbage.jpg", "not_an_image"), ("cut.jpg", "too_many_pixels")]), label="failed")
    with test_pipeline() as p:  # no pixel limit: the large images pass, the cut one is corrupt
        out = (p | beam.Create([records[:5], records[7:]])
               | beam.ParDo(PrepareImage(CaptionConfig("", ""))).with_outputs(FAILED, main="ok"))
        assert_that(out.ok | beam.Map(lambda s: (s["source"], s["key"], s["sha256"][:8], s["width"])),
                    equal_to([(f"big{i}.jpg", content_key(b), hashlib.sha256(b).hexdigest()[:8], 256)
                              for i, b in enumerate(big)]), label="ok")
        assert_that(out[FAILED] | beam.Map(lambda r: (r["source"], r["reason"])), equal_to([("cut.jpg", "corrupt")]),
                    label="failed")
    assert Image.MAX_IMAGE_PIXELS == limit


def test_copies_meet_in_their_shard_and_the_captioned_one_is_kept():
    from pipeline.jobs import keep_one_per_key

    items = [{"sample": {"key": "k", "source": "z"}}, {"sample": {"key": "k", "source": "m"}},
             {"failed": {"source": "a", "reason": "no_caption"}, "key": "k"},  # the uncaptioned copy: a duplicate
             {"failed": {"source": "b", "reason": "no_caption"}, "key": "j"},
             {"failed": {"source": "c", "reason": "no_caption"}, "key": "j"},  # no copy captioned: one failed row
             {"failed": {"source": "x", "reason": "other job"}}]  # no key: never merged
    kept, duplicates = keep_one_per_key(items)
    assert duplicates == 3
    assert sorted((i.get("sample") or i.get("failed"))["source"] for i in kept) == ["b", "m", "x"]


def test_local_images_cross_no_grouping_and_a_resume_counts_every_duplicate(toy_world, tmp_path):
    """stats.json's shuffle_bytes: from a local folder the shard grouping carries keys, captions and metadata,
    no image bytes (they are read again where the shard is written), and there is no sidecar grouping (the
    launcher's listing pairs them). Copies of the same bytes land in one shard (their key fixes it), and a
    rerun that skips committed shards still counts the copies inside them."""
    images = tmp_path / "in"
    shutil.copytree(toy_world / "images", images)
    originals = sorted(images.glob("*.png"))[:3]
    for i, src in enumerate(originals):
        shutil.copy(src, images / f"copy-{i}.png")  # an uncaptioned copy of a captioned image
    out = tmp_path / "out"
    # the near-duplicate screen's joins (candidates' 64x64 thumbnails) are measured in tests/test_neardup.py
    args = ["--input", str(images), "--output", str(out), "--shard-size", "5", "--no-near-duplicates", *BEAM]
    stats = run(args)
    assert stats["duplicates"] == 3 and stats["written"] == 48
    stored = sum(len(s[image_ext(s)]) for s in read_dataset(out).values())
    moved = stats["shuffle_bytes"]
    assert set(moved) == {"GroupByShard", "SkippedKeys"}
    assert 0 < moved["GroupByShard"] <= 600 * stats["inputs"] < stored  # a few hundred bytes per image
    assert moved["SkippedKeys"] == 0
    # the listing's image/sidecar pairs reached the workers in a temp file there, removed at the end
    assert not [p.name for p in (out / "shards").iterdir() if ".tmp-" in p.name]

    committed = sorted((out / "shards").glob("*.tar"))
    for tar_path in committed[::2]:  # half the shards lost: the rerun writes those and skips the others
        for sidecar in tar_path.parent.glob(tar_path.name[:-4] + ".*"):
            sidecar.unlink()
    again = run(args)
    assert again["shards_written_this_run"] == len(committed[::2]) < again["shards"]
    assert again["duplicates"] == 3 and again["written"] == 48
    assert again["inputs"] == again["written"] + again["failed"] + again["duplicates"]
    assert 0 < again["shuffle_bytes"]["SkippedKeys"] <= 40 * again["inputs"]  # (key, 1) per skipped image
    assert again["shuffle_bytes"]["GroupByShard"] < moved["GroupByShard"]


# ---------------------------------------------------------------- other input kinds

def test_tar_shards_input_with_a_corrupt_shard(toy_world, tmp_path):
    images = sorted(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))[:12]
    (tmp_path / "in").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "in" / f"src-{shard:03d}.tar")) as sink:
            for img in images[shard * 6:(shard + 1) * 6]:
                caption_field = {"txt": img.with_suffix(".txt").read_text()} if shard == 0 else {
                    "json": {"caption": img.with_suffix(".txt").read_text()}}  # img2dataset style
                sink.write({"__key__": img.stem, img.suffix[1:]: img.read_bytes(), **caption_field})
    whole = (tmp_path / "in" / "src-001.tar").read_bytes()
    (tmp_path / "in" / "src-001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut mid-member
    out = tmp_path / "out"
    stats = run(["--input", str(tmp_path / "in" / "src-{000..001}.tar"), "--output", str(out), *BEAM])
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    assert any(r["reason"] == "corrupt_tar" and r["source"].endswith("src-001.tar") for r in failed)
    samples = read_dataset(out)
    assert 6 <= len(samples) < 12  # shard 0 whole, shard 1 up to the cut
    sources = [json.loads(s["json"])["source"] for s in samples.values()]
    assert sum(s.split("::")[0].endswith("src-000.tar") for s in sources) == 6
    assert all(s["txt"] for s in samples.values())
    assert stats["written"] == len(samples)
    # a tar member cannot be read again by itself: its bytes travel through the shard grouping, the one
    # grouping that carries images
    stored = sum(len(s[image_ext(s)]) for s in samples.values())
    moved = stats["shuffle_bytes"]  # with the near-duplicate screen's three (tests/test_neardup.py)
    assert set(moved) == {"Reshuffle", "GroupByShard", "SkippedKeys", "JoinCandidates", "JoinRanks", "DropsByKey"}
    assert moved["GroupByShard"] > stored > 100 * moved["Reshuffle"]


def test_a_local_image_changed_or_gone_before_its_shard_is_written_is_a_failed_row(tmp_path):
    """The bytes left behind (leave_bytes) are read again where the shard is written; a file whose size or
    mtime moved since is never written in place of the one that was captioned and hashed."""
    from cir.dataset import read_local
    from pipeline.caption import index_row, leave_bytes, to_webdataset, with_bytes
    from pipeline.jobs import WriteShard, as_sample

    def sample(name: str, colour: tuple) -> dict:
        path = tmp_path / name
        path.write_bytes(jpeg(colour))
        data, stamp = read_local(str(path))
        return {"key": content_key(data), "sha256": "0" * 64, "source": str(path), "caption": "c", "data": data,
                "ext": "jpg", "width": 40, "height": 40, "reencoded": None, "stamp": stamp, "shard": 0,
                "captioner": "sidecar"}

    kept, changed, gone = (sample("kept.jpg", (1, 2, 3)), sample("changed.jpg", (90, 0, 0)),
                           sample("gone.jpg", (0, 90, 0)))
    assert "data" not in leave_bytes(kept) and with_bytes(leave_bytes(kept))["data"] == kept["data"]
    (tmp_path / "changed.jpg").write_bytes(jpeg() + b"trailing bytes")
    (tmp_path / "gone.jpg").unlink()
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    writer = WriteShard(str(out), "part", to_webdataset, index_row, "test", dedup=True, load=with_bytes)
    list(writer.process((0, [as_sample(leave_bytes(s))[1] for s in (kept, changed, gone)])))
    failed = pq.read_table(out / "shards" / "part-00000.failed.parquet").to_pylist()
    assert sorted((Path(r["source"]).name, r["stage"], r["reason"]) for r in failed) == [
        ("changed.jpg", "write", "changed_during_job"), ("gone.jpg", "write", "unreadable")]
    assert [s["__key__"] for s in read_dataset(out).values()] == [kept["key"]]
    assert next(iter(read_dataset(out).values()))["jpg"] == kept["data"]


def test_the_sidecar_caption_job_loads_neither_torch_nor_prism_and_leaves_no_temp_files(toy_world, tmp_path):
    """Start-up is most of a small job's time: without a model the job never imports torch (webdataset would
    load it; shards are written with the standard library, cir.dataset.tar_bytes). The DirectRunner runs on
    Beam's in-process runner without first trying Prism, whose failed start (offline) left a beam-temp folder
    in the temp directory on every run (pipeline.jobs.new_pipeline)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    code = ("import sys; from pipeline.caption import run; "
            f"run(['--input', {str(toy_world / 'images')!r}, '--output', {str(tmp_path / 'out')!r}]); "
            "print(sorted(m for m in ('torch', 'webdataset', 'apache_beam.runners.portability.prism_runner') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "TMPDIR": str(temp)})
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "stats.json").exists()
    assert list(temp.iterdir()) == []


def test_a_listed_folder_reads_the_same_records_as_a_matched_one(tmp_path, test_pipeline):
    """A local folder is read from the launcher's listing, its images paired with their sidecars in memory; a
    remote one is matched and grouped by the workers. Both give the same records and the same count of
    inputs (checked on a local folder read both ways)."""
    from pipeline.sources import EXPECTED, RECORDS, ReadInputs, list_inputs

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    files = {"a.jpg": jpeg(), "a.txt": b"caption a", "b.jpg": jpeg((0, 0, 200)), "b.json": b'{"text": "caption b"}',
             "c.jpg": jpeg((0, 200, 0)), "sub/d.jpg": jpeg((9, 9, 9)), "sub/d.txt": b"caption d", "e.txt": b"alone"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    expected = [(str(folder / name), files[name], caption) for name, caption in
                [("a.jpg", "caption a"), ("b.jpg", "caption b"), ("c.jpg", None), ("sub/d.jpg", "caption d")]]

    with test_pipeline() as p:
        for label, read in [("listed", ReadInputs(str(folder), listing=list_inputs(str(folder)),
                                                  scratch=str(tmp_path / "scratch"))),
                            ("matched", ReadInputs(str(folder)))]:
            out = p | label >> read
            assert_that(out[RECORDS] | f"{label}Records" >> beam.Map(lambda r: (r["source"], r["data"], r["caption"])),
                        equal_to(expected), label=f"{label}-records")
            assert_that(out[EXPECTED], equal_to([4]), label=f"{label}-count")


def test_parquet_input_with_relative_paths(toy_world, tmp_path):
    images = sorted(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))[:5]
    (tmp_path / "imgs").mkdir()
    rows = []
    for img in images:
        (tmp_path / "imgs" / img.name).write_bytes(img.read_bytes())
        rows.append({"path": f"imgs/{img.name}", "caption": f"caption of {img.stem}"})
    rows.append({"path": "imgs/missing.jpg", "caption": "gone"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    out = tmp_path / "out"
    stats = run(["--input", str(tmp_path / "list.parquet"), "--output", str(out), *BEAM])
    assert stats["written"] == 5 and stats["failed_by_reason"] == {"unreadable": 1}
    captions = sorted(s["txt"].decode() for s in read_dataset(out).values())
    assert captions == sorted(f"caption of {img.stem}" for img in images)


# ---------------------------------------------------------------- kill -9 and rerun

def test_killed_job_rerun_writes_every_input_exactly_once(toy_world, tmp_path):
    cmd = [sys.executable, "beam_runner.py", "caption", "--input", str(toy_world / "images"),
           "--output", str(tmp_path / "out"), "--shard-size", "2", *BEAM]
    scratch = tmp_path / "tmp"  # a killed Beam job cannot remove its beam-pipeline-temp* folder: keep it here
    scratch.mkdir()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(scratch)})
    shards = tmp_path / "out" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.tar"))) < 3 and proc.poll() is None:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(shards.glob("*.tar")))
    print(f"killed with {partial} shards committed")
    for tar_path in shards.glob("*.tar"):  # whatever a reader can see is a whole shard
        with tarfile.open(tar_path) as tar:
            tar.getmembers()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    samples = read_dataset(tmp_path / "out")
    assert len(samples) == 48
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["written"] == 48 and stats["shards_written_this_run"] == stats["shards"] - partial
    assert 0 < partial < stats["shards"], "the kill must land while shards are being written"
    assert not list(shards.glob("*.tmp-*"))


def test_damaged_header_in_the_middle_of_a_tar_is_reported(toy_world, tmp_path):
    images = sorted(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))[:6]
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "src.tar"
    with wds.TarWriter(str(path)) as sink:
        for img in images:
            sink.write({"__key__": img.stem, img.suffix[1:]: img.read_bytes(), "txt": "a caption"})
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        fourth = [m for m in tar.getmembers()][6]  # header of the 4th sample's first member
    data[fourth.offset:fourth.offset + 100] = b"\xff" * 100  # garbage name field: the checksum fails
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    stats = run(["--input", str(path), "--output", str(out), *BEAM])
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    assert [r["reason"] for r in failed] == ["corrupt_tar"] and "damaged header" in failed[0]["error"]
    assert stats["written"] == 3  # the samples before the damage are kept


def test_shard_prefix_cannot_be_a_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--shard-prefix", "../../etc/x", *BEAM])
    assert exc.value.code == 2 and "--shard-prefix" in capsys.readouterr().err


def test_max_pixels_past_pils_own_refusal_is_an_error(tmp_path, capsys):
    from pipeline.images import DEFAULT_MAX_PIXELS

    with pytest.raises(SystemExit) as exc:  # PIL refuses more than twice its limit whatever we ask
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--max-pixels",
             str(2 * DEFAULT_MAX_PIXELS + 1), *BEAM])
    assert exc.value.code == 2 and "max" in capsys.readouterr().err
