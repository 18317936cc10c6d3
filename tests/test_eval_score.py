"""`python -m eval score`: hand-computed cases for every metric, each protocol pitfall, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.metrics import average_precision_at_k
from eval.score import PredictionError, score_circo, score_cirr, score_fashioniq

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval", "score", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


# ---------------------------------------------------------------- CIRR

@pytest.fixture
def cirr(tmp_path):
    names = [f"img{i}" for i in range(8)]
    queries = [
        {"pairid": 10, "reference": "img0", "target_hard": "img1", "target_soft": {"img1": 1.0}, "caption": "x",
         "img_set": {"id": 0, "members": ["img0", "img1", "img2", "img3", "img4", "img5"]}},
        {"pairid": 11, "reference": "img2", "target_hard": "img3", "target_soft": {"img3": 1.0}, "caption": "y",
         "img_set": {"id": 1, "members": ["img2", "img3", "img4", "img5", "img6", "img7"]}},
    ]
    ann = write(tmp_path / "cirr" / "captions" / "cap.rc2.val.json", queries)
    write(tmp_path / "cirr" / "image_splits" / "split.rc2.val.json", {n: f"./dev/{n}.png" for n in names})
    # 8 images, reference removed: rankings have 7 names
    recall = {"version": "rc2", "metric": "recall",
              "10": ["img4", "img5", "img1", "img2", "img3", "img6", "img7"],  # target 3rd
              "11": ["img3", "img0", "img1", "img4", "img5", "img6", "img7"]}  # target 1st
    subset = {"version": "rc2", "metric": "recall_subset",
              "10": ["img2", "img1", "img3"],  # target 2nd among members
              "11": ["img3", "img4", "img5"]}  # target 1st
    return ann, recall, subset


def test_cirr_recall_and_subset_by_hand(cirr):
    ann, recall, subset = cirr
    got = score_cirr(ann, recall, subset)
    assert got == {"recall@1": 50.0, "recall@5": 100.0, "recall@10": 100.0, "recall@50": 100.0,
                   "recall_subset@1": 50.0, "recall_subset@2": 100.0, "recall_subset@3": 100.0, "avg": 75.0}


@pytest.mark.parametrize("change, message", [
    (lambda r, s: r["10"].__setitem__(0, "img0"), "reference img0 must be removed"),
    (lambda r, s: r.pop("11"), "1 queries have no prediction"),
    (lambda r, s: r.__setitem__("12", r["10"]), "predictions for unknown queries"),
    (lambda r, s: r.__setitem__("version", "rc1"), '"version": "rc2"'),
    (lambda r, s: r["11"].__setitem__(1, "img3"), "appears more than once"),
    (lambda r, s: r["11"].pop(), "expected 7 items"),
    (lambda r, s: s["10"].__setitem__(0, "img0"), "not a member of the image set"),
    (lambda r, s: s.__setitem__("metric", "recall"), '"metric": "recall_subset"'),
])
def test_cirr_pitfalls_are_errors(cirr, change, message):
    ann, recall, subset = cirr
    change(recall, subset)
    with pytest.raises(PredictionError, match=message):
        score_cirr(ann, recall, subset)


def test_cirr_test_split_cannot_be_scored_locally(tmp_path):
    ann = write(tmp_path / "cap.rc2.test1.json", [{"pairid": 1, "reference": "a", "caption": "c",
                                                   "img_set": {"id": 0, "members": ["a", "b"]}}])
    with pytest.raises(PredictionError, match="submit to the CIRR server"):
        score_cirr(ann, {"version": "rc2", "metric": "recall", "1": ["b"]})


# ---------------------------------------------------------------- CIRCO

@pytest.fixture
def circo(tmp_path):
    root = tmp_path / "circo"
    gallery = list(range(1, 61))
    write(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
          {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in gallery]})
    many = list(range(21, 51))  # 30 correct images
    queries = [
        {"id": 0, "reference_img_id": 1, "target_img_id": 10, "relative_caption": "a", "shared_concept": "s",
         "gt_img_ids": [10, 20, 55]},
        {"id": 1, "reference_img_id": 2, "target_img_id": 5, "relative_caption": "b", "shared_concept": "s",
         "gt_img_ids": [5]},
        {"id": 2, "reference_img_id": 3, "target_img_id": 21, "relative_caption": "c", "shared_concept": "s",
         "gt_img_ids": many},
    ]
    ann = write(root / "annotations" / "val.json", queries)

    def ranking(head, gt):
        """`head`, then only wrong images: the hits are exactly where the test puts them."""
        return head + [i for i in gallery if i not in head and i not in gt][: 50 - len(head)]

    preds = {"0": ranking([10, 9, 20], [10, 20, 55]),  # gt at ranks 1 and 3 (9 is not gt; 55 never found)
             "1": ranking([7, 5], [5]),  # gt at rank 2
             "2": ranking(many[:25], many)}  # the first 25 ranks all correct, then none
    return ann, preds


def test_circo_map_by_hand(circo):
    ann, preds = circo
    got = score_circo(ann, preds)
    ap0 = (1 / 1 + 2 / 3) / 3  # precision at the hits, / min(#gt=3, K)
    ap1 = (1 / 2) / 1
    # query 2 has 30 correct images: AP@K is normalised by min(30, K), so 25 hits in the top 25 give AP@25 = 1
    assert got["map@5"] == pytest.approx(100 * (ap0 + ap1 + 1.0) / 3, abs=1e-4)
    assert got["map@25"] == pytest.approx(100 * (ap0 + ap1 + 1.0) / 3, abs=1e-4)
    ap2_50 = 25 / 30  # 25 hits in the first 25, none after, / min(30, 50)
    assert got["map@50"] == pytest.approx(100 * (ap0 + ap1 + ap2_50) / 3, abs=1e-4)


def test_average_precision_normalisation():
    assert average_precision_at_k([1, 2, 3], [1, 2, 3, 4, 5, 6], k=3) == 1.0  # min(6, 3) = 3
    assert average_precision_at_k([9, 1], [1], k=2) == 0.5
    assert average_precision_at_k([9, 8], [1], k=2) == 0.0


@pytest.mark.parametrize("change, message", [
    (lambda p: p["0"].__setitem__(1, 10), "appears more than once"),
    (lambda p: p.pop("2"), "have no prediction"),
    (lambda p: p["1"].pop(), "expected 50 items"),
    (lambda p: p["1"].__setitem__(0, "seven"), "ids must be integers"),
])
def test_circo_pitfalls_are_errors(circo, change, message):
    ann, preds = circo
    change(preds)
    with pytest.raises(PredictionError, match=message):
        score_circo(ann, preds)


# ---------------------------------------------------------------- FashionIQ

@pytest.fixture
def fashioniq(tmp_path):
    root = tmp_path / "fashionIQ"
    names = {cat: [f"{cat}{i}" for i in range(60)] for cat in ("dress", "shirt")}
    for cat, ns in names.items():
        write(root / "image_splits" / f"split.{cat}.val.json", ns)
    write(root / "captions" / "cap.dress.val.json", [
        {"candidate": "dress0", "target": "dress1", "captions": ["is red", "has no sleeves"]},
        {"candidate": "dress2", "target": "dress3", "captions": ["is blue", "is longer"]}])
    write(root / "captions" / "cap.shirt.val.json", [
        {"candidate": "shirt0", "target": "shirt1", "captions": ["is green", "has a logo"]}])

    def ranking(cat, head):
        return head + [n for n in names[cat] if n not in head][: 50 - len(head)]

    preds = {"dress": {"0": ranking("dress", ["dress0", "dress9", "dress8", "dress7", "dress1"]),  # reference
                       # kept (FashionIQ does not exclude it); target 5th
                       "1": [n for n in names["dress"] if n != "dress3"][:29] + ["dress3"] + names["dress"][30:50]},
             "shirt": {"0": [n for n in names["shirt"] if n != "shirt1"][:50]}}
    return root, preds


def test_fashioniq_recall_by_hand(fashioniq):
    root, preds = fashioniq
    got = score_fashioniq(root, preds)
    assert got == {"dress/recall@10": 50.0, "dress/recall@50": 100.0, "shirt/recall@10": 0.0,
                   "shirt/recall@50": 0.0, "avg/recall@10": 25.0, "avg/recall@50": 50.0, "avg": 37.5}


def test_fashioniq_missing_category_or_query_is_an_error(fashioniq):
    root, preds = fashioniq
    with pytest.raises(PredictionError, match="lack categories"):
        score_fashioniq(root, {"dress": preds["dress"]})
    assert score_fashioniq(root, {"dress": preds["dress"]}, categories=["dress"])["avg/recall@10"] == 50.0
    preds["dress"].pop("1")
    with pytest.raises(PredictionError, match="have no prediction"):
        score_fashioniq(root, preds)


# ---------------------------------------------------------------- the command line and the toy benchmarks

def test_cli_prints_one_json_object_and_exits_2_on_bad_files(cirr, tmp_path):
    ann, recall, subset = cirr
    pred = write(tmp_path / "pred.json", recall)
    sub = write(tmp_path / "sub.json", subset)
    ok = cli("--benchmark", "cirr", "--annotations", str(ann), "--predictions", str(pred), "--subset-predictions",
             str(sub))
    assert ok.returncode == 0 and json.loads(ok.stdout)["recall@1"] == 50.0
    bad = write(tmp_path / "bad.json", {**recall, "10": recall["10"][:3]})
    result = cli("--benchmark", "cirr", "--annotations", str(ann), "--predictions", str(bad))
    assert result.returncode == 2 and "expected 7 items" in result.stderr and not result.stdout
    (tmp_path / "broken.json").write_text("{not json")
    result = cli("--benchmark", "circo", "--annotations", str(ann), "--predictions", str(tmp_path / "broken.json"))
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    for missing in (tmp_path / "missing.json", tmp_path):  # no file, or a directory
        result = cli("--benchmark", "circo", "--annotations", str(ann), "--predictions", str(missing))
        assert result.returncode == 2 and f"predictions not found: {missing}" in result.stderr


def test_oracle_predictions_on_the_toy_benchmarks_score_100(toy_world):
    bench = toy_world / "bench"
    # CIRR: the target first, then the rest of the split, reference removed
    ann = bench / "cirr" / "captions" / "cap.rc2.val.json"
    split = list(json.loads((bench / "cirr" / "image_splits" / "split.rc2.val.json").read_text()))
    recall, subset = {"version": "rc2", "metric": "recall"}, {"version": "rc2", "metric": "recall_subset"}
    for q in json.loads(ann.read_text()):
        rest = [n for n in split if n not in (q["reference"], q["target_hard"])]
        recall[str(q["pairid"])] = [q["target_hard"], *rest][:50]
        members = [m for m in q["img_set"]["members"] if m not in (q["reference"], q["target_hard"])]
        subset[str(q["pairid"])] = [q["target_hard"], *members][:3]
    got = score_cirr(ann, recall, subset)
    assert got["recall@1"] == got["recall_subset@1"] == 100.0
    # CIRCO: every ground-truth image first
    ann = bench / "circo" / "annotations" / "val.json"
    ids = [i["id"] for i in json.loads((bench / "circo" / "COCO2017_unlabeled" / "annotations" /
                                        "image_info_unlabeled2017.json").read_text())["images"]]
    preds = {str(q["id"]): (q["gt_img_ids"] + [i for i in ids if i not in q["gt_img_ids"]])[:50]
             for q in json.loads(ann.read_text())}
    assert score_circo(ann, preds) == {"map@5": 100.0, "map@10": 100.0, "map@25": 100.0, "map@50": 100.0}
    # FashionIQ: the target first
    preds = {}
    for cat in ("dress", "shirt", "toptee"):
        names = json.loads((bench / "fashioniq" / "image_splits" / f"split.{cat}.val.json").read_text())
        queries = json.loads((bench / "fashioniq" / "captions" / f"cap.{cat}.val.json").read_text())
        preds[cat] = {str(i): ([q["target"]] + [n for n in names if n != q["target"]])[:50]
                      for i, q in enumerate(queries)}
    assert score_fashioniq(bench / "fashioniq", preds)["avg"] == 100.0


# ---------------------------------------------------------------- Shoes and Fashion200k

def test_shoes_recall_by_hand(tmp_path):
    from eval.score import score_shoes

    names = [f"img_{i}.jpg" for i in range(60)]
    (tmp_path / "eval_im_names.txt").write_text("\n".join(names[:55]) + "\n")
    write(tmp_path / "relative_captions_shoes.json", [
        {"ImageName": "img_1.jpg", "ReferenceImageName": "img_0.jpg", "RelativeCaption": "is red"},
        {"ImageName": "img_58.jpg", "ReferenceImageName": "img_0.jpg", "RelativeCaption": "train pair"},  # not eval
        {"ImageName": "img_3.jpg", "ReferenceImageName": "img_2.jpg", "RelativeCaption": "is taller"}])
    gallery = names[:55]

    def ranking(ref, head):
        return head + [n for n in gallery if n not in head and n != ref][: 50 - len(head)]

    preds = {"0": ranking("img_0.jpg", ["img_1.jpg"]),  # target first
             "1": ranking("img_2.jpg", [n for n in gallery if n not in ("img_2.jpg", "img_3.jpg")][:20] + ["img_3.jpg"])}
    assert score_shoes(tmp_path, preds) == {"recall@1": 50.0, "recall@10": 50.0, "recall@50": 100.0, "avg": 66.6667}
    preds["0"][5] = "img_0.jpg"
    with pytest.raises(PredictionError, match="reference img_0.jpg must be excluded"):
        score_shoes(tmp_path, preds)


def test_fashion200k_hit_is_any_image_with_the_target_caption(tmp_path):
    from eval.score import score_fashion200k

    (tmp_path / "labels").mkdir()
    rows = [f"women/dresses/{i}.jpg\t0.9\t{'red dress' if i in (5, 7) else f'caption {i}'}" for i in range(60)]
    (tmp_path / "labels" / "dress_test_detect_all.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "test_queries.txt").write_text("women/dresses/0.jpg women/dresses/5.jpg\n")
    gallery = [f"women/dresses/{i}.jpg" for i in range(1, 60)]
    # image 7 has the same caption as the target 5: ranked first, it is a hit at 1 (TIRG protocol)
    preds = {"0": ["women/dresses/7.jpg"] + [g for g in gallery if g != "women/dresses/7.jpg"][:49]}
    assert score_fashion200k(tmp_path, preds) == {"recall@1": 100.0, "recall@10": 100.0, "recall@50": 100.0}
    preds = {"0": [g for g in gallery if g not in ("women/dresses/5.jpg", "women/dresses/7.jpg")][:50]}
    assert score_fashion200k(tmp_path, preds)["recall@50"] == 0.0
