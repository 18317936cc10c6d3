"""`python -m eval ablate` on a tiny grid: every cell trains and evaluates once, and the three files appear."""
from __future__ import annotations

import csv
import json
import re

from PIL import Image

from train.data import in_subset



def test_subset_is_fixed_and_about_the_right_size():
    keys = [f"{i:032x}" for i in range(4000)]
    kept = [k for k in keys if in_subset(k, 0.25)]
    assert 800 < len(kept) < 1200 and kept == [k for k in keys if in_subset(k, 0.25)]
    assert set(kept) <= {k for k in keys if in_subset(k, 0.5)}  # nested: more triplets include the fewer


def test_tiny_ablation_grid(toy_world, toy_captions, tmp_path, capsys):
    from eval.__main__ import main
    from synth.job import run as synth
    from train.stage1 import main as stage1

    data, _ = toy_captions
    beam = ["--runner", "DirectRunner"]
    synth(["--input", str(data), "--output", str(tmp_path / "high"), "--quality", "high", "--image-weight", "0", *beam])
    synth(["--input", str(data), "--output", str(tmp_path / "low"), "--quality", "low", "--image-weight", "0",
           "--band-low", "0.3", *beam])
    assert stage1([f"output_dir={tmp_path / 's1'}", f"data.train=['{data}']", "clip.model=tiny-clip-32",
                   "max_steps=2", "data.batch_size=8", "save_every=100", "mapping.num_tokens=1", "mapping.depth=1",
                   "mapping.heads=2"]) == 0
    config = tmp_path / "ablate.yaml"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "ablation"), "stage1": str(tmp_path / "s1" / "final"),
        "sources": {"low": str(tmp_path / "low"), "high": str(tmp_path / "high")}, "counts": [20],
        "seeds": [0, 1], "max_steps": 2, "overrides": ["data.batch_size=8", "adapters.bottleneck=8", "log_every=1"],
        "benchmarks": {"toy-cirr": {"benchmark": "cirr", "data": str(toy_world / "bench" / "cirr"), "metric": "avg"}}}))
    assert main(["ablate", "--config", str(config)]) == 0
    out = tmp_path / "ablation"
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert len(rows) == 2 * 1 * 2 and {r["source"] for r in rows} == {"low", "high"}
    assert all(0 <= float(r["avg"]) <= 100 for r in rows)
    table = (out / "ablation.md").read_text()
    assert "| low |" in table and "±" in table
    lo, hi = map(float, table.split("| low | ")[1].split("[")[1].split("]")[0].split(", "))  # the interval
    assert 0 <= lo <= hi <= 100
    assert Image.open(out / "ablation.png").size[0] > 300
    stamp = (out / "cells" / "low-20-seed0" / "train" / "final" / "adapters.safetensors").stat().st_mtime_ns
    assert main(["ablate", "--config", str(config)]) == 0  # rerun: finished cells are reused
    assert (out / "cells" / "low-20-seed0" / "train" / "final" / "adapters.safetensors").stat().st_mtime_ns == stamp
    bad = json.loads(config.read_text())
    bad.update(output_dir=str(tmp_path / "bad"), overrides=[*bad["overrides"], "loss=triplet"])
    config.write_text(json.dumps(bad))
    assert main(["ablate", "--config", str(config)]) == 2  # a cell that cannot train: a clear error, no table
    # the first two cells run at once and both fail: whichever ends first is named, with the end of its log
    err = capsys.readouterr().err
    assert re.search(r"stage II of cell low-20-seed[01] failed.*\n\(the end of its log, .*run\.log:\)", err), err[-2000:]
    assert not (tmp_path / "bad" / "ablation.csv").exists()


def test_bad_ablation_config_exits_2(tmp_path, capsys):
    from eval.__main__ import main

    config = tmp_path / "a.yaml"
    config.write_text("output_dir: x\nstage1: y\nsources: {}\ncounts: [1]\nbogus: 1\n")
    assert main(["ablate", "--config", str(config)]) == 2
    assert "unknown key" in capsys.readouterr().err
