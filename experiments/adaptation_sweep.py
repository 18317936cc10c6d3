"""How stage 0 should adapt the pretrained toy CLIP to a world: a sweep on a tuning world's val split.

    python experiments/adaptation_sweep.py --out runs/adaptation_sweep [--world-seed 1] [--only a,b] [key=value ...]

For each stage 0 variant (VARIANTS: from scratch as before, the pretrained CLIP as it is, and short adaptations
of it), trains stage 0 and then stage I with train/configs/toy_stage1.yaml on the world's captions, and scores
image-only, text-only, sum and stage I on toy CIRR (avg, R@1) and toy CIRCO (mAP@5) val, 1,000 queries each, with
95% bootstrap intervals over queries, and the CLIP's held-out caption -> image R@1 in the world's vocabulary
(`python -m toyworld strength`). The world has its own seed (1), not the demo's or the claims' (0): what is chosen
here is then reported on other images. Writes sweep.json and sweep.md under --out; finished steps are reused.
Trailing key=value overrides go to every stage 0 and stage I run (e.g. max_steps=3 for a wiring check).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRETRAINED = "toyworld/pretrained/toy-clip-64"
# name -> (stage 0 overrides of train/configs/toy_stage0.yaml, or None: no stage 0, the pretrained CLIP as it is;
# stage I overrides of train/configs/toy_stage1.yaml)
SCRATCH = ["init_from=null", "clip.model=toy-clip-64", "max_steps=600", "optim.lr=1.0e-3"]
ADAPT = [f"init_from={PRETRAINED}", "max_steps=200", "optim.lr=1.0e-4"]
PIC2WORD = ["mapping.num_tokens=1", "mapping.use_patches=false", "sta_weight=0"]
VARIANTS = {
    "scratch-600": (SCRATCH, []),
    "pretrained-0": (None, []),
    "pretrained-200-lr1e-4": (ADAPT, []),
    "pretrained-200-lr3e-4": ([f"init_from={PRETRAINED}", "max_steps=200", "optim.lr=3.0e-4"], []),
    "pretrained-600-lr1e-4": ([f"init_from={PRETRAINED}", "max_steps=600", "optim.lr=1.0e-4"], []),
    "pretrained-100-lr3e-5": ([f"init_from={PRETRAINED}", "max_steps=100", "optim.lr=3.0e-5"], []),
    # stage I's settings on the pretrained CLIP
    "pretrained-0-pic2word": (None, PIC2WORD),
    "pretrained-0-k1": (None, ["mapping.num_tokens=1"]),
    "pretrained-0-stage1-900": (None, ["max_steps=900"]),
    "pretrained-0-seed1": (None, ["seed=1"]),  # how far stage I's own seed moves it
    "pretrained-0-seed2": (None, ["seed=2"]),
    "pretrained-200-lr1e-4-seed1": (ADAPT, ["seed=1"]),
    "pretrained-200-lr1e-4-seed2": (ADAPT, ["seed=2"]),
    "pretrained-200-lr1e-4-stage1-900": (ADAPT, ["max_steps=900"]),
    "pretrained-200-lr1e-4-stage1-900-seed1": (ADAPT, ["max_steps=900", "seed=1"]),
    "pretrained-200-lr1e-4-pic2word": (ADAPT, PIC2WORD),
    "scratch-600-pic2word": (SCRATCH, PIC2WORD),
    # pseudo tokens at the word embeddings' norm (cir/mapping.py, token_norm)
    "pretrained-0-words": (None, ["mapping.token_norm=words"]),
    "pretrained-0-words-seed1": (None, ["mapping.token_norm=words", "seed=1"]),
    "pretrained-0-words-seed2": (None, ["mapping.token_norm=words", "seed=2"]),
    "pretrained-200-lr1e-4-words": (ADAPT, ["mapping.token_norm=words"]),
    "pretrained-200-lr1e-4-words-seed1": (ADAPT, ["mapping.token_norm=words", "seed=1"]),
    "pretrained-200-lr1e-4-words-seed2": (ADAPT, ["mapping.token_norm=words", "seed=2"]),
}
BENCHES = {"toy-cirr": ("cirr", ["avg", "recall@1"]), "toy-circo": ("circo", ["map@5"])}
METHODS = {"image_only": "image_only", "text_only": "text_only", "sum": "sum", "stage1": "model"}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/adaptation_sweep")
    p.add_argument("--world-seed", type=int, default=1)
    p.add_argument("--world-images", type=int, default=2000)
    p.add_argument("--bench-queries", type=int, default=1000)
    p.add_argument("--vocabulary", default="shapes")
    p.add_argument("--heldout", type=int, default=1000, help="held-out scenes of the CLIP R@1 column")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import beam_runner
    from eval.run import run as eval_run
    from cir.backbone import create_backbone
    from toyworld.pretrain import STRENGTH_VOCABS, caption_retrieval
    from train.stage0 import main as stage0
    from train.stage1 import main as stage1

    out = (ROOT / args.out).resolve()
    world, captions = out / "world", out / "captions"
    if not (world / "world.json").is_file():
        assert beam_runner.main(["toy", "--output", str(world), "--num-images", str(args.world_images),
                                 "--bench-queries", str(args.bench_queries), "--seed", str(args.world_seed),
                                 "--vocabulary", args.vocabulary, "--benchmarks", "cirr,circo", "--overwrite"]) == 0
    if not (captions / "stats.json").is_file():
        assert beam_runner.main(["caption", "--input", str(world / "images"), "--output", str(captions),
                                 "--shard-size", "500", "--no-near-duplicates", "--runner", "DirectRunner"]) == 0
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    results = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    for name in names:
        folder = out / name
        stage0_overrides, stage1_overrides = VARIANTS[name]
        # variants with the same stage 0 share its CLIP and baselines: those of the first such variant
        first = out / next(n for n, v in VARIANTS.items() if v[0] == stage0_overrides)
        clip = ROOT / PRETRAINED
        if stage0_overrides is not None:
            clip = first / "stage0" / "final"
            if not (clip / "open_clip_model.safetensors").is_file():
                assert stage0(["--config", "train/configs/toy_stage0.yaml", f"output_dir={clip.parent}",
                               f"data.train=['{captions}']", *stage0_overrides, *args.overrides]) == 0
        s1 = folder / "stage1" / "final"
        if not (s1 / "mapping.safetensors").is_file():
            assert stage1(["--config", "train/configs/toy_stage1.yaml", f"output_dir={folder / 'stage1'}",
                           f"data.train=['{captions}']", f"init_from={clip}", *stage1_overrides,
                           *args.overrides]) == 0
        row = {"clip_r1": caption_retrieval(create_backbone(str(clip)), STRENGTH_VOCABS[args.vocabulary],
                                            args.heldout)["r1"]}
        for bench, (layout, keys) in BENCHES.items():
            for method, flag in METHODS.items():
                target = (folder if flag == "model" else first) / "eval" / f"{bench}-{method}"
                if not (target / "metrics.json").is_file():
                    eval_run(layout, str(world / "bench" / layout), str(s1 if flag == "model" else clip), split="val",
                             method=flag, output=str(target), cache_dir=str(folder / "eval" / "cache"))
                m = json.loads((target / "metrics.json").read_text())
                row.update({f"{bench} {method} {k}": [m[k], *m["ci95"][k]] for k in keys})
        results[name] = row
        (out / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "sweep.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    """One line per variant: the CLIP's held-out R@1, then each benchmark metric per method, value [lo, hi]."""
    from eval.stats import shown

    cols = [(b, m, k) for b, (_, keys) in BENCHES.items() for k in keys for m in METHODS]
    head = "| variant | CLIP R@1 | " + " | ".join(f"{b} {k} {m}" for b, m, k in cols) + " |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    for name, row in results.items():
        cells = [f"{shown(v)} [{shown(lo, digits=0)}, {shown(hi, digits=0)}]"
                 for v, lo, hi in (row[f"{b} {m} {k}"] for b, m, k in cols)]
        lines.append(f"| {name} | {shown(row['clip_r1'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
