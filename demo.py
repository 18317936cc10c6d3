"""The toy-world demo: `make demo` (or `python demo.py`) runs the whole flow under runs/demo/.

Each step writes its output directory atomically and is skipped when that output is already there, so
re-running the demo reuses finished steps. Steps are added here as each stage of the flow lands.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent


TIMINGS: dict[str, float] = {}  # step name -> seconds, for runs/demo/timings.json


def step(name: str, done_marker: Path | None, cmd: list[str], in_process: Optional[Callable[[], object]] = None,
         ) -> None:
    """Run `cmd` unless `done_marker` exists (None: a cheap check that always runs). The command runs inside
    this process, its main called with its arguments (`in_process`, when given, does what `cmd` does another
    way); it is printed for the user to rerun by hand."""
    if done_marker is not None and done_marker.exists():
        print(f"[demo] {name}: done already ({done_marker})")
        return
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    if in_process is not None:
        in_process()
    else:
        code = main_of(cmd)(cmd[3:] if cmd[1] == "-m" else cmd[2:])
        if code:
            raise SystemExit(f"[demo] {name} failed (exit {code}): {' '.join(cmd)}")
    TIMINGS[name] = round(time.time() - start, 1)


def main_of(cmd: list[str]) -> Callable[[list[str]], int]:
    """The main function a demo command line runs: one process pays for importing torch, open_clip and Beam
    (about 5 s per command on 2 cores) once, not once per command."""
    import importlib

    module = cmd[2] + ".__main__" if cmd[1] == "-m" else cmd[1].removesuffix(".py").replace("/", ".")
    return importlib.import_module(module).main


def train_side_by_side(out: Path, trainings: list[tuple[str, Path, list[str]]], ablation_config: Path,
                       evals: list[dict]) -> None:
    """Stage II on each triplet set (name, done marker, train/stage2.py arguments), the ablation's cells, all
    from the stage I export, and the evaluations of results.json (`evaluations`; those of a stage II row after
    its training): one-thread worker processes, one per core (eval/cells.py). On two cores they do more work per
    second side by side than two-thread runs one after another (docs/PERFORMANCE.md); a step's numbers are those
    of one thread, whatever runs beside it (here the results came out the same as with two). Each step's output
    goes to its log."""
    from functools import partial

    from eval import ablate
    from eval.cells import Step, run_main, run_steps
    from eval.run import run

    todo = []
    for name, marker, argv in trainings:  # the longest first: two at a time, they finish closer together
        if marker.exists():
            print(f"[demo] {name}: done already ({marker})")
            continue
        print(f"[demo] {name}: {sys.executable} train/stage2.py {' '.join(argv)}", flush=True)
        log = out / f"{marker.parent.parent.name}.log"
        todo.append(Step(name, str(log), run_main, ("train.stage2", argv)))
    todo += ablate.steps(ablate.load(str(ablation_config)))
    for e in evals:  # last (a higher rank): one to three seconds each, they fill the end of the batch
        if not (e["target"] / "metrics.json").exists():
            print(f"[demo] {e['name']}: {' '.join(e['cmd'])}", flush=True)
            todo.append(Step(e["name"], str(e["target"]) + ".log", partial(run, **e["settings"]), e["args"],
                             after=(e["after"],) if e["after"] else (), rank=1))
    if not todo:
        return
    start = time.time()
    seconds = run_steps(todo, 0, 1, lambda line: print(f"[demo] {line}", flush=True))
    TIMINGS.update({name: s for name, s in seconds.items() if name.startswith(("stage II", "eval "))})  # worker s
    TIMINGS["stage II runs, the ablation's cells and the evaluations, side by side"] = round(time.time() - start, 1)


def write_timings(out: Path, started: float) -> None:
    """Seconds per step run this time (reused steps are not listed) and in all: the demo's time budget."""
    total = round(time.time() - started, 1)
    (out / "timings.json").write_text(json.dumps({"total_s": total, "steps_s": TIMINGS}, indent=1) + "\n")
    print(f"[demo] {len(TIMINGS)} step(s) run in {total / 60:.1f} min (per step: {out / 'timings.json'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="where everything goes")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a few training steps and a one-cell-per-source ablation: checks the wiring in minutes "
                        "(the numbers mean nothing)")
    args = p.parse_args(argv)
    started = time.time()
    out = (ROOT / args.out).resolve()
    quick = ["max_steps=3", "data.batch_size=16", "save_every=100", "log_every=1"] if args.quick else []
    toy = out / "toy"
    step("toy world", toy / "world.json",
         [sys.executable, "beam_runner.py", "toy", "--output", str(toy), "--num-images", str(args.num_images),
          # 1,000 queries per split: a 95% interval of about +-2 points at R@1 ~ 10, so differences can show
          "--bench-queries", "10" if args.quick else "1000",
          "--benchmarks", ",".join(BENCHMARKS.values()),  # the two it evaluates on (every one: drop this flag)
          "--seed", str(args.seed)])
    print(f"[demo] toy world: training images in {toy / 'images'}, benchmarks in {toy / 'bench'}")
    captions = out / "captions"
    step("caption job (sidecar captions)", captions / "stats.json",
         [sys.executable, "beam_runner.py", "caption", "--input", str(toy / "images"), "--output", str(captions),
          # every toy image, as the documented numbers had (docs/reports/NEAR_DUPLICATES.md)
          "--shard-size", "500", "--no-near-duplicates", "--runner", "DirectRunner"])
    step("inspect the caption dataset", None, [sys.executable, "beam_runner.py", "inspect", str(captions)])
    print(f"[demo] caption dataset: {captions}")
    # The DirectRunner's default in_memory mode: on these small jobs as fast as multi_threading or faster
    # (Python threads share the GIL), and without its intermittent shuffle failure (see docs/CAPTION.md).
    beam = ["--runner", "DirectRunner"]
    low, high = out / "triplets_low", out / "triplets_high"
    # No CLIP is trained yet at this point of the demo, so low-quality pairs are mined by captions alone.
    step("low-quality triplets (mined)", low / "stats.json",
         [sys.executable, "beam_runner.py", "synth", "--input", str(captions), "--output", str(low),
          "--quality", "low", "--image-weight", "0", "--seed", str(args.seed), *beam])
    step("high-quality triplets (toy editor)", high / "stats.json",
         [sys.executable, "beam_runner.py", "synth", "--input", str(captions), "--output", str(high),
          "--quality", "high", "--num-triplets", "1000", "--image-weight", "0", "--seed", str(args.seed), *beam])
    mix = out / "mix.yaml"
    mix.write_text(f"datasets:\n  - {{path: {low}, weight: 1.0}}\n  - {{path: {high}, weight: 1.0}}\n")
    print(f"[demo] triplets: {low} (LQ), {high} (HQ), mix manifest {mix}")
    stage0, stage1 = out / "stage0", out / "stage1"
    step("stage 0: adapt the pretrained toy CLIP to the world's captions",
         stage0 / "final" / "open_clip_model.safetensors",
         [sys.executable, "train/stage0.py", "--config", "train/configs/toy_stage0.yaml", f"output_dir={stage0}",
          f"data.train=['{captions}']", f"seed={args.seed}", *quick])
    step("stage I: image -> pseudo-word tokens", stage1 / "final" / "mapping.safetensors",
         [sys.executable, "train/stage1.py", "--config", "train/configs/toy_stage1.yaml", f"output_dir={stage1}",
          f"data.train=['{captions}']", f"init_from={stage0 / 'final'}", f"seed={args.seed}", *quick])
    print(f"[demo] trained: {stage0 / 'final'} (CLIP), {stage1 / 'final'} (stage I); TensorBoard: "
          f"tensorboard --logdir {out}")
    stage2 = {name: out / f"stage2_{name}" for name in ("low", "high", "mix")}
    banks = f"hard_negatives.cache_dir={out / 'negative_banks'}"  # the runs share their CLIP: one bank each dataset
    ablation = out / "ablation"
    config = out / "ablation.yaml"
    config.write_text(json.dumps({
        "output_dir": str(ablation), "stage1": str(stage1 / "final"), "stage2_config": "train/configs/toy_stage2.yaml",
        "sources": {"low": str(low), "high": str(high)}, "counts": [20] if args.quick else [300, 1000],
        "seeds": [0] if args.quick else [0, 1], "max_steps": 3 if args.quick else 60, "overrides": [banks, *quick],
        "gallery_cache": str(out / "eval" / "gallery_cache"),  # the galleries the evaluations below encode
        "benchmarks": {"toy-cirr": {"benchmark": "cirr", "data": str(toy / "bench" / "cirr"), "metric": "avg"},
                       "toy-circo": {"benchmark": "circo", "data": str(toy / "bench" / "circo"), "metric": "map@5"}}},
        indent=1))  # JSON is YAML
    runs = [(name, stage2[name], data) for name, data in (("low", [low]), ("mix", [mix]), ("high", [high]))]
    evals = evaluations(out, toy / "bench", stage1 / "final", {k: v / "final" for k, v in stage2.items()})
    train_side_by_side(out, [
        (f"stage II on {name} triplets", folder / "final" / "adapters.safetensors",
         ["--config", "train/configs/toy_stage2.yaml", f"output_dir={folder}", f"data.train={[str(d) for d in data]}",
          f"init_from={stage1 / 'final'}", f"seed={args.seed}", banks, *quick]) for name, folder, data in runs],
        config, evals)
    results = evaluate(out, evals)
    search_example(out, toy / "bench" / "cirr", stage2["mix"] / "final")
    print(f"[demo] results: {out / 'results.json'}, {out / 'report.md'}")
    print(report_table(results))
    # its cells were trained and evaluated beside stage II above: this writes its tables and plot
    step("ablation: LQ vs HQ x number of triplets x seeds", None,
         [sys.executable, "-m", "eval", "ablate", "--config", str(config)])
    print(f"[demo] ablation: {ablation / 'ablation.md'}, {ablation / 'ablation.png'}")
    write_timings(out, started)
    return 0


# method name in results.json -> `python -m eval run --method` and the checkpoint it reads
METHODS = {"image_only": ("image_only", "clip"), "text_only": ("text_only", "clip"), "sum": ("sum", "clip"),
           "stage1": ("model", "")}
BENCHMARKS = {"toy-cirr": "cirr", "toy-circo": "circo"}


def evaluations(out: Path, bench: Path, stage1: Path, stage2: dict[str, Path]) -> list[dict]:
    """The evaluations of results.json, per benchmark and method: its step name, output folder, the `eval run`
    command a user would type, `eval.run.run(*args, **settings)` that does the same with the demo's shared
    gallery cache (every method here uses stage 0's image tower: one encoding per gallery), and the stage II
    training it needs first (None: stage I's export, there before)."""
    runs = {m: (flag, stage1 / sub if sub else stage1, None) for m, (flag, sub) in METHODS.items()}
    runs.update({f"stage2_{name}": ("model", path, f"stage II on {name} triplets") for name, path in stage2.items()})
    cache = out / "eval" / "gallery_cache"
    evals = []
    for name, benchmark in BENCHMARKS.items():
        for method, (flag, checkpoint, after) in runs.items():
            target = out / "eval" / f"{name}-{method}"
            evals.append({
                "name": f"eval {method} on {name}", "bench": name, "method": method, "target": target,
                "after": after, "args": (benchmark, str(bench / benchmark), str(checkpoint)),
                "settings": {"method": flag, "output": str(target), "cache_dir": str(cache)},
                "cmd": [sys.executable, "-m", "eval", "run", "--benchmark", benchmark, "--data", str(bench / benchmark),
                        "--checkpoint", str(checkpoint), "--method", flag, "--output", str(target)]})
    return evals


def evaluate(out: Path, evals: list[dict]) -> dict:
    """results.json (per benchmark, per method: the `eval score` metrics) and report.md from `evaluations`;
    an evaluation not made yet (the batch of train_side_by_side makes them) runs inside this process."""
    from eval.run import run

    results: dict = {}
    for e in evals:
        step(e["name"], e["target"] / "metrics.json", e["cmd"], lambda e=e: run(*e["args"], **e["settings"]))
        results.setdefault(e["bench"], {})[e["method"]] = json.loads((e["target"] / "metrics.json").read_text())
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    grids = [f"![{name} {method}](eval/{name}-{method}/examples.png)" for name in BENCHMARKS
             for method in ("stage1", "stage2_mix") if (out / "eval" / f"{name}-{method}" / "examples.png").is_file()]
    (out / "report.md").write_text(
        "# Toy-world demo results\n\nWhat was trained: stage 0 adapted the pretrained toy CLIP "
        "(toyworld/pretrained/toy-clip-64, trained once on a broader open-domain corpus; its card says how) to this "
        "world's captions; stage I mapped images to pseudo tokens with that CLIP frozen; stage II trained composing "
        "adapters on the low-quality (mined), high-quality (toy editor) and mixed triplets. image_only, text_only "
        "and sum are baselines on the stage 0 CLIP. Toy numbers: they compare methods on one procedural world, they "
        "are not real benchmark scores. Why stage I may sit below sum here: the toy modification texts say nothing "
        "about the target alone (text_only is near 0), and the frozen text tower does not apply an instruction to a "
        "description, so even the reference's own caption in stage I's prompt scores below sum on toy CIRR R@1; "
        "stage II's adapters learn that step (docs/reports/CLAIMS.md, \"Why stage I stays below sum\").\n\n" + LEGEND
        + "\n\nEach cell: the metric and its 95% bootstrap interval over the benchmark's queries.\n"
        + report_table(results) + "\n\n" + significance(out)
        + "\n\n## Example queries\n\nReference | "
        "modification | top 5, the target outlined in green; a target below the top 5 has its rank under the text "
        "(the same sampled queries for every method).\n\n"
        + "\n\n".join(grids) + "\n\n## Search by hand\n\nOne query against the toy CIRR gallery: "
        "`search_example.png` (its target outlined, or its rank written under the text); browse: "
        "`python -m search serve --index runs/demo/index` (http://127.0.0.1:7860/).\n")
    return results


def search_example(out: Path, cirr: Path, checkpoint: Path) -> None:
    """Index the toy CIRR gallery with the stage II export and run one of its queries through
    `python -m search search`."""
    index = out / "index"
    step("index the toy CIRR gallery", index / "index.json",
         [sys.executable, "-m", "search", "index", "--checkpoint", str(checkpoint), "--images", str(cirr / "dev"),
          "--output", str(index)])
    query = json.loads((cirr / "captions" / "cap.rc2.val.json").read_text())[0]
    print(f"[demo] search: {query['reference']} + \"{query['caption']}\" (target {query['target_hard']})")
    step("search the index", None,
         [sys.executable, "-m", "search", "search", "--index", str(index), "--reference", f"{query['reference']}.png",
          "--text", query["caption"], "--k", "5", "--target", f"{query['target_hard']}.png",
          "--grid", str(out / "search_example.png")])
    print(f"[demo] browse the gallery: python -m search serve --index {index}  (http://127.0.0.1:7860/)")


HEADLINE = {"toy-cirr": ["recall@1", "recall@5", "recall_subset@1", "avg"], "toy-circo": ["map@5", "map@25"]}


LEGEND = """Methods: **image_only** ranks by the reference image's CLIP feature alone; **text_only** by the
modification text's; **sum** by the normalised sum of the two; **stage1**: the reference mapped to pseudo-word
tokens in the prompt "a photo of $ that {text}" (zero-shot: trained on captions only); **stage2_low / high / mix**:
stage I plus composing adapters trained on mined, toy-edited or both kinds of triplets. Metrics (percent):
**recall@K**, the share of queries whose target is among the first K results; **recall_subset@K** (CIRR), the same
within the query's own set of six similar images; **avg** (CIRR), the mean of recall@5 and recall_subset@1;
**map@K** (CIRCO), mean average precision over the first K results against every correct target."""


def report_table(results: dict) -> str:
    from eval.stats import shown

    lines = []
    for name, by_method in results.items():
        keys = HEADLINE[name]
        lines += [f"\n{name}\n", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for m, r in by_method.items():
            ci = r.get("ci95", {})
            bounds = {k: f" [{shown(lo, digits=0)}, {shown(hi, digits=0)}]" for k, (lo, hi) in ci.items()}
            cells = [(shown(r[k]) if k in r else "nan") + bounds.get(k, "") for k in keys]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def significance(out: Path) -> str:
    """Every method against stage I, query by query: the paired difference and its 95% bootstrap interval."""
    from eval import stats

    lines = ["## Against stage I (paired over queries)", "",
             "Method minus stage I on the same queries; an interval that excludes 0 is a significant difference.", "",
             "| benchmark | metric | method | difference | 95% CI | |", "|---|---|---|---|---|---|"]
    for name, keys in HEADLINE.items():
        base_file = out / "eval" / f"{name}-stage1" / "per_query.json"
        if not base_file.is_file():
            continue
        base = json.loads(base_file.read_text())
        for method in [*METHODS, "stage2_low", "stage2_high", "stage2_mix"]:
            other = out / "eval" / f"{name}-{method}" / "per_query.json"
            if method == "stage1" or not other.is_file():
                continue
            per_query = json.loads(other.read_text())
            for key in keys[:1] + keys[-1:]:
                diff = stats.paired_difference(per_query[key], base[key])
                lo, hi = stats.bootstrap_ci(diff)
                mark = "better" if lo > 0 else "worse" if hi < 0 else "not significant"
                lines.append(f"| {name} | {key} | {method} | {stats.metric_of(diff):+.1f} | "
                             f"[{stats.shown(lo, True)}, {stats.shown(hi, True)}] | {mark} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
