"""Confidence intervals: the bootstrap over queries (eval.stats) and eval run's per-query values and ci95."""
from __future__ import annotations

import json
import random

import pytest

from eval import stats
from eval.score import cirr_per_query, fashioniq_per_query, score_fashioniq, summarize


def test_bootstrap_interval_brackets_the_metric_and_has_the_binomial_width():
    hits = [100.0] * 30 + [0.0] * 70  # R@1 = 30 on 100 queries: the guide's +-9 points
    lo, hi = stats.bootstrap_ci({"": hits})
    assert lo < 30 < hi
    assert 15 < hi - lo < 21
    assert stats.bootstrap_ci({"": hits}) == (lo, hi)  # seeded: the same inputs, the same interval
    wider = stats.bootstrap_ci({"": hits[:10] + hits[30:50]})  # 30 queries
    assert wider[1] - wider[0] > hi - lo
    assert stats.bootstrap_ci({"": [100.0] * 20}) == (100.0, 100.0)


def test_reports_show_a_stored_value_rounded_as_a_reader_rounds_it():
    """Reports store 2 decimals and show 1: a stored x.x5 goes away from zero whatever its binary float is
    (Python's format gave 9.25 -> 9.2, 1.45 -> 1.4 and 0.35 -> 0.3, but 5.75 -> 5.8)."""
    assert [stats.shown(v) for v in (9.25, 1.45, 0.35, 5.75, 34.04, 100.0)] == ["9.3", "1.5", "0.4", "5.8", "34.0",
                                                                                 "100.0"]
    assert [stats.shown(v, signed=True) for v in (3.05, -3.25, 0.0, -0.15)] == ["+3.1", "-3.3", "+0.0", "-0.2"]
    assert [stats.shown(v, digits=0) for v in (10.5, 18.5, 40.49)] == ["11", "19", "40"]  # format: "10", "18"


def test_grouped_metric_is_the_mean_of_group_means():
    groups = {"dress": [100.0, 0.0], "shirt": [100.0] * 8}  # 50 and 100: the metric is 75, not 90
    assert stats.metric_of(groups) == 75.0
    lo, hi = stats.bootstrap_ci(groups)
    assert lo <= 75 <= hi and hi <= 100 and lo >= 50


def test_paired_difference_is_tighter_than_two_separate_intervals():
    base = [100.0 if i % 3 == 0 else 0.0 for i in range(300)]
    better = [100.0 if (i % 3 == 0 or i % 10 == 1) else 0.0 for i in range(300)]  # a strict superset of hits
    a, b = stats.bootstrap_ci({"": better}), stats.bootstrap_ci({"": base})
    assert a[0] < b[1]  # the separate intervals overlap ...
    lo, _ = stats.bootstrap_ci(stats.paired_difference({"": better}, {"": base}))
    assert lo > 0  # ... but the paired difference is clearly positive
    with pytest.raises(ValueError, match="same queries"):
        stats.paired_difference({"": better}, {"": base[:10]})


def test_the_interval_over_seeds_widens_with_the_seeds_spread():
    """Three training runs that agree give the queries' interval; runs that disagree widen it (the two-level
    bootstrap resamples the runs too), around the runs' mean."""
    rng = random.Random(0)
    base = [100.0 if rng.random() < 0.3 else 0.0 for _ in range(1000)]
    same, narrow = [{"": base}] * 3, stats.bootstrap_ci({"": base})
    assert stats.bootstrap_ci_over_seeds(same[:1]) == narrow  # one run: the queries' interval
    lo, hi = stats.bootstrap_ci_over_seeds(same)
    assert abs((hi - lo) - (narrow[1] - narrow[0])) < 1.0
    shifted = [{"": [min(100.0, v + d) if i % 10 < 3 else v for i, v in enumerate(base)]} for d in (0.0, 30.0, 60.0)]
    wide = stats.bootstrap_ci_over_seeds(shifted)
    mean = stats.metric_of(stats.mean_over(shifted))
    assert wide[0] < mean < wide[1] and wide[1] - wide[0] > (hi - lo) + 3
    assert stats.bootstrap_ci_over_seeds(shifted) == wide  # seeded


def test_mean_over_seeds_averages_query_by_query():
    assert stats.mean_over([{"": [100.0, 0.0]}, {"": [0.0, 0.0]}]) == {"": [50.0, 0.0]}


def test_per_query_values_give_the_official_metrics(toy_world):
    """summarize(per-query values) is what score_* always returned; FashionIQ's avg is the mean of categories."""
    root = toy_world / "bench" / "fashioniq"
    preds = {}
    for cat in ("dress", "shirt", "toptee"):
        queries = json.loads((root / "captions" / f"cap.{cat}.val.json").read_text())
        names = json.loads((root / "image_splits" / f"split.{cat}.val.json").read_text())
        # the target first for even queries only
        preds[cat] = {str(i): ([q["target"]] if i % 2 == 0 else []) +
                      [n for n in names if n != q["target"]][:50 - (i % 2 == 0)] for i, q in enumerate(queries)}
    per_query = fashioniq_per_query(root, preds)
    assert set(per_query["avg"]) == {"dress", "shirt", "toptee"}
    assert summarize(per_query) == score_fashioniq(root, preds)
    cirr = toy_world / "bench" / "cirr" / "captions" / "cap.rc2.val.json"
    queries = json.loads(cirr.read_text())
    names = json.loads((toy_world / "bench" / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for q in queries:
        rest = [n for n in names if n not in (q["reference"], q["target_hard"])]
        recall[str(q["pairid"])] = ([q["target_hard"]] + rest)[:min(50, len(names) - 1)]
        members = [m for m in q["img_set"]["members"] if m not in (q["reference"], q["target_hard"])]
        subset[str(q["pairid"])] = members[:3]  # the target never in the subset top 3
    pq = cirr_per_query(cirr, recall, subset)
    assert pq["recall@1"][""] == [100.0] * len(queries)
    assert pq["avg"][""] == [50.0] * len(queries)


def test_eval_run_writes_per_query_values_and_intervals(toy_world, tiny_stage1_export, tmp_path):
    from eval.run import run

    got = run("cirr", str(toy_world / "bench" / "cirr"), str(tiny_stage1_export), output=str(tmp_path / "o"))
    per_query = json.loads((tmp_path / "o" / "per_query.json").read_text())
    assert summarize(per_query) == {k: v for k, v in got.items() if k != "ci95"}
    assert set(got["ci95"]) == set(per_query)
    for name, (lo, hi) in got["ci95"].items():
        assert lo <= got[name] <= hi, name
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["ci95"] == got["ci95"]
