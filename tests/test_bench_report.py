"""bench/run_all.py turns each script's JSON lines into ratios against their targets (no timing here: the
figures are made-up lines in the scripts' formats)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
sys.modules["run_all"] = run_all  # dataclasses look their module up there
spec.loader.exec_module(run_all)


def test_figures_are_higher_is_better_ratios_with_their_targets():
    mining = run_all._mining([{"n": 1_000_000, "method": "faiss-ivf", "seconds": 400.0, "recall_at_10": 0.95,
                               "peak_rss_gb_mining": 5.2, "features_gb": 1.9},
                              {"n": 10_000, "method": "exact", "seconds": 12.0, "recall_at_10": 1.0,
                               "peak_rss_gb_mining": 1.0, "features_gb": 0.02}])
    assert [(f.ratio, f.met) for f in mining] == [(1.5, True), (0.95, True), (0.5, False), (1.0, True)]
    sharded = run_all._mining_sharded([{"n": 10_000, "method": "sharded-ivf", "seconds": 38.6, "recall_at_10": 0.96,
                                        "peak_rss_gb_mining": 2.7}])
    assert [(f.ratio, f.met) for f in sharded] == [(0.96, True)] and "38.6 s" in sharded[0].detail
    topk = run_all._topk([{"gallery": 1000, "queries": 10, "dim": 8, "k": 5, "faiss_over_ours": 0.8,
                           "rows": {"ours": {"seconds": 2.0, "above_features_mib": 3},
                                    "faiss_flat": {"seconds": 1.6}}}])
    assert (topk[0].ratio, topk[0].target, topk[0].met) == (0.8, 1.0, False)
    train = run_all._train([{"ratio": 0.95, "target": 0.9}, {"ratio": 1.5, "target": 1.0},
                            {"ratio": 1.2, "target": 1.0}, {"speedup": 1.4, "target": 3.0, "stage1_step_s_tower": 0.1}])
    assert [f.met for f in train] == [True, True, True, False] and "stage1_step_s_tower 0.1" in train[3].detail
    assert train[3].name.startswith("stage I step") and "loader" in train[2].name
    caption = run_all._caption([{"images": 3000, "sizes": "256-512", "noise": 12.0, "mean_kib": 114.4,
                                 "loop_seconds": 4.79, "job_seconds": 9.1, "loop_peak_mib": 587, "job_peak_mib": 2100,
                                 "ratio_job_over_loop": 0.526, "target_ratio": 0.7},
                                {"images": 12000, "sizes": "64-96", "noise": 12.0, "mean_kib": 5.5,
                                 "loop_seconds": 3.09, "job_seconds": 4.0, "loop_peak_mib": 231, "job_peak_mib": 900,
                                 "ratio_job_over_loop": 0.77, "target_ratio": 0.67},
                                {"model_images_per_s_by_batch_size": {"1": 32, "32": 46},
                                 "ratio_largest_over_batch_1": 1.44}])
    assert [(f.ratio, f.met) for f in caption] == [(0.526, False), (0.77, True), (1.44, True)]
    assert "3,000 images of 256-512 px" in caption[0].name and "peak 2100 vs 587 MiB" in caption[0].detail
    text = run_all.table(mining + topk)
    assert text.count("\n") == len(mining + topk) + 1 and "**no**" in text


def test_the_stage_i_step_bench_builds_the_batch_the_stage_reads():
    """bench/train_throughput.py feeds stage I a batch it builds by hand: it must be the batch the stage's
    collate makes (keys included), through the tower and through cached embeddings (a tiny CLIP, one step)."""
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tower, cached = bench.stage1_step_times("tiny-clip-32", ["a red circle", "a blue square on grass"], steps=1)
    assert tower > 0 and cached > 0
