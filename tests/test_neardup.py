"""Near-duplicates and --exclude in the caption job (pipeline/neardup.py)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline import neardup
from pipeline.caption import run

BEAM = ["--runner", "DirectRunner"]


def photo(seed: int, size: int = 160) -> Image.Image:
    """A picture with detail everywhere (gradients and shapes), unlike the toy world's plain backgrounds."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = ((x * (3 + seed) + y) % 256, (y * (5 + seed)) % 256, (x * y // (7 + seed)) % 256)
    draw = ImageDraw.Draw(img)
    for i in range(6):
        x, y = (seed * 37 + i * 53) % (size - 30), (seed * 61 + i * 29) % (size - 30)
        draw.ellipse((x, y, x + 28, y + 20), fill=((seed * 90 + i * 40) % 256, 200 - i * 20, (i * 70) % 256))
    return img


def copies(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return {"resized": img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC),
            "jpeg75": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "cropped": img.crop((4, 4, w - 4, h - 4)),
            "brighter": img.point(lambda v: min(255, v + 12))}


def picture(img: Image.Image) -> tuple[neardup.Fingerprint, neardup.Picture]:
    fp = neardup.fingerprint(img)
    return fp, neardup.Picture(fp.thumb)


@pytest.mark.parametrize("kind", ["resized", "jpeg75", "cropped", "brighter"])
def test_a_copy_is_the_same_picture_and_its_hash_is_near(kind):
    fp, pic = picture(photo(1))
    copy_fp, copy_pic = picture(copies(photo(1))[kind])
    assert neardup.hamming(fp.dhash, neardup.np.array([copy_fp.dhash], dtype="uint64"))[0] <= 12
    assert neardup.same_picture(pic, copy_pic, pixels=2)


def test_other_pictures_are_not_the_same_even_when_only_a_small_part_differs():
    base = photo(1)
    edited = base.copy()
    ImageDraw.Draw(edited).rectangle((60, 60, 76, 76), fill=(255, 0, 255))  # 1% of the picture changed
    assert not neardup.same_picture(picture(base)[1], picture(photo(2))[1], pixels=2)
    assert neardup.picture_distance(picture(base)[1], picture(edited)[1]) >= 30  # the square: ~7x7 of 64x64
    assert neardup.picture_distance(picture(base)[1], picture(base)[1]) == 0


def test_the_colour_tolerance_decides_what_a_pixel_matches():
    """--near-dup-tolerance: a copy 12 levels brighter in each channel (36 summed) matches at the default (96),
    not within 8."""
    fp, copy_fp = neardup.fingerprint(photo(1)), neardup.fingerprint(copies(photo(1))["brighter"])
    assert neardup.same_picture(neardup.Picture(fp.thumb), neardup.Picture(copy_fp.thumb), pixels=2)
    assert not neardup.same_picture(neardup.Picture(fp.thumb, 8), neardup.Picture(copy_fp.thumb, 8), pixels=2)


def test_hash_and_rank_by_hand():
    table = neardup.np.array([0, 0b1011, 2**64 - 1], dtype="uint64")
    assert neardup.hamming(0b0001, table).tolist() == [1, 2, 63]
    with_caption = {"caption": "a cat", "width": 10, "height": 10, "key": "b"}
    bigger = {"caption": "", "width": 20, "height": 20, "key": "a"}
    assert neardup.rank(with_caption) < neardup.rank(bigger)  # a caption first, then pixels, then the key
    assert neardup.rank({**bigger, "key": "c"}) > neardup.rank(bigger)


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    """Inputs: 6 pictures, a 90% copy of one (no caption: the original ranks first), copies of two benchmark
    pictures; --exclude holds the two benchmark pictures and one that matches nothing."""
    root = tmp_path_factory.mktemp("screen")
    inputs, bench = root / "in", root / "bench"
    inputs.mkdir()
    bench.mkdir()
    for i in range(6):
        photo(i).save(inputs / f"img{i}.png")
        (inputs / f"img{i}.txt").write_text(f"picture {i}\n")
    copies(photo(3))["resized"].save(inputs / "img3_small.png")
    (inputs / "img3_small.txt").write_text("a smaller copy\n")
    for i, kind in ((10, "jpeg75"), (11, "cropped")):
        photo(i).save(bench / f"bench{i}.png")
        copies(photo(i))[kind].save(inputs / f"leak{i}.jpg", quality=95)
        (inputs / f"leak{i}.txt").write_text("a leaked picture\n")
    photo(12).save(bench / "bench12.png")
    (bench / "notes.txt").write_text("not an image\n")
    args = ["--input", str(inputs), "--exclude", str(bench), "--shard-size", "3", *BEAM]
    stats = run([*args, "--output", str(root / "out")])
    return root, args, stats


def failed_rows(out: Path) -> dict[str, dict]:
    return {Path(r["source"]).name: r for r in pq.read_table(out / "failed.parquet").to_pylist()}


def test_near_duplicates_and_excluded_inputs_are_failed_rows_naming_what_they_match(screened):
    root, _, stats = screened
    failed = failed_rows(root / "out")
    assert {name: row["reason"] for name, row in failed.items()} == {
        "img3_small.png": "near_duplicate", "leak10.jpg": "excluded", "leak11.jpg": "excluded"}
    kept = {Path(r["source"]).name: r["key"] for r in pq.read_table(root / "out" / "index.parquet").to_pylist()}
    assert failed["img3_small.png"]["error"].endswith(kept["img3.png"])
    assert failed["leak10.jpg"]["error"].endswith(str(root / "bench" / "bench10.png"))
    assert sorted(kept) == [f"img{i}.png" for i in range(6)]
    assert stats["failed_by_reason"] == {"excluded": 2, "near_duplicate": 1} and stats["written"] == 6
    # the screen's joins carry keys and ranks, and 64x64 thumbnails (12 KiB) only for candidate pairs
    moved = stats["shuffle_bytes"]
    assert 0 < moved["JoinCandidates"] < 12 * 1024 * 9 * 4 and moved["DropsByKey"] < 2000
    readme = (root / "out" / "README.md").read_text()  # the Hugging Face card says what was dropped and why
    assert "Inputs dropped, by reason: excluded 2, near_duplicate 1." in readme and "`--exclude`" in readme
    card = json.loads((root / "out" / "dataset.json").read_text())
    assert card["config"]["exclude"] == [str(root / "bench")] and card["inputs"]["excluded"]["files"] == 3


def test_a_rerun_writes_nothing_twice_and_a_second_run_drops_the_same(screened, tmp_path):
    root, args, _ = screened
    again = run([*args, "--output", str(root / "out")])
    assert again["shards_written_this_run"] == 0 and again["written"] == 6
    assert len(failed_rows(root / "out")) == 3 == len(pq.read_table(root / "out" / "failed.parquet"))
    other = run([*args, "--output", str(tmp_path / "other")])
    assert failed_rows(tmp_path / "other").keys() == failed_rows(root / "out").keys()
    for name in ("index.parquet",):
        assert (pq.read_table(tmp_path / "other" / name).column("key").to_pylist()
                == pq.read_table(root / "out" / name).column("key").to_pylist())
    assert other["written"] == 6


def test_the_jobs_tolerance_flag_reaches_the_comparison(screened, tmp_path):
    """At --near-dup-tolerance 4 the JPEG q75 copy of a benchmark picture is no longer the same picture."""
    _, args, _ = screened
    run([*args, "--output", str(tmp_path / "strict"), "--near-dup-tolerance", "4"])
    excluded = {n for n, r in failed_rows(tmp_path / "strict").items() if r["reason"] == "excluded"}
    assert "leak10.jpg" not in excluded


def test_a_rerun_after_the_excluded_folder_changed_is_refused(screened, capsys):
    root, args, _ = screened
    photo(13).save(root / "bench" / "bench13.png")
    try:
        with pytest.raises(SystemExit) as err:
            run([*args, "--output", str(root / "out")])
        assert err.value.code == 2
    finally:
        (root / "bench" / "bench13.png").unlink()


def test_no_near_duplicates_keeps_the_copy_and_no_exclude_keeps_the_leaks(screened, tmp_path):
    root, _, _ = screened
    stats = run(["--input", str(root / "in"), "--output", str(tmp_path / "out"), "--no-near-duplicates", *BEAM])
    assert stats["written"] == 9 and stats["failed"] == 0


def test_an_exclude_folder_without_images_is_refused_before_the_job(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    photo(0).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "a.txt").write_text("a\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as err:
        run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--exclude",
             str(tmp_path / "empty"), *BEAM])
    assert err.value.code == 2 and "--exclude" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_toy_world_copies_in_a_benchmark_are_found(toy_world, tmp_path):
    """The toy world's plain pictures share hashes across scenes: the thumbnail check still tells copies."""
    images = sorted(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))
    (tmp_path / "bench").mkdir()
    inputs = tmp_path / "in"
    shutil.copytree(toy_world / "images", inputs)
    for img in images[:4]:  # the benchmark holds these four, re-encoded
        Image.open(img).convert("RGB").save(tmp_path / "bench" / f"b_{img.stem}.jpg", quality=75)
    stats = run(["--input", str(inputs), "--output", str(tmp_path / "out"), "--exclude", str(tmp_path / "bench"),
                 "--no-near-duplicates", *BEAM])
    excluded = {name for name, row in failed_rows(tmp_path / "out").items() if row["reason"] == "excluded"}
    assert {img.name for img in images[:4]} <= excluded
    assert len(excluded) <= 6 and stats["written"] == len(images) - len(excluded)


def test_the_planted_copies_experiment_counts_what_the_job_dropped(toy_world, tmp_path):
    """experiments/near_duplicates.py at toy size: every planted copy is counted once, by its kind."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("near_duplicates", Path(__file__).parents[1] / "experiments" /
                                                  "near_duplicates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--world", str(toy_world), "--out", str(tmp_path / "nd"), "--planted", "6"])
    assert result["planted"] == 6 and set(result["recall"]) == {"resize90", "jpeg75", "crop5"}
    assert result["recall_all"] >= 0.8  # two copies of each kind; the full run finds 97%
    excluded = result["stats"]["failed_by_reason"].get("excluded", 0)
    assert excluded == round(result["recall_all"] * 6) + sum(result["excluded_training"].values())
    assert (tmp_path / "nd" / "near_duplicates.md").read_text().startswith("# Planted benchmark copies")
