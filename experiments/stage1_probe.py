"""How much of its image does a stage I mapping keep, and does it read the patch tokens? Reads the stage I exports
of a claims run (eval.claims.export_dir), trains and evaluates nothing.

For every reference image of a CIRR-layout benchmark split, the plain pseudo-word prompt t_i = E_T("a photo of
$", $ := S(v_i, P_i)) is ranked against the split's gallery of image features v_j (the stage I contrastive
target), and reported:
- `self@1`: t_i ranks its own image first in the whole gallery (what the mapping keeps of the image);
- `set@1`: t_i ranks its own image first among its CIRR image set (the reference and its near-identical
  variants: the fine detail visual semantic injection is meant to carry);
- `cos`: mean cos(t_i, v_i);
- for mappings that read patches, the same with each image's patch tokens swapped for another image's of the
  same batch ("swapped"; a last batch of one keeps its own): what the cross-attention adds beyond v_i.

Per row: the mean over seeds and a 95% interval over seeds and references (eval.stats). Prints JSON and a markdown
table.

    python experiments/stage1_probe.py --config experiments/stage1_diagnosis.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cir import benchmarks  # noqa: E402
from cir.model import compose, load_cir_model  # noqa: E402
from eval import stats  # noqa: E402
from eval.claims import export_dir, load, row_seeds  # noqa: E402

METRICS = ("self@1", "set@1", "cos")


def references(root: Path, split: str) -> tuple[list[str], dict[str, Path], dict[str, list[str]]]:
    """The split's distinct reference images (sorted), its gallery and each reference's image set (itself
    included)."""
    bench = benchmarks.load("cirr", root, split)
    sets: dict[str, list[str]] = {}
    for q in bench.queries[""]:
        sets.setdefault(q.reference, sorted({q.reference, *q.subset}))
    return sorted(sets), bench.gallery, sets


@torch.no_grad()
def probe(export: Path, refs: list[str], gallery: dict[str, Path], sets: dict[str, list[str]],
          batch_size: int = 64) -> dict[str, dict[str, list[float]]]:
    """{variant: {metric: per-reference values}}; variant "" is the mapping as trained, "swapped" its patches
    rolled by one within each batch (only when the mapping reads patches)."""
    model = load_cir_model(export)
    names = sorted(gallery)
    row = {n: i for i, n in enumerate(names)}
    feats = model.encode_image([gallery[n] for n in names], batch_size)  # [G, d]
    prompts = model.tokenizer([model.prompt])
    variants = ["", "swapped"] if model.mapping.cfg.use_patches else [""]
    out: dict[str, dict[str, list[float]]] = {v: {m: [] for m in METRICS} for v in variants}
    for start in range(0, len(refs), batch_size):
        batch = refs[start:start + batch_size]
        v, patches = model.encode_references([gallery[n] for n in batch], batch_size)
        for variant in variants:
            p = patches.roll(1, dims=0) if variant == "swapped" else patches
            t, _ = compose(model.clip, model.mapping, model.placeholder, v, p,
                           prompts.expand(len(batch), -1).to(model.device))  # [B, d]
            scores = t.float() @ feats.T  # [B, G]
            for i, name in enumerate(batch):
                own = scores[i, row[name]]
                members = [row[m] for m in sets[name] if m in row]
                out[variant]["self@1"].append(100.0 * float(scores[i].max() <= own))
                out[variant]["set@1"].append(100.0 * float(scores[i, members].max() <= own))
                out[variant]["cos"].append(100.0 * float(own))
    return out


def summary(per_seed: list[list[float]]) -> dict:
    """Per-reference values of each seed -> their mean and a 95% interval over seeds and references."""
    return {"mean": round(stats.metric_of(stats.mean_over([{"": v} for v in per_seed])), 2),
            "ci95": list(stats.bootstrap_ci_over_seeds([{"": v} for v in per_seed]))}


def shown(value: dict) -> str:
    return f"{stats.shown(value['mean'])} [{stats.shown(value['ci95'][0])}, {stats.shown(value['ci95'][1])}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a claims config whose run has finished")
    parser.add_argument("--benchmark", default="toy-cirr", help="a CIRR-layout benchmark of the config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the overrides the run was made with")
    args = parser.parse_args(argv)
    cfg = load(args.config, args.overrides)
    spec = cfg.benchmarks[args.benchmark]
    if spec.benchmark != "cirr":
        raise SystemExit(f"--benchmark {args.benchmark}: a CIRR-layout benchmark is needed (image sets)")
    split = benchmarks.split_name("cirr", spec.split or cfg.split)
    root = Path(cfg.output_dir) / spec.world / "bench" / spec.name
    refs, gallery, sets = references(root, split)
    report: dict = {"benchmark": args.benchmark, "split": split, "references": len(refs), "gallery": len(gallery),
                    "rows": {}}
    for name, row in cfg.rows.items():
        if row.stage != "stage1":
            continue
        exports = [export_dir(cfg, name, s) for s in row_seeds(cfg, name)]
        if not all((e / "cir_config.json").is_file() for e in exports):
            print(f"row {name}: not trained for every seed (no claim of the config uses it); left out",
                  file=sys.stderr)
            continue
        runs = [probe(e, refs, gallery, sets) for e in exports]
        report["rows"][name] = {variant or "trained": {m: summary([r[variant][m] for r in runs]) for m in METRICS}
                                for variant in runs[0]}
    print(json.dumps(report, indent=1))
    print(f"\n{len(refs)} references of {args.benchmark} ({split}; gallery {len(gallery)}), mean over seeds "
          f"[95% interval over seeds and references]\n")
    print("| row | self@1 | set@1 | cos | self@1, patches swapped | set@1, patches swapped |")
    print("|---|---|---|---|---|---|")
    for name, variants in report["rows"].items():
        swapped = variants.get("swapped")
        cells = [shown(variants["trained"][m]) for m in METRICS]
        cells += [shown(swapped[m]) if swapped else "" for m in ("self@1", "set@1")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
