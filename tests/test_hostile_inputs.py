"""Issue #23, as a hostile but realistic user: nothing a user types destroys data or mixes datasets. Each test
reproduces a break that was reported and asserts the new behaviour (a clear message, exit 2, nothing lost)."""
from __future__ import annotations

import shutil

import pytest

from pipeline.caption import run as caption

BEAM = ["--runner", "DirectRunner"]


def images(toy_world, tmp_path, n=6):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((toy_world / "images").glob("toy_00000*"))[: n * 3]:
        shutil.copy(p, folder / p.name)
    return folder


def exits_2(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        caption(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["same", "inside"])
def test_an_output_that_is_or_lies_inside_the_input_is_refused(toy_world, tmp_path, capsys, where):
    """Break 1: `caption --input D --output D` was accepted, and a later `--overwrite` deleted D, inputs and all."""
    photos = images(toy_world, tmp_path)
    before = sorted(p.name for p in photos.iterdir())
    output = photos if where == "same" else photos / "captions"
    exits_2(capsys, ["--input", str(photos), "--output", str(output), "--overwrite", *BEAM], "overlap")
    assert sorted(p.name for p in photos.iterdir()) == before


def test_an_output_that_contains_the_input_is_refused(toy_world, tmp_path, capsys):
    photos = images(toy_world, tmp_path)
    exits_2(capsys, ["--input", str(photos / "*.jpg"), "--output", str(tmp_path), *BEAM], "overlap")


def test_a_folder_that_is_not_our_dataset_is_never_written_into(toy_world, tmp_path, capsys):
    photos = images(toy_world, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    exits_2(capsys, ["--input", str(photos), "--output", str(mine), "--overwrite", *BEAM], "without a dataset card")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_overwrite_deletes_only_what_the_job_wrote(toy_world, tmp_path):
    """--overwrite replaces a dataset of ours made with another configuration; a file the user put beside it
    stays."""
    photos = images(toy_world, tmp_path)
    out = tmp_path / "captions"
    first = caption(["--input", str(photos), "--output", str(out), "--shard-size", "2", *BEAM])
    (out / "notes.txt").write_text("keep me")
    again = caption(["--input", str(photos), "--output", str(out), "--shard-size", "3", "--overwrite", *BEAM])
    assert again["written"] == first["written"]
    assert (out / "notes.txt").read_text() == "keep me"
    import pyarrow.parquet as pq

    in_index = set(pq.read_table(out / "index.parquet").column("shard").to_pylist())
    assert {p.stem for p in (out / "shards").glob("*.tar")} == in_index  # no shard of the old layout is left
