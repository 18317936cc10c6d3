"""Does the caption job find benchmark images planted among its inputs, and what else does it drop?

    python experiments/near_duplicates.py --world runs/demo/toy --out runs/near_duplicates [--planted 300]
        [--split test1|dev] [caption flags: --near-dup-tolerance 80 ...]

Copies of --planted images of the world's toy CIRR --split (test1; dev to choose thresholds on), a third each
resized to 90%, re-encoded as JPEG quality 75, cropped by 5% of the side (2.5% off each edge), are put among the
world's training images (the demo's world has 2,000), and `beam_runner.py caption --exclude {cirr/SPLIT}` runs
on them with its defaults (or the caption flags given after the experiment's own).
From failed.parquet and the world's scenes (toy ground truth) it counts:

- recall: planted copies dropped as `excluded` (by kind of copy);
- false exclusions: training images dropped as `excluded` whose scene differs from the matched file's;
- near-duplicate drops among the training images: of the same scene as the kept image (the world renders a
  scene again with its objects moved by up to 1.5 px: the same picture) or of another scene (a false drop).

Writes near_duplicates.json and .md under --out. Measures; trains nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import caption  # noqa: E402

KINDS = ("resize90", "jpeg75", "crop5")


def copy_of(img: Image.Image, kind: str) -> Image.Image:
    w, h = img.size
    if kind == "resize90":
        return img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC)
    if kind == "jpeg75":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    dx, dy = round(w * 0.025), round(h * 0.025)
    return img.crop((dx, dy, w - dx, h - dy))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="a toy world folder (images/, bench/cirr/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--planted", type=int, default=300)
    ap.add_argument("--split", default="test1", choices=("test1", "dev"), help="the CIRR split copied and excluded")
    args, caption_flags = ap.parse_known_args(argv)
    world, out = Path(args.world), Path(args.out)
    bench = world / "bench" / "cirr"
    scenes = json.loads((bench / "toy_scenes.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    inputs = out / "inputs"
    inputs.mkdir(parents=True)
    truth = {}  # file name -> scene key
    for img in sorted(p for p in (world / "images").iterdir() if p.suffix in (".jpg", ".png")):
        shutil.copy(img, inputs / img.name)
        shutil.copy(img.with_suffix(".txt"), inputs / f"{img.stem}.txt")
        truth[img.name] = json.loads(img.with_suffix(".json").read_text())["key"]  # toyworld's Scene.key
    test = sorted(p for p in (bench / args.split).iterdir() if p.suffix in (".jpg", ".png"))
    step = max(1, len(test) // args.planted)
    planted = {}  # planted file name -> (kind, source file)
    for i, src in enumerate(test[::step][:args.planted]):
        kind = KINDS[i % len(KINDS)]
        name = f"planted_{i:04d}_{kind}.jpg"
        copy_of(Image.open(src).convert("RGB"), kind).save(inputs / name, quality=95)
        (inputs / f"planted_{i:04d}_{kind}.txt").write_text("a planted copy\n")
        planted[name] = (kind, str(src))
    stats = caption.run(["--input", str(inputs), "--output", str(out / "captions"), "--exclude",
                         str(bench / args.split), *caption_flags], save_main_session=False)
    failed = pq.read_table(out / "captions" / "failed.parquet").to_pylist()
    index = pq.read_table(out / "captions" / "index.parquet").to_pylist()
    source_of_key = {row["key"]: Path(row["source"]).name for row in index}
    found = {k: 0 for k in KINDS}
    excluded_train = {"same_scene": 0, "other_scene": 0}
    near = {"same_scene": 0, "other_scene": 0, "planted": 0}
    for row in failed:
        name = Path(row["source"]).name
        if row["reason"] == "excluded":
            if name in planted:
                found[planted[name][0]] += 1
            else:
                matched = Path(row["error"].rsplit(" ", 1)[-1]).stem
                same = scenes[matched]["key"] == truth[name]
                excluded_train["same_scene" if same else "other_scene"] += 1
        elif row["reason"] == "near_duplicate":
            kept = source_of_key.get(row["error"].rsplit(" ", 1)[-1])
            if name in planted or kept in planted:
                near["planted"] += 1
            elif kept is not None:
                near["same_scene" if truth[kept] == truth[name] else "other_scene"] += 1
    per_kind = len(planted) // len(KINDS)
    result = {"split": args.split, "caption_flags": caption_flags,
              "training_images": len(truth), "planted": len(planted), "excluded_folder_images": len(test),
              "recall": {k: round(found[k] / per_kind, 4) for k in KINDS},
              "recall_all": round(sum(found.values()) / len(planted), 4),
              "excluded_training": excluded_train,
              "false_exclusion_rate": round(excluded_train["other_scene"] / len(truth), 4),
              "near_duplicate_drops": near,
              "false_near_duplicate_rate": round(near["other_scene"] / len(truth), 4),
              "stats": {k: stats[k] for k in ("written", "failed", "failed_by_reason", "seconds")}}
    (out / "near_duplicates.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Planted benchmark copies among {len(truth)} toy training images", "",
          f"{len(planted)} copies of toy CIRR {args.split} images ({per_kind} per kind), `caption --exclude` its "
          f"{len(test)} images, {' '.join(caption_flags) or 'defaults'}.", "",
          "| | resized 90% | JPEG q75 | cropped 5% | all |", "|---|---|---|---|---|",
          "| recall | " + " | ".join(f"{result['recall'][k]:.3f}" for k in KINDS) + f" | {result['recall_all']:.3f} |",
          "", f"Training images excluded: {excluded_train['same_scene']} of the matched file's scene, "
          f"{excluded_train['other_scene']} of another scene (false: {result['false_exclusion_rate']:.2%}).",
          f"Near-duplicate drops among training images: {near['same_scene']} of the kept image's scene, "
          f"{near['other_scene']} of another (false: {result['false_near_duplicate_rate']:.2%}); "
          f"{near['planted']} involving a planted copy.", f"Job: {result['stats']}"]
    (out / "near_duplicates.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
