"""cir.benchmarks: one reader per layout; splits named as the benchmarks name them; errors that name the file."""
from __future__ import annotations

import pytest

from cir.benchmarks import BenchmarkError, different_word, load, split_name


def test_split_names_follow_each_benchmark():
    assert split_name("cirr", None) == "val" and split_name("cirr", "test") == "test1"
    assert split_name("shoes", None) == "eval" and split_name("shoes", "test") == "eval"
    assert split_name("fashion200k", None) == "test"
    for benchmark in ("cirr", "circo", "fashioniq", "shoes", "fashion200k"):
        name = split_name(benchmark, None)
        assert split_name(benchmark, name) == name  # a file's split name is accepted as given
    with pytest.raises(BenchmarkError, match="shoes has no split 'val'"):
        split_name("shoes", "val")
    with pytest.raises(BenchmarkError, match="unknown benchmark 'coco'"):
        split_name("coco", None)


def test_different_word_is_tirgs():
    assert different_word("black mini dress", "red mini dress") == ("black", "red")
    assert different_word("a b c", "a c b") is None  # the same words: nothing to replace
    assert different_word("long red skirt", "red long dress") == ("skirt", "dress")


def test_fashion200k_query_without_a_word_to_replace_names_its_line(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "dress_test_detect_all.txt").write_text(
        "women/a.jpeg\t0.9\tred dress\nwomen/b.jpeg\t0.9\tblue dress\nwomen/c.jpeg\t0.8\tred dress\n")
    (tmp_path / "test_queries.txt").write_text("women/a.jpeg women/b.jpeg\nwomen/a.jpeg women/c.jpeg\n")
    with pytest.raises(BenchmarkError, match="line 2: .*have no word to replace"):
        load("fashion200k", tmp_path)
    (tmp_path / "test_queries.txt").write_text("women/a.jpeg women/b.jpeg\n")
    bench = load("fashion200k", tmp_path)
    (q,) = bench.queries[""]
    assert q.texts == ["replace red with blue"] and q.exclude_reference and q.targets == ("women/b.jpeg",)
    assert sorted(bench.gallery) == ["women/a.jpeg", "women/b.jpeg", "women/c.jpeg"]
    with pytest.raises(BenchmarkError, match="Fashion200k queries not found"):
        (tmp_path / "test_queries.txt").unlink()
        load("fashion200k", tmp_path)


def test_cirr_is_read_in_one_place_for_evaluation_and_training(tmp_path):
    """cir.benchmarks.load_cirr: the known targets are target_hard, then the other images scored above 0 (what
    the supervised loader keeps out of the hard negatives); a query without its image set is named."""
    import json

    from cir.benchmarks import load_cirr

    (tmp_path / "image_splits").mkdir()
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits" / "split.rc2.train.json").write_text(json.dumps({n: f"./{n}.png" for n in "abcd"}))
    query = {"pairid": 5, "reference": "a", "target_hard": "b", "caption": "x",
             "target_soft": {"b": 1.0, "d": 0.5, "c": -1.0}, "img_set": {"id": 0, "members": ["a", "b", "c", "d"]}}
    (tmp_path / "captions" / "cap.rc2.train.json").write_text(json.dumps([query]))
    (q,) = load_cirr(tmp_path, "train").queries[""]
    assert (q.reference, q.targets, q.subset, q.texts) == ("a", ("b", "d"), ["b", "c", "d"], ["x"])
    del query["img_set"]
    (tmp_path / "captions" / "cap.rc2.train.json").write_text(json.dumps([query]))
    with pytest.raises(BenchmarkError, match="query 5 lacks 'img_set'"):
        load_cirr(tmp_path, "train")


@pytest.mark.parametrize("layout", ["root", "img_raw", "parent"])
def test_cirr_images_are_found_in_each_layout_people_download(toy_world, tmp_path, layout):
    """Issue 42: the official download keeps the images under img_raw/ (CLIP4Cir's layout one folder above the
    annotations); image_splits' relative paths then named every image missing unless the user made symlinks."""
    import shutil

    from cir.benchmarks import load_cirr

    src = toy_world / "bench" / "cirr"
    root = tmp_path / "cirr_dataset" / "cirr"
    shutil.copytree(src / "captions", root / "captions")
    shutil.copytree(src / "image_splits", root / "image_splits")
    images = {"root": root, "img_raw": root / "img_raw", "parent": root.parent}[layout]
    for split in ("dev", "test1"):
        shutil.copytree(src / split, images / split)
    bench = load_cirr(root, "val")
    assert bench.gallery and all(p.is_file() for p in bench.gallery.values())
    assert all(p.parent.parent == images for p in bench.gallery.values())
