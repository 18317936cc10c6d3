"""`beam_runner.py inspect`: a valid dataset passes; each kind of damage is reported with exit status 1."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.inspect import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dataset(toy_captions, tmp_path):
    src, _ = toy_captions
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def rewrite_first_shard(dataset: Path, change) -> None:
    """Rewrite one shard's tar, passing each (name, bytes) through `change` (None drops the member)."""
    path = sorted((dataset / "shards").glob("*.tar"))[0]
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            changed = change(name, data)
            if changed is None:
                continue
            info = tarfile.TarInfo(changed[0])
            info.size = len(changed[1])
            tar.addfile(info, io.BytesIO(changed[1]))


def test_valid_dataset_passes(dataset, capsys):
    assert run([str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "samples: 48" in out and "OK" in out


def test_cli_exit_status(dataset):
    ok = subprocess.run([sys.executable, "beam_runner.py", "inspect", str(dataset)], cwd=ROOT, capture_output=True)
    assert ok.returncode == 0
    (dataset / "stats.json").unlink()
    bad = subprocess.run([sys.executable, "beam_runner.py", "inspect", str(dataset)], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "missing stats.json" in bad.stderr


def test_index_that_lost_a_row(dataset, capsys):
    table = pq.read_table(dataset / "index.parquet")
    pq.write_table(table.slice(1), dataset / "index.parquet")
    assert run([str(dataset)]) == 1
    assert "index.parquet has 47 rows, shards hold 48" in capsys.readouterr().err


def test_extension_that_lies_about_the_bytes(dataset, capsys):
    def swap(name, data):
        if name.endswith(".jpg"):
            return name[:-4] + ".png", data
        if name.endswith(".png"):
            return name[:-4] + ".jpg", data
        return name, data

    rewrite_first_shard(dataset, swap)
    assert run([str(dataset)]) == 1
    assert "extension says" in capsys.readouterr().err


def test_missing_caption_and_pickle_member(dataset, capsys):
    first = {}

    def damage(name, data):
        key = name.split(".", 1)[0]
        first.setdefault("key", key)
        if key == first["key"] and name.endswith(".txt"):
            return None  # a sample without its caption
        return name, data

    rewrite_first_shard(dataset, damage)
    path = sorted((dataset / "shards").glob("*.tar"))[0]
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(f"{first['key']}.pyd")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x80\x04N."))  # a pickle: never decoded, reported as unexpected
    assert run([str(dataset)]) == 1
    err = capsys.readouterr().err
    assert "empty or missing txt" in err and "unexpected member .pyd" in err
