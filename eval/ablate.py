"""`python -m eval ablate --config FILE`: a grid of triplet sources x counts x seeds -> stage II runs from one
stage I export -> `eval run` (cells in worker processes, eval/cells.py) -> ablation.csv, ablation.md (mean ± std
over seeds) and ablation.png (the headline metric vs number of triplets, one line per source, error bars over
seeds).

Counts take a fixed subset of each source (`data.subset_fraction`, hashed on the sample key, so every seed
trains on the same triplets). Finished cells (export + metrics present) are reused on rerun.

    output_dir: runs/demo/ablation
    stage1: runs/demo/stage1/final
    stage2_config: train/configs/toy_stage2.yaml
    sources: {low: runs/demo/triplets_low, high: runs/demo/triplets_high, mix: runs/demo/mix.yaml}
    counts: [300, 1000]
    seeds: [0, 1]
    max_steps: 60
    benchmarks: {toy-cirr: {benchmark: cirr, data: runs/demo/toy/bench/cirr, metric: avg}}
    overrides: []          # more key=value for train/stage2.py
    gallery_cache: null    # default OUTPUT_DIR/gallery_cache
    jobs: 0                # cells at once, each in a worker process (0: one per core); threads: 1 torch thread each
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from cir import dataset as ds
from eval.score import PredictionError


@dataclass
class AblationConfig:
    output_dir: str  # cells/, ablation.csv, ablation.md, ablation.png
    stage1: str  # the stage I export every cell starts from
    sources: dict[str, str]  # name -> triplet dataset directory or mix manifest
    counts: list[int]  # triplets per source (a fixed subset)
    seeds: list[int] = field(default_factory=lambda: [0])
    benchmarks: dict[str, dict] = field(default_factory=dict)  # name -> {benchmark, data, metric, split?}
    stage2_config: Optional[str] = None  # YAML for train/stage2.py
    max_steps: int = 100  # stage II steps per cell
    overrides: list[str] = field(default_factory=list)  # more key=value for train/stage2.py
    gallery_cache: Optional[str] = None  # where gallery features are cached (None: OUTPUT_DIR/gallery_cache); every
    # cell shares the stage I export's image tower, so one cache serves them all (and other evaluations of it)
    jobs: int = 0  # cells trained and evaluated at once, each in its own process; 0: one per `threads` cores
    threads: int = 1  # torch threads of each cell (its numbers depend on it in the last bits; not on jobs)


def load(path: str) -> AblationConfig:
    """The YAML file -> AblationConfig (cir.config.ConfigError, a ValueError, names unknown, missing or mistyped
    keys)."""
    from cir.config import from_dict

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    cfg = from_dict(AblationConfig, data, path)
    if not cfg.benchmarks:
        raise ValueError(f"{path}: no benchmarks")
    return cfg


def source_size(path: str) -> int:
    """Triplets in a dataset (its index), or in all datasets of a mix manifest."""
    if path.endswith((".yaml", ".yml", ".json")):
        return sum(source_size(m["path"]) for m in ds.load_mix(path))
    return ds.read_table(ds.join(path, "index.parquet")).num_rows


def _cell(cfg: AblationConfig, source: str, count: int, seed: int) -> Path:
    return Path(cfg.output_dir) / "cells" / f"{source}-{count}-seed{seed}"


def _cell_done(cfg: AblationConfig, source: str, count: int, seed: int) -> bool:
    cell = _cell(cfg, source, count, seed)
    return (cell / "train" / "final" / "cir_config.json").is_file() and all(
        (cell / "eval" / name / "metrics.json").is_file() for name in cfg.benchmarks)


def run_cell(cfg: AblationConfig, source: str, count: int, seed: int) -> dict:
    """A cell's stage II training and evaluations (each reused when there) -> {benchmark: metrics}."""
    cell = _cell(cfg, source, count, seed)
    fraction = min(1.0, count / max(1, source_size(cfg.sources[source])))
    final = cell / "train" / "final"
    if not (final / "cir_config.json").is_file():
        from train.stage2 import main as train_stage2

        args = ["--config", cfg.stage2_config] if cfg.stage2_config else []
        args += [f"output_dir={cell / 'train'}", f"init_from={cfg.stage1}", f"data.train=['{cfg.sources[source]}']",
                 f"data.subset_fraction={fraction}", f"seed={seed}", f"max_steps={cfg.max_steps}", *cfg.overrides]
        print(f"[ablate] python train/stage2.py {' '.join(args)}", file=sys.stderr, flush=True)
        code = train_stage2(args)
        if code != 0:
            raise PredictionError(f"stage II of cell {cell.name} failed (exit {code}; its error is printed above)")
    from eval.run import run

    metrics = {}
    for name, bench in cfg.benchmarks.items():
        target = cell / "eval" / name
        if (target / "metrics.json").is_file():
            metrics[name] = json.loads((target / "metrics.json").read_text())
        else:
            # the cells share one image tower (stage II trains text-side parts): one gallery encoding per benchmark
            metrics[name] = run(bench["benchmark"], bench["data"], str(final), bench.get("split", "val"),
                                output=str(target), cache_dir=cfg.gallery_cache or str(Path(cfg.output_dir) /
                                                                                         "gallery_cache"))
    return metrics


def steps(cfg: AblationConfig) -> list:
    """The cells left to make, as eval.cells steps (each logging to its folder's run.log): `ablate` runs them,
    and a caller with other steps of its own (the demo) may run them beside those first."""
    from eval.cells import Step

    return [Step(f"{source}-{count}-seed{seed}", str(_cell(cfg, source, count, seed) / "run.log"), run_cell,
                 (cfg, source, count, seed))
            for source in cfg.sources for count in cfg.counts for seed in cfg.seeds
            if not _cell_done(cfg, source, count, seed)]


def ablate(cfg: AblationConfig) -> list[dict]:
    from eval.cells import run_steps

    # `jobs` cells at once (eval/cells.py)
    run_steps(steps(cfg), cfg.jobs, cfg.threads, lambda line: print(f"[ablate] {line}", file=sys.stderr, flush=True))
    rows = []
    for source in cfg.sources:
        for count in cfg.counts:
            for seed in cfg.seeds:
                metrics = run_cell(cfg, source, count, seed)
                for bench, values in metrics.items():
                    rows.append({"source": source, "count": count, "seed": seed, "benchmark": bench,
                                 **{k: v for k, v in values.items() if k != "ci95"}})
    out = Path(cfg.output_dir)
    write_csv(rows, out / "ablation.csv")
    (out / "ablation.md").write_text(table(rows, cfg), encoding="utf-8")
    plot(rows, cfg, out / "ablation.png")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    keys = ["source", "count", "seed", "benchmark"]
    keys += sorted({k for r in rows for k in r} - set(keys))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seeds_ci(cfg: AblationConfig, source: str, count: int, bench: str, metric: str) -> Optional[tuple]:
    """95% bootstrap interval of the cell's mean over seeds, seeds and queries resampled (as the claims report's
    intervals: eval.stats.bootstrap_ci_over_seeds); None without per-query values."""
    from eval import stats

    files = [Path(cfg.output_dir) / "cells" / f"{source}-{count}-seed{seed}" / "eval" / bench / "per_query.json"
             for seed in cfg.seeds]
    if not all(f.is_file() for f in files):
        return None
    return stats.bootstrap_ci_over_seeds([json.loads(f.read_text())[metric] for f in files])


def table(rows: list[dict], cfg: AblationConfig) -> str:
    from eval import stats

    lines = ["# Ablation: triplet source x number of triplets", "",
             "Each cell: mean ± std over seeds, then the 95% bootstrap interval of that mean, seeds and queries "
             "resampled; cells whose intervals do not overlap differ significantly.", ""]
    for bench, spec in cfg.benchmarks.items():
        metric = spec.get("metric", "avg")
        lines += [f"## {bench}: {metric} (mean ± std over seeds {cfg.seeds})", "",
                  "| source | " + " | ".join(str(c) for c in cfg.counts) + " |",
                  "|---" * (len(cfg.counts) + 1) + "|"]
        for source in cfg.sources:
            cells = []
            for count in cfg.counts:
                vals = [r[metric] for r in rows if r["source"] == source and r["count"] == count
                        and r["benchmark"] == bench]
                m, s = _mean_std(vals)
                ci = seeds_ci(cfg, source, count, bench, metric)
                cells.append(f"{m:.1f} ± {s:.1f}" + (f" [{stats.shown(ci[0])}, {stats.shown(ci[1])}]" if ci else ""))
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], cfg: AblationConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(cfg.benchmarks)
    fig, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches), 4), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        metric = cfg.benchmarks[bench].get("metric", "avg")
        for source in cfg.sources:
            stats = [_mean_std([r[metric] for r in rows if r["source"] == source and r["count"] == c
                                and r["benchmark"] == bench]) for c in cfg.counts]
            ax.errorbar(cfg.counts, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=source)
        ax.set_xscale("log")
        ax.set_xlabel("triplets")
        ax.set_ylabel(metric)
        ax.set_title(bench)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
