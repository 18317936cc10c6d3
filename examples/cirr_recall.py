"""Recall@1 of a CIR model on a CIRR-layout benchmark, with nothing but `cir.load` and the benchmark's json
files: the number `python -m eval run --benchmark cirr` reports for the same export (docs/PYTHON.md).

    python examples/cirr_recall.py runs/demo/stage2_mix/final runs/demo/toy/bench/cirr
"""
import json
import sys
from pathlib import Path

import torch

import cir


def rank(export: str, root: str, split: str = "val", k: int = 50) -> dict[int, list[str]]:
    """pairid -> the k best gallery images for that query, the reference left out."""
    root = Path(root)
    images = json.loads((root / "image_splits" / f"split.rc2.{split}.json").read_text())  # name -> ./dev/x.png
    queries = json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())
    names = list(images)
    row = {name: i for i, name in enumerate(names)}
    model = cir.load(export)
    gallery = model.encode_image([root / images[n] for n in names])  # [N, d]
    ranked = {}
    for start in range(0, len(queries), 64):
        batch = queries[start:start + 64]
        q = model.encode_query([root / images[x["reference"]] for x in batch], [x["caption"] for x in batch])
        scores = q @ gallery.T  # [B, N]
        refs = torch.tensor([row[x["reference"]] for x in batch])
        scores[torch.arange(len(batch)), refs] = -float("inf")  # CIRR never counts the reference itself
        for x, best in zip(batch, scores.topk(min(k, len(names) - 1), dim=1).indices.tolist()):
            ranked[x["pairid"]] = [names[i] for i in best]
    return ranked


def recall_at_1(export: str, root: str, split: str = "val") -> float:
    root = Path(root)
    targets = {x["pairid"]: x["target_hard"]
               for x in json.loads((root / "captions" / f"cap.rc2.{split}.json").read_text())}
    ranked = rank(export, str(root), split, k=1)
    return 100 * sum(ranked[p][0] == t for p, t in targets.items()) / len(targets)


if __name__ == "__main__":
    print(f"recall@1 {recall_at_1(*sys.argv[1:]):.1f}")
