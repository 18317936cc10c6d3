"""`python -m eval score`: metrics from a predictions file, checked against the annotations first.

A predictions file that is malformed, incomplete (a query missing), over-complete (an unknown query),
has duplicates, the wrong length, or (CIRR) still contains the reference raises `PredictionError`, which
the command line turns into a message and exit code 2: a wrong file must never score quietly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cir import jsonfile
from cir.benchmarks import BenchmarkError, fashion200k_queries, fashioniq_files, shoes_queries
from eval.metrics import average_precisions, recall_hits, recall_hits_any

TOP = 50  # every benchmark's server takes top-50 lists
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
FASHIONIQ_KS = (10, 50)


class PredictionError(BenchmarkError):
    """The predictions (or annotations) do not fit the protocol; the message says where. Errors in a benchmark's
    own files are `cir.benchmarks.BenchmarkError`, this class's base: the command line catches that."""


# metric -> group (FashionIQ category; "" elsewhere) -> one value per query, in annotation order, such that the
# metric is the mean over groups of each group's mean (eval.stats bootstraps these for confidence intervals)
PerQuery = dict[str, dict[str, list[float]]]


def summarize(per_query: PerQuery) -> dict[str, float]:
    """The benchmark's metrics (percent, rounded) from its per-query values."""
    return _rounded({name: sum(sum(v) / len(v) if v else 0.0 for v in groups.values()) / len(groups)
                     for name, groups in per_query.items()})


def load_json(path: str | Path, what: str) -> Any:
    return jsonfile.load_json(path, what, PredictionError)


def _check_list(name: str, ranked: Any, length: int, *, item_type: type) -> list:
    if not isinstance(ranked, list):
        raise PredictionError(f"{name}: expected a list of {length} items, got {type(ranked).__name__}")
    if len(ranked) != length:
        raise PredictionError(f"{name}: expected {length} items, got {len(ranked)}")
    if item_type is int:
        try:
            ranked = [int(c) for c in ranked]
        except (TypeError, ValueError) as err:
            raise PredictionError(f"{name}: ids must be integers ({err})") from err
    elif not all(isinstance(c, str) for c in ranked):
        raise PredictionError(f"{name}: items must be image names (strings)")
    if len(set(ranked)) != len(ranked):
        dup = next(c for c in ranked if ranked.count(c) > 1)
        raise PredictionError(f"{name}: {dup!r} appears more than once")
    return ranked


def _check_keys(what: str, got: set[str], expected: set[str]) -> None:
    missing, extra = expected - got, got - expected
    if missing:
        raise PredictionError(f"{what}: {len(missing)} queries have no prediction (e.g. {sorted(missing)[:3]})")
    if extra:
        raise PredictionError(f"{what}: {len(extra)} predictions for unknown queries (e.g. {sorted(extra)[:3]})")


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------ CIRR

def _cirr_gallery_size(annotations: Path) -> Optional[int]:
    """CIRR layout: captions/cap.rc2.{split}.json beside image_splits/split.rc2.{split}.json."""
    split_file = annotations.parent.parent / "image_splits" / annotations.name.replace("cap.", "split.", 1)
    if split_file.is_file():
        return len(load_json(split_file, "CIRR image split"))
    return None


def _queries_with_ground_truth(annotations: Path, benchmark: str, gt_field: str) -> list:
    """The annotation list; a test split (no ground truth) is scored by the benchmark's server, not here."""
    queries = load_json(annotations, f"{benchmark} annotations")
    if not isinstance(queries, list) or not queries:
        raise PredictionError(f"{annotations}: expected a list of {benchmark} queries")
    if any(gt_field not in q for q in queries):
        raise PredictionError(f"{annotations} has no {gt_field} (a test split): submit to the {benchmark} server")
    return queries


def score_cirr(annotations: str | Path, predictions: dict, subset_predictions: Optional[dict] = None) -> dict:
    return summarize(cirr_per_query(annotations, predictions, subset_predictions))


def cirr_per_query(annotations: str | Path, predictions: dict, subset_predictions: Optional[dict] = None
                   ) -> PerQuery:
    annotations = Path(annotations)
    queries = _queries_with_ground_truth(annotations, "CIRR", "target_hard")
    gallery = _cirr_gallery_size(annotations)
    length = min(TOP, gallery - 1) if gallery else TOP  # the reference is removed from the gallery ranking
    out = {f"recall@{k}": {"": v} for k, v in _cirr_recall(queries, predictions, length).items()}
    if subset_predictions is not None:
        out.update({f"recall_subset@{k}": {"": v}
                    for k, v in _cirr_subset_recall(queries, subset_predictions).items()})
        # The field's headline number for CIRR (Baldrati et al.): the mean of R@5 and R_subset@1.
        out["avg"] = {"": [(a + b) / 2 for a, b in zip(out["recall@5"][""], out["recall_subset@1"][""])]}
    return out


def _check_header(predictions: Any, metric: str) -> dict:
    if not isinstance(predictions, dict):
        raise PredictionError("CIRR predictions must be a JSON object")
    if predictions.get("version") != "rc2":
        raise PredictionError(f'CIRR predictions need "version": "rc2", got {predictions.get("version")!r}')
    if predictions.get("metric") != metric:
        raise PredictionError(f'expected "metric": "{metric}", got {predictions.get("metric")!r}')
    return {k: v for k, v in predictions.items() if k not in ("version", "metric")}


def _cirr_recall(queries: list, predictions: dict, length: int) -> dict[int, list[float]]:
    ranked_by_id = _check_header(predictions, "recall")
    _check_keys("CIRR recall predictions", set(ranked_by_id), {str(q["pairid"]) for q in queries})
    ranked, targets = [], []
    for q in queries:
        name = f"pairid {q['pairid']}"
        r = _check_list(name, ranked_by_id[str(q["pairid"])], length, item_type=str)
        if q["reference"] in r:
            raise PredictionError(f"{name}: the reference {q['reference']} must be removed from the ranking")
        ranked.append(r)
        targets.append(q["target_hard"])
    return recall_hits(ranked, targets, CIRR_KS)


def _cirr_subset_recall(queries: list, predictions: dict) -> dict[int, list[float]]:
    ranked_by_id = _check_header(predictions, "recall_subset")
    _check_keys("CIRR recall_subset predictions", set(ranked_by_id), {str(q["pairid"]) for q in queries})
    ranked, targets = [], []
    for q in queries:
        name = f"pairid {q['pairid']} (subset)"
        members = [m for m in q["img_set"]["members"] if m != q["reference"]]
        r = _check_list(name, ranked_by_id[str(q["pairid"])], min(3, len(members)), item_type=str)
        outside = [c for c in r if c not in members]
        if outside:
            raise PredictionError(f"{name}: {outside[0]} is not a member of the image set (reference excluded)")
        ranked.append(r)
        targets.append(q["target_hard"])
    return recall_hits(ranked, targets, CIRR_SUBSET_KS)


# ------------------------------------------------------------------------------------------ CIRCO

def _circo_gallery_size(annotations: Path) -> Optional[int]:
    info = annotations.parent.parent / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    if info.is_file():
        return len(load_json(info, "CIRCO image info")["images"])
    return None


def score_circo(annotations: str | Path, predictions: Any) -> dict:
    return summarize(circo_per_query(annotations, predictions))


def circo_per_query(annotations: str | Path, predictions: Any) -> PerQuery:
    annotations = Path(annotations)
    queries = _queries_with_ground_truth(annotations, "CIRCO", "gt_img_ids")
    if not isinstance(predictions, dict):
        raise PredictionError("CIRCO predictions must be a JSON object {query id: [image ids]}")
    _check_keys("CIRCO predictions", set(predictions), {str(q["id"]) for q in queries})
    gallery = _circo_gallery_size(annotations)
    length = min(TOP, gallery) if gallery else TOP
    ranked = [_check_list(f"query {q['id']}", predictions[str(q["id"])], length, item_type=int) for q in queries]
    gts = [[int(g) for g in q["gt_img_ids"]] for q in queries]
    return {f"map@{k}": {"": v} for k, v in average_precisions(ranked, gts, CIRCO_KS).items()}


# ------------------------------------------------------------------------------------------ FashionIQ

def _fashioniq_gallery_size(caption_file: Path, category: str, split: str) -> Optional[int]:
    split_file = caption_file.parent.parent / "image_splits" / f"split.{category}.{split}.json"
    return len(load_json(split_file, "FashionIQ image split")) if split_file.is_file() else None


def score_fashioniq(annotations: str | Path, predictions: Any, categories: Optional[list[str]] = None,
                    split: str = "val") -> dict:
    return summarize(fashioniq_per_query(annotations, predictions, categories, split))


def fashioniq_per_query(annotations: str | Path, predictions: Any, categories: Optional[list[str]] = None,
                        split: str = "val") -> PerQuery:
    files = fashioniq_files(annotations, split)
    categories = categories or sorted(files)
    unknown = [c for c in categories if c not in files]
    if unknown:
        raise PredictionError(f"no annotations for FashionIQ categories {unknown} (have {sorted(files)})")
    if not isinstance(predictions, dict):
        raise PredictionError('FashionIQ predictions must be {"dress": {"<index>": [names]}, ...}')
    missing = [c for c in categories if c not in predictions]
    if missing:
        raise PredictionError(f"FashionIQ predictions lack categories {missing}")
    out: PerQuery = {}
    for cat in categories:
        queries = load_json(files[cat], f"FashionIQ {cat} annotations")
        by_index = predictions[cat]
        if not isinstance(by_index, dict):
            raise PredictionError(f"{cat}: expected {{index: [names]}}")
        _check_keys(f"FashionIQ {cat} predictions", set(by_index), {str(i) for i in range(len(queries))})
        gallery = _fashioniq_gallery_size(files[cat], cat, split)
        length = min(TOP, gallery) if gallery else TOP
        ranked = [_check_list(f"{cat} query {i}", by_index[str(i)], length, item_type=str)
                  for i in range(len(queries))]
        recalls = recall_hits(ranked, [q["target"] for q in queries], FASHIONIQ_KS)  # reference not excluded
        for k, v in recalls.items():
            out[f"{cat}/recall@{k}"] = {cat: v}
    # the averages over categories: the mean of the categories' means (each category its own group)
    for k in FASHIONIQ_KS:
        out[f"avg/recall@{k}"] = {c: out[f"{c}/recall@{k}"][c] for c in categories}
    out["avg"] = {c: [(a + b) / 2 for a, b in zip(out[f"{c}/recall@10"][c], out[f"{c}/recall@50"][c])]
                  for c in categories}
    return out


# ------------------------------------------------------------------------------------------ Shoes, Fashion200k

RECALL_KS = (1, 10, 50)


def _ranked_without_reference(name: str, ranked: Any, reference: str, length: int) -> list:
    r = _check_list(name, ranked, length, item_type=str)
    if reference in r:
        raise PredictionError(f"{name}: the reference {reference} must be excluded from the ranking")
    return r


def _check_indexed(benchmark: str, predictions: Any, n_queries: int) -> None:
    """Predictions keyed by the query's index in the annotation order: every index once, nothing else."""
    if not isinstance(predictions, dict):
        raise PredictionError(f'{benchmark} predictions must be {{"<query index>": [image names]}}')
    _check_keys(f"{benchmark} predictions", set(predictions), {str(i) for i in range(n_queries)})


def score_shoes(root: str | Path, predictions: Any, split: str = "eval") -> dict:
    """Shoes: Recall@1/10/50 of the target, the reference excluded from the gallery ranking, and their mean
    (`avg`, the mean of Recall@K that CTI-IR reports)."""
    return summarize(shoes_per_query(root, predictions, split))


def shoes_per_query(root: str | Path, predictions: Any, split: str = "eval") -> PerQuery:
    queries, gallery = shoes_queries(root, split)
    _check_indexed("Shoes", predictions, len(queries))
    length = min(TOP, len(gallery) - 1)
    ranked = [_ranked_without_reference(f"query {i}", predictions[str(i)], q["ReferenceImageName"], length)
              for i, q in enumerate(queries)]
    out = {f"recall@{k}": {"": v} for k, v in recall_hits(ranked, [q["ImageName"] for q in queries],
                                                          RECALL_KS).items()}
    # CTI-IR's headline for Shoes: the mean of Recall@1, @10 and @50
    out["avg"] = {"": [sum(vals) / len(RECALL_KS) for vals in zip(*(out[f"recall@{k}"][""] for k in RECALL_KS))]}
    return out


def score_fashion200k(root: str | Path, predictions: Any) -> dict:
    """Fashion200k: a hit is any retrieved image whose caption equals the target's; reference excluded."""
    return summarize(fashion200k_per_query(root, predictions))


def fashion200k_per_query(root: str | Path, predictions: Any) -> PerQuery:
    queries, captions = fashion200k_queries(root)
    _check_indexed("Fashion200k", predictions, len(queries))
    length = min(TOP, len(captions) - 1)
    ranked, hits = [], []
    for i, (source, target) in enumerate(queries):
        r = _ranked_without_reference(f"query {i}", predictions[str(i)], source, length)
        outside = [c for c in r if c not in captions]
        if outside:
            raise PredictionError(f"query {i}: {outside[0]} is not a test image")
        ranked.append(r)
        hits.append(_CaptionIs(captions, captions[target]))
    return {f"recall@{k}": {"": v} for k, v in recall_hits_any(ranked, hits, RECALL_KS).items()}


class _CaptionIs:
    def __init__(self, captions: dict[str, str], caption: str):
        self.captions, self.caption = captions, caption

    def __call__(self, image: str) -> bool:
        return self.captions[image] == self.caption
