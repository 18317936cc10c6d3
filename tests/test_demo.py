"""The whole flow, wired as the README's demo runs it, on a tiny world with a few steps per stage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"image_only", "text_only", "sum", "stage1", "stage2_low", "stage2_high", "stage2_mix"}


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "demo.py", "--out", str(out), "--quick", "--num-images", "48"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"toy-cirr", "toy-circo"}
    for bench, keys in (("toy-cirr", {"recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "avg"}),
                        ("toy-circo", {"map@5", "map@10", "map@25", "map@50"})):
        assert set(results[bench]) == METHODS
        assert all(keys <= set(metrics) for metrics in results[bench].values())
    assert all({"recall@1", "avg"} <= set(m["ci95"]) for m in results["toy-cirr"].values())  # with intervals
    report = (out / "report.md").read_text()
    assert "stage2_mix" in report and "## Against stage I (paired over queries)" in report
    assert "Methods: **image_only**" in report and "**map@K** (CIRCO)" in report  # the legend
    assert "| toy-circo | map@5 | stage2_mix |" in report
    for grid in ("eval/toy-cirr-stage2_mix/examples.png", "eval/toy-circo-stage1/examples.png"):
        assert f"]({grid})" in report and (out / grid).is_file()
    # the stage II export answers a toy query from its gallery index
    assert json.loads((out / "index" / "index.json").read_text())["checkpoint"] == str(out / "stage2_mix" / "final")
    assert (out / "search_example.png").is_file()
    for name in ("ablation.csv", "ablation.md", "ablation.png"):
        assert (out / "ablation" / name).is_file()
    timings = json.loads((out / "timings.json").read_text())
    assert timings["total_s"] > 0 and "stage I: image -> pseudo-word tokens" in timings["steps_s"]
    # a rerun reuses every finished step
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") >= 10
