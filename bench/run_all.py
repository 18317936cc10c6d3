"""Every performance script of bench/ in one go, each figure printed as a ratio against its baseline.

    python bench/run_all.py              # full sizes (12-18 minutes on 2 cores; mining and top-k at 1M)
    python bench/run_all.py --quick      # smaller sizes (a few minutes): the same figures, less load
    python bench/run_all.py --only topk,mining

The training figures read the demo's caption dataset (`runs/demo/captions`, made by `make demo`); they are
left out with a note when it is missing. Each script runs in its own process, as it would by hand; their
JSON lines are collected into a table (figure | ratio | target | met) and `--json FILE` keeps them all.
A ratio is always "higher is better": times are turned around (baseline seconds / our seconds).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    name: str
    ratio: float
    target: float
    detail: str

    @property
    def met(self) -> bool:
        return self.ratio >= self.target


def _caption(lines: list[dict]) -> list[Figure]:
    out = [Figure(f"caption command ÷ plain loop, {job['images']:,} images of {job['sizes']} px: loop s ÷ job s",
                  job["ratio_job_over_loop"], job["target_ratio"],
                  f"{job['job_seconds']} vs {job['loop_seconds']} s, peak {job['job_peak_mib']} vs "
                  f"{job['loop_peak_mib']} MiB, {job['mean_kib']} KiB/image")
           for job in lines if "ratio_job_over_loop" in job]
    models = next((line for line in lines if "model_images_per_s_by_batch_size" in line), None)
    if models:
        out.append(Figure("tiny BLIP+CLIP images/s, largest batch ÷ batch 1", models["ratio_largest_over_batch_1"],
                          1.0, f"by batch size: {models['model_images_per_s_by_batch_size']}"))
    return out


def _mining(lines: list[dict]) -> list[Figure]:
    out = []
    for row in lines:
        # the budget: 1M pairs mined in <= 10 minutes; smaller sizes get the same rate budget
        budget = 600.0 * row["n"] / 1_000_000
        out.append(Figure(f"mining {row['n']:,} × 512: time budget ÷ seconds", round(budget / row["seconds"], 2),
                          1.0, f"{row['seconds']} s ({row['method']}), peak {row['peak_rss_gb_mining']} GB"))
        out.append(Figure(f"mining {row['n']:,}: recall@10 vs exact", row["recall_at_10"], 0.9, ""))
    return out


def _mining_sharded(lines: list[dict]) -> list[Figure]:
    # the join is built to spread over many workers: on one DirectRunner worker its time is per-element overhead,
    # reported, not held to the single-process budget
    return [Figure(f"sharded k-NN (Beam transforms) {row['n']:,}: recall@10 vs exact", row["recall_at_10"], 0.9,
                   f"{row['seconds']} s on the DirectRunner with one worker, peak {row['peak_rss_gb_mining']} GB")
            for row in lines]


def _train(lines: list[dict]) -> list[Figure]:
    names = ["stage 0 steps/s, streaming loader ÷ batches in memory",
             "loader samples/s ÷ open_clip's stage list",
             "stage I loader with cached emb.npy: images left encoded ÷ decoded (samples/s)",
             "stage I step, image tower ÷ cached emb.npy (toy CLIP)",
             "stage I step, image tower ÷ cached emb.npy (ViT-B/32, 224 px; for comparison)",
             "stage I run, frozen CLIP's outputs off ÷ kept (seconds; toy configs, the demo's data)",
             "stage II run, frozen CLIP's outputs off ÷ kept (seconds; toy configs, the demo's data)"]
    return [Figure(name, row.get("ratio", row.get("speedup")), row["target"],
                   ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("ratio", "speedup", "target")))
            for name, row in zip(names, lines)]


def _topk(lines: list[dict]) -> list[Figure]:
    s = lines[-1]
    rows = s["rows"]
    ours, torch_path = rows["ours"], rows.get("torch_chunked", {})
    return [Figure(f"top-{s['k']} of {s['queries']:,} × {s['gallery']:,} × {s['dim']}: faiss IndexFlatIP s ÷ "
                   f"eval top-k s", s["faiss_over_ours"], 1.0,
                   f"eval {ours['seconds']} s, +{ours['above_features_mib']} MiB above the features; torch "
                   f"chunked {torch_path.get('seconds')} s, +{torch_path.get('above_features_mib')} MiB; faiss "
                   f"{rows['faiss_flat']['seconds']} s; mm+topk {rows.get('mm_topk', {}).get('seconds')} s, "
                   f"+{rows.get('mm_topk', {}).get('above_features_mib')} MiB")]


@dataclass
class Script:
    key: str
    path: str
    full: list[str]
    quick: list[str]
    parse: Callable[[list[dict]], list[Figure]]
    needs: Optional[str] = None  # a path that must exist


SCRIPTS = [
    Script("caption", "bench/caption_throughput.py", [], ["--sets", "500x256-512,2000x64-96", "--batch-sizes", "1,16",
                                                          "--model-images", "64", "--repeats", "1"], _caption),
    Script("mining", "bench/mining_scale.py", ["--sizes", "10000,1000000"], ["--sizes", "10000,100000"], _mining),
    Script("mining-sharded", "bench/mining_scale.py", ["--sizes", "10000", "--knn", "sharded"],
           ["--sizes", "10000", "--knn", "sharded"], _mining_sharded),
    Script("train", "bench/train_throughput.py", [], ["--steps", "8", "--frozen-steps", "20", "--repeats", "1"],
           _train, "runs/demo/stage1/final"),  # the demo's captions, triplets and stage 0 / I exports
    Script("topk", "bench/topk_scale.py", [], ["--gallery", "200000"], _topk),
]


def run_script(script: Script, quick: bool) -> list[dict]:
    cmd = [sys.executable, script.path, *(script.quick if quick else script.full)]
    print(f"[bench] {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script.path} failed ({done.returncode}): {done.stderr[-1500:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def table(figures: list[Figure]) -> str:
    lines = ["| figure | ratio | target | met | detail |", "|---|---|---|---|---|"]
    lines += [f"| {f.name} | {f.ratio} | ≥ {f.target} | {'yes' if f.met else '**no**'} | {f.detail} |"
              for f in figures]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--only", help=f"comma-separated subset of {[s.key for s in SCRIPTS]}")
    p.add_argument("--json", help="also write every figure and raw line here")
    args = p.parse_args(argv)
    chosen = [s for s in SCRIPTS if not args.only or s.key in args.only.split(",")]
    figures, raw, failed = [], {}, []
    for script in chosen:
        if script.needs and not (ROOT / script.needs).exists():
            print(f"[bench] {script.key}: skipped, {script.needs} is missing (run `make demo` first)", file=sys.stderr)
            continue
        try:
            raw[script.key] = run_script(script, args.quick)
            new = script.parse(raw[script.key])
        except (RuntimeError, KeyError, IndexError, ValueError) as err:
            print(f"[bench] {script.key}: {err}", file=sys.stderr)
            failed.append(script.key)
            continue
        for f in new:  # as each script finishes: a long run shows its figures on the way
            print(f"[bench] {f.name}: {f.ratio} (target >= {f.target}){'' if f.met else '  NOT MET'}",
                  file=sys.stderr, flush=True)
        figures += new
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": [asdict(f) | {"met": f.met} for f in figures],
                                               "raw": raw, "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
