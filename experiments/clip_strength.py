"""Do the papers' gains grow or vanish as the CLIP gets stronger? The main claims judged at three CLIP strengths.

    python experiments/clip_strength.py --out runs/clip_strength [--full runs/claims]

Each strength is one `python -m eval claims --config experiments/claims.yaml only=[MAIN]` run whose stage 0
starts elsewhere (`stage0_overrides`); everything after stage 0 is the claims config as it is:
- `scratch`: stage 0 trains the toy CLIP from random weights on the world's captions (600 steps at 1e-3: the
  flow before the pretrained CLIP);
- `pretrained-1k`: stage 0 adapts a CLIP pretrained like the shipped one for 1,000 steps instead of 5,000
  (`python -m toyworld pretrain max_steps=1000 --work runs/pretrain_1k --out runs/clips/toy-clip-64-1k`, ~12
  minutes; not shipped);
- `pretrained`: the claims config's own stage 0 (the shipped toy-clip-64, adapted); `--full` names a finished
  claims run of that config to read (its steps are reused, nothing retrains).
The strength of the CLIPs the methods ran on (the seeds' stage 0 CLIPs, averaged) is their held-out caption ->
image R@1 among 1,000 scenes (`python -m toyworld strength`) twice: in the open domain (every world's words and
more; the plot's x axis) and in the claims world's own vocabulary (a CLIP trained on that world's captions alone
ranks highest there without being the stronger start). Writes strength.json, strength.md (one line per
comparison: its gain, interval and verdict at each strength) and strength.png (each claim's gains against the
open-domain R@1) under --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = "experiments/claims.yaml"
MAIN = ["TSCIR-1", "TSCIR-2", "TSCIR-4b", "TSCIR-4c", "MUR-1", "CTI-IR-1"]
PARTIAL = "runs/clips/toy-clip-64-1k"
REPORT = "main_claims"  # the claims runs' report name (claims.json stays the full run's)
# name -> stage 0 overrides of the claims run (None: the claims config's own, read from --full)
STRENGTHS = {
    "scratch": ["init_from=null", "clip.model=toy-clip-64", "max_steps=600", "optim.lr=1.0e-3"],
    "pretrained-1k": [f"init_from={PARTIAL}"],
    "pretrained": None,
}


def claims_run(out: Path, stage0_overrides: Optional[list[str]]) -> dict:
    """Runs (or reuses) the main claims with this stage 0 and returns its claims.json."""
    cmd = [sys.executable, "-m", "eval", "claims", "--config", CONFIG, f"only=[{','.join(MAIN)}]",
           f"output_dir={out}", f"report={REPORT}"]  # beside the full report of --full, not over it
    if stage0_overrides:
        cmd.append(f"stage0_overrides=[{','.join(stage0_overrides)}]")
    print("[clip_strength]", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((out / f"{REPORT}.json").read_text())


def strength(out: Path, seeds: list[int]) -> dict[str, list[float]]:
    """Held-out caption -> image R@1 of each seed's stage 0 CLIP of a claims run: {"world": in the claims world's
    vocabulary, "open": in the open domain (every world's words and more)}."""
    from cir.backbone import create_backbone
    from toyworld.pretrain import STRENGTH_VOCABS, caption_retrieval

    world = json.loads((out / "world" / "world.json").read_text())["config"]["vocabulary"]
    r1: dict[str, list[float]] = {"world": [], "open": []}
    for s in sorted(set(seeds)):  # each CLIP loaded once, scored in the two vocabularies the table shows
        bb = create_backbone(str(out / "stage0" / f"seed{s}" / "final"))
        for key, vocab in (("world", world), ("open", "open")):
            r1[key].append(caption_retrieval(bb, STRENGTH_VOCABS[vocab])["r1"])
    return r1


def table(results: dict) -> str:
    """One line per claim comparison: gain [interval] verdict at each strength; one line per claim's verdict."""
    from eval.stats import shown

    names = list(results)
    head = "| claim | comparison | " + " | ".join(
        f"{n} (CLIP R@1 open {shown(results[n]['open_r1'])}, world {shown(results[n]['clip_r1'])})"
        for n in names) + " |"
    lines = [head, "|---" * (len(names) + 2) + "|"]
    first = results[names[0]]["claims"]
    for i, claim in enumerate(first):
        verdicts = [results[n]["claims"][i] for n in names]
        lines.append(f"| **{claim['id']}** | verdict | " + " | ".join(
            f"**{c['verdict']}** ({c['summary'].split(',')[0]})" for c in verdicts) + " |")
        for j, comp in enumerate(claim["comparisons"]):
            cells = []
            for c in verdicts:
                x = c["comparisons"][j]
                cells.append(f"{shown(x['difference'], signed=True)} [{shown(x['ci95'][0], signed=True)}, "
                             f"{shown(x['ci95'][1], signed=True)}] {x['verdict']}")
            lines.append(f"| {claim['id']} | {comp['better']} vs {comp['other']}, {comp['benchmark']} "
                         f"{comp['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """One panel per claim: each comparison's gain (with its 95% interval) against the CLIP's open-domain R@1
    (the world's own captions rank a CLIP trained on them alone highest: not the strength a pretrained CLIP
    brings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    xs = [results[n]["open_r1"] for n in names]
    claims = results[names[0]]["claims"]
    cols = 3
    rows = (len(claims) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (i, claim) in zip(axes.flat, enumerate(claims)):
        for j, comp in enumerate(claim["comparisons"]):
            ys = [results[n]["claims"][i]["comparisons"][j] for n in names]
            mid = [y["difference"] for y in ys]
            err = [[m - y["ci95"][0] for m, y in zip(mid, ys)], [y["ci95"][1] - m for m, y in zip(mid, ys)]]
            ax.errorbar([x + 0.25 * j for x in xs], mid, yerr=err, marker="o", capsize=3,
                        label=f"vs {comp['other']}, {comp['benchmark']} {comp['metric']}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(claim["id"], fontsize=10)
        ax.set_xlabel("CLIP caption->image R@1, open domain (held out)", fontsize=8)
        ax.set_ylabel("gain (points)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(claims):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/clip_strength")
    p.add_argument("--full", default="runs/claims", help="the claims run of the config's own stage 0")
    args = p.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (ROOT / PARTIAL / "open_clip_model.safetensors").is_file():
        p.error(f"{PARTIAL} is missing: python -m toyworld pretrain max_steps=1000 --work runs/pretrain_1k "
                f"--out {PARTIAL}")
    results = {}
    for name, overrides in STRENGTHS.items():
        run = (ROOT / args.full).resolve() if overrides is None else out / name
        report = claims_run(run, overrides)
        r1 = strength(run, report["seeds"])
        results[name] = {"clip_r1": round(sum(r1["world"]) / len(r1["world"]), 2),
                         "open_r1": round(sum(r1["open"]) / len(r1["open"]), 2), "r1_per_clip": r1, "run": str(run),
                         "claims": report["claims"]}
    (out / "strength.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "strength.md").write_text(table(results) + "\n")
    plot(results, out / "strength.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
