"""Did the leaked rows of experiments/claims_leak.yaml learn the leaked images? The mechanism behind LEAK-1.

    python experiments/leak_memorization.py --claims runs/claims [--rows stage1,stage1_leaked,stage1_screened]

Contamination can only inflate a benchmark's scores through what training learned of its images. For each row
and seed's stage I export (its CLIP), this scores caption -> image retrieval (R@1 among the images, 95% interval
over the queries) on two sets of 3,000 images, each with the caption it was trained with:
- `leaked`: toy CIRR test1's images, with the captions their leaked copies carried (data/leaked_inputs/);
- `training`: 3,000 of the world's training images, which every row saw, with their sidecar captions.
If a leaked row does not retrieve the leaked images better than a clean one, training did not learn them (the
toy captions are templates that many images share, so R@1 is low for every row; the rows are compared alike).
Writes leak_memorization.json and .md under --claims. Trains nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cir import benchmarks  # noqa: E402
from cir.model import load_cir_model  # noqa: E402
from eval import stats  # noqa: E402

IMAGES = 3000


def image_sets(claims: Path) -> dict[str, tuple[list[Path], list[str]]]:
    """name -> (image files, the caption each was trained with)."""
    bench = benchmarks.load("cirr", claims / "world" / "bench" / "cirr", "test")
    gallery = [path for _, path in sorted(bench.gallery.items())]  # the order eval.claims.leaked_inputs copies in
    leaked = claims / "data" / "leaked_inputs"
    texts = [(leaked / f"leak-toy-cirr-{i:05d}.txt").read_text(encoding="utf-8").strip()
             for i in range(len(gallery))]
    world = sorted((claims / "world" / "images").glob("*.txt"))[:IMAGES]
    train = [next(p for p in (t.with_suffix(".jpg"), t.with_suffix(".png")) if p.is_file()) for t in world]
    return {"leaked": (gallery[:IMAGES], texts[:IMAGES]),
            "training": (train, [t.read_text(encoding="utf-8").strip() for t in world])}


@torch.no_grad()
def recall_at_1(model, images: list[Path], texts: list[str]) -> list[float]:
    """Per caption: 100 if its own image ranks first among `images`, else 0."""
    scores = model.encode_text(texts) @ model.encode_image(images).T  # [N, N]
    return (100.0 * (scores.argmax(1) == torch.arange(len(texts)))).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--claims", default="runs/claims", help="the output_dir of experiments/claims_leak.yaml's run")
    ap.add_argument("--rows", default="stage1,stage1_leaked,stage1_screened")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    claims = Path(args.claims)
    sets = image_sets(claims)
    result = {}
    for row in args.rows.split(","):
        per_seed: dict[str, list] = {name: [] for name in sets}  # set -> per seed, per caption
        for s in map(int, args.seeds.split(",")):
            model = load_cir_model(str(claims / "cells" / f"{row}-seed{s}" / "train" / "final"))  # once per seed
            for name, (images, texts) in sets.items():
                per_seed[name].append(recall_at_1(model, images, texts))
        for name, runs in per_seed.items():
            mean = [sum(v) / len(v) for v in zip(*runs)]  # per caption, over seeds
            lo, hi = stats.bootstrap_ci({"": mean})
            result.setdefault(row, {})[name] = {"recall@1": round(sum(mean) / len(mean), 2),
                                                "ci95": [round(lo, 2), round(hi, 2)],
                                                "seeds": [round(sum(v) / len(v), 2) for v in runs]}
    (claims / "leak_memorization.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| row | leaked images, caption -> image R@1 | training images, caption -> image R@1 |",
             "|---|---|---|"]
    for row, r in result.items():
        lines.append(f"| {row} | " + " | ".join(f"{r[n]['recall@1']:.2f} [{r[n]['ci95'][0]:.2f}, "
                                                 f"{r[n]['ci95'][1]:.2f}]" for n in sets) + " |")
    (claims / "leak_memorization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
