"""How far can any stage I mapping go on a toy benchmark? Queries written with the reference's true caption.

    python experiments/text_ceiling.py --sweep runs/adaptation_sweep [--variants pretrained-0,...]

Stage I composes q = E_T("a photo of $ that {mod}") with the text tower frozen, so the best a mapping can do is
to put into $ what the reference's own words would: its exact caption. This script scores, with each variant's
stage I export (its CLIP and its mapping) on the sweep world's toy CIRR (R@1, reference excluded) and toy CIRCO
(mAP@5) val splits, from the toy scenes (the world's ground truth; toy-only by nature):

- `image_only`, `sum` and `stage1`: the queries `eval run` scores (the same numbers, as a check);
- `refcap_that_mod`: E_T("a photo of {caption(reference)} that {mod}"), the stage I query with a perfect mapping;
- `refcap`: E_T("a photo of {caption(reference)}"), the same without the modification;
- `refcap_sum`: normalize(E_T(caption(reference)) + E_T(mod)), `sum` with the reference's words for its image;
- `tgtcap`: E_T(caption(target)), the text tower told the answer (CIRR: the target; CIRCO: the first target).

95% intervals over queries (eval.stats). Writes ceiling.json and ceiling.md under --sweep. Trains nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cir import benchmarks  # noqa: E402
from cir.model import load_cir_model  # noqa: E402
from eval import stats  # noqa: E402
from eval.metrics import average_precisions  # noqa: E402
from toyworld.scene import Scene, caption  # noqa: E402

QUERIES = ("image_only", "sum", "stage1", "refcap", "refcap_that_mod", "refcap_sum", "tgtcap")


def per_query(scores: torch.Tensor, bench: benchmarks.Benchmark, names: list[str], layout: str) -> list[float]:
    """scores [Q, G] -> per-query CIRR hit@1 (reference excluded) or CIRCO AP@5 (reference kept), x 100."""
    queries = bench.queries[""]
    row = {n: i for i, n in enumerate(names)}
    if layout == "cirr":
        scores = scores.clone()
        scores[torch.arange(len(queries)), torch.tensor([row[q.reference] for q in queries])] = float("-inf")
        top = scores.argmax(dim=1).tolist()
        return [100.0 * (names[t] == q.targets[0]) for t, q in zip(top, queries)]
    ranked = [[names[i] for i in r] for r in scores.topk(5, dim=1).indices.tolist()]
    return average_precisions(ranked, [q.targets for q in queries], [5])[5]


@torch.no_grad()
def ceiling(export: Path, root: Path, layout: str) -> dict[str, list[float]]:
    """{query kind: [metric, lo, hi]} for one stage I export on one toy benchmark's val split."""
    model = load_cir_model(export)
    bench = benchmarks.load(layout, root, "val")
    scenes = json.loads((root / "toy_scenes.json").read_text())
    words = {name: caption(Scene.from_json(s)) for name, s in scenes.items()}
    queries = bench.queries[""]
    names = sorted(bench.gallery)
    gallery = model.encode_image([bench.gallery[n] for n in names])  # [G, d]
    row = {n: i for i, n in enumerate(names)}
    v_ref = gallery[[row[q.reference] for q in queries]]  # [Q, d]: the references are gallery images
    mod = [q.texts[0] for q in queries]
    t_mod = model.encode_text(mod)
    ref_words = [words[q.reference] for q in queries]
    features = {
        "image_only": v_ref,
        "sum": F.normalize(v_ref + t_mod, dim=-1),
        "stage1": model.encode_query([bench.gallery[q.reference] for q in queries], mod),
        "refcap": model.encode_text([f"a photo of {w}" for w in ref_words]),
        "refcap_that_mod": model.encode_text([f"a photo of {w} that {m}" for w, m in zip(ref_words, mod)]),
        "refcap_sum": F.normalize(model.encode_text(ref_words) + t_mod, dim=-1),
        "tgtcap": model.encode_text([words[q.targets[0]] for q in queries]),
    }
    out = {}
    for kind in QUERIES:
        values = {"": per_query(features[kind].float() @ gallery.float().T, bench, names, layout)}
        out[kind] = [round(stats.metric_of(values), 2), *(round(x, 2) for x in stats.bootstrap_ci(values))]
    return out


def table(results: dict) -> str:
    cols = [(b, k) for b in ("cirr", "circo") for k in QUERIES]
    lines = ["| variant | " + " | ".join(f"{'CIRR R@1' if b == 'cirr' else 'CIRCO mAP@5'} {k}" for b, k in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{stats.shown(v)} [{stats.shown(lo, digits=0)}, {stats.shown(hi, digits=0)}]"
                 for v, lo, hi in (row[b][k] for b, k in cols)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="runs/adaptation_sweep", help="an adaptation_sweep.py --out folder")
    p.add_argument("--variants", default="", help="comma-separated variants (default: every one with a stage I)")
    args = p.parse_args(argv)
    sweep = (ROOT / args.sweep).resolve()
    names = [n for n in args.variants.split(",") if n] or sorted(
        d.name for d in sweep.iterdir() if (d / "stage1" / "final" / "mapping.safetensors").is_file())
    results = {name: {layout: ceiling(sweep / name / "stage1" / "final", sweep / "world" / "bench" / layout, layout)
                      for layout in ("cirr", "circo")} for name in names}
    (sweep / "ceiling.json").write_text(json.dumps(results, indent=1) + "\n")
    (sweep / "ceiling.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
