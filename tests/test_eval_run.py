"""`python -m eval run`: the toy benchmarks round trip through encode -> rank -> files -> official scores."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from eval.encoder import top_k
from eval.run import run

ROOT = Path(__file__).resolve().parents[1]


def test_top_k_matches_brute_force_in_chunks_with_exclusions():
    torch.manual_seed(0)
    q, g = torch.randn(7, 16), torch.randn(103, 16)
    exclude = [5, -1, 102, 0, -1, 50, 64]
    scores, got = top_k(q, g, 10, exclude, chunk=17)
    full = q @ g.T
    for i, e in enumerate(exclude):
        if e >= 0:
            full[i, e] = -float("inf")
    assert torch.equal(got, full.topk(10, dim=1).indices)
    assert torch.allclose(scores, full.topk(10, dim=1).values)


def test_cirr_round_trip(toy_world, tiny_stage1_export, tmp_path):
    bench = toy_world / "bench" / "cirr"
    out = tmp_path / "cirr"
    metrics = run("cirr", str(bench), str(tiny_stage1_export), output=str(out))
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "recall_subset@2",
                            "recall_subset@3", "avg"}
    assert all(0 <= v <= 100 for v in metrics.values())
    recall = json.loads((out / "recall_submission.json").read_text())
    subset = json.loads((out / "recall_subset_submission.json").read_text())
    assert recall["version"] == subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    queries = json.loads((bench / "captions" / "cap.rc2.val.json").read_text())
    for q in queries:
        assert q["reference"] not in recall[str(q["pairid"])]  # removed, as the protocol says
        assert set(subset[str(q["pairid"])]) <= set(q["img_set"]["members"]) - {q["reference"]}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    _check_example_grid(out / "examples.png", bench, queries, recall)
    cache = list(out.glob("gallery-*.npy"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    assert run("cirr", str(bench), str(tiny_stage1_export), output=str(out)) == metrics  # same numbers again
    assert cache[0].stat().st_mtime_ns == stamp  # the gallery was not encoded twice


def _check_example_grid(path, bench, queries, recall):
    """examples.png: the sampled queries' top 5, each row's target outlined exactly where it was ranked."""
    from PIL import Image

    from eval.grids import TARGET_COLOUR, grid_size, panel_box
    from eval.run import _grid_sample, load_cirr

    sample = _grid_sample(load_cirr(bench, "val"), 6)
    sheet = Image.open(path).convert("RGB")
    assert sheet.size == grid_size(len(sample), 5, 160)
    target = {str(q["pairid"]): q["target_hard"] for q in queries}
    for (_, qid), row in sample.items():
        top5 = recall[qid][:5]
        outlined = [sheet.getpixel(panel_box(row, c + 2, 160)[:2]) == TARGET_COLOUR for c in range(5)]
        assert outlined == [name == target[qid] for name in top5]


def test_circo_and_fashioniq_and_baselines(toy_world, tiny_stage1_export, tmp_path):
    circo = run("circo", str(toy_world / "bench" / "circo"), str(tiny_stage1_export), output=str(tmp_path / "c"))
    assert set(circo) == {"map@5", "map@10", "map@25", "map@50"}
    preds = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert all(isinstance(i, int) for ranked in preds.values() for i in ranked)
    for method in ("image_only", "text_only", "sum"):
        got = run("fashioniq", str(toy_world / "bench" / "fashioniq"), str(tiny_stage1_export / "clip"), method=method,
                  output=str(tmp_path / method))
        assert {"dress/recall@10", "avg/recall@50", "avg"} <= set(got)


def test_missing_gallery_images_are_reported(toy_world, tiny_stage1_export, tmp_path):
    bench = tmp_path / "fiq"
    shutil.copytree(toy_world / "bench" / "fashioniq", bench)
    names = json.loads((bench / "image_splits" / "split.dress.val.json").read_text())
    queries = json.loads((bench / "captions" / "cap.dress.val.json").read_text())
    used = {q["candidate"] for q in queries} | {q["target"] for q in queries}
    unused = next(n for n in names if n not in used)
    (bench / "images" / f"{unused}.png").unlink()
    metrics = run("fashioniq", str(bench), str(tiny_stage1_export), output=str(tmp_path / "o"))
    assert metrics["missing_gallery_images"] == 1


def test_cli_needs_an_export_for_the_model_method(toy_world, tiny_stage1_export):
    args = [sys.executable, "-m", "eval", "run", "--benchmark", "cirr", "--data", str(toy_world / "bench" / "cirr")]
    bad = subprocess.run([*args, "--checkpoint", str(tiny_stage1_export / "clip")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "not a stage I/II export" in bad.stderr
