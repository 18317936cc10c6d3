"""`python -m eval claims --config experiments/claims.yaml`: the seed papers' claims, measured on the toy world.

One command builds what the claims need (a toy world with large benchmarks, its caption and triplet datasets, a
stage 0 CLIP per seed), trains every row (a stage I or II variant, or a baseline) for every seed, evaluates each
on the report split, and decides each claim from paired bootstrap intervals:

- a row's number is its metric on the per-query values averaged over seeds; its 95% interval takes the seeds as
  the sample (`interval: seed-level`, the default: a t interval over the seeds' metrics widened by the queries'
  bootstrap), or is a bootstrap over seeds and queries (`seeds`) or over the queries of the seed-averaged
  values (`queries`); the seeds' spread is reported too;
- a comparison "A beats B" is the per-query difference A - B, seed i against seed i, its interval made the same
  way: it **holds** when the interval lies above 0 and the difference is at least `min_effect` (per metric:
  `min_effect_by_metric`), **does not hold** when the interval lies below `min_effect` (the data rule out a gain
  that matters), and is **inconclusive** otherwise (`verdict`, on unrounded numbers);
- a claim holds when every comparison in it holds, does not hold when any comparison does not hold, and is
  inconclusive otherwise.

The datasets are made in this process; the CLIPs, trainings and evaluations are steps run in worker processes,
`jobs` at once with `threads` torch threads each, each after the steps it starts from (`steps`, eval/cells.py),
each logging to a file beside its output. Paths in the config are relative to the current directory. Finished
steps are reused on rerun, like `eval ablate`; `claims.md` and `claims.json` are rewritten from them. Each step
records what it was made from (`{step}.made_from.json` beside it: the settings, the training configs' contents,
and what it was built on, nested), and a finished step whose definition changed is refused by name, never
reused: a report built on a stale world or row would be wrong without a sign.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from cir.benchmarks import BENCHMARKS
from eval import cells, stats
from eval.cells import Step
from eval.score import PredictionError
from toyworld.edits import PHRASINGS

STAGES = ("baseline", "stage1", "stage2")
SOURCES = ("low", "high", "mix", "coarse")
# the caption data a row's stage 0 CLIP and stage I mapping learn from: the world's training images, the same with
# copies of the `leak` benchmarks' report-split images among them, or those through `caption --exclude`
CAPTIONS = ("world", "leaked", "leaked-excluded")
LEAK_KINDS = ("resize90", "jpeg75", "crop5")  # how a leaked copy differs from the benchmark's file, in turn
INTERVALS = ("seed-level", "seeds", "queries")  # ClaimsConfig.interval


@dataclass
class RowSpec:
    stage: str  # baseline | stage1 | stage2
    text: str = ""  # what the row is, for the report
    method: str = "model"  # eval run --method (baselines: image_only | text_only | sum)
    overrides: list[str] = field(default_factory=list)  # key=value for train/stage1.py or train/stage2.py
    init: str = "stage1"  # stage II rows: the stage I row (same seed) they start from
    # stage II rows: low | high | mix | coarse (the world's synthetic triplets; coarse: high quality with a share
    # of one-to-many texts, `coarse_fraction`), or a benchmark of `benchmarks` whose own
    # train split is read through the supervised loader (a supervised upper bound, not zero-shot)
    data: str = "mix"
    count: Optional[int] = None  # stage II rows: train on a fixed subset of this many triplets
    # stage I/II rows: train with seed + this, on the same stage 0 CLIP as the seed: the same row again with other
    # training seeds (an A/A pair, whose comparison must not hold)
    seed_offset: int = 0
    # baseline and stage I rows: the caption data (CAPTIONS) of their stage 0 CLIP and of stage I (issue 43: what
    # training on a benchmark's own images does, and whether --exclude undoes it); stage II rows take their init's
    captions: str = "world"


@dataclass
class ClaimSpec:
    id: str  # e.g. TSCIR-2
    text: str  # the paper's claim, in a sentence
    better: list[str]  # the row(s) the claim says win (each must beat each of `than`)
    than: list[str]  # the rows they must beat
    benchmarks: dict[str, str]  # benchmark name (of `benchmarks`) -> the metric the claim is judged on
    source: str = ""  # where the paper says it


@dataclass
class BenchSpec:
    benchmark: str  # its layout: cirr | circo | fashioniq | shoes | fashion200k
    folder: str = ""  # under the toy world's bench/ (default: the benchmark's name; e.g. circo_coarse)
    split: Optional[str] = None  # the split reported (None: the config's `split`)
    # the queries' texts (toyworld.edits.PHRASINGS): editor (the toy editor's, as the HQ triplets') or held-out
    # (phrased as no training text is): the same queries, images and answers, read from world-held-out/
    phrasing: str = "editor"

    @property
    def world(self) -> str:
        """The key in `prepare`'s paths of the world holding this benchmark."""
        return "world" if self.phrasing == "editor" else f"world-{self.phrasing}"

    @property
    def name(self) -> str:
        """Its folder under bench/, which is also its name in the toy world (toyworld.world.BENCHMARKS)."""
        return self.folder or self.benchmark

    def root(self, paths: dict[str, Path]) -> Path:
        return paths[self.world] / "bench" / self.name

    def definition(self) -> dict:
        """What an evaluation on it is made from (the default phrasing left out: reports made before the field
        existed stay valid)."""
        return {k: v for k, v in asdict(self).items() if not (k == "phrasing" and v == "editor")}


@dataclass
class ClaimsConfig:
    output_dir: str = "runs/claims"  # world/, data/, stage0/, cells/ and the report (claims.md, claims.json)
    report: str = "claims"  # the report's files in output_dir: REPORT.md, REPORT.json; configs that share an
    # output_dir (and so its world, CLIPs and cells) need a name each, or the last run's report replaces the other's
    world_images: int = 2000  # training images of the toy world
    bench_queries: int = 1000  # queries per benchmark split (~ +-3 points at R@1 ~ 30)
    world_seed: int = 0
    world_vocabulary: str = "shapes"  # the toy world's words: shapes, or gems (a second world, for transfer)
    hq_triplets: int = 3000  # high-quality triplets to synthesize
    coarse_fraction: float = 0.5  # the `coarse` dataset: high quality, this share of edits described coarsely
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds: seed i trains stage I and II
    clip_per_seed: bool = True  # and its own stage 0 CLIP, so a row's seeds (and intervals) vary the CLIP too;
    # false: one CLIP, trained with world_seed, shared by every row and seed
    jobs: int = 0  # steps (a training, a row's evaluations) run at once, each in its own process; 0: one per
    # `threads` cores. Does not change any number (eval/cells.py)
    threads: int = 1  # torch threads of each step; part of what each step is made from (float sums in another
    # order change a training's last bits), so a change makes the finished steps be refused, not mixed in
    split: str = "test"  # the split reported (configs and defaults are tuned on val; CIRR's "test" is test1)
    min_effect: float = 1.0  # points: the smallest gain that counts (`verdict`), for every metric not named below
    min_effect_by_metric: dict[str, float] = field(default_factory=dict)  # metric -> its own min_effect (points)
    # "seed-level": the seeds are the sample (a t interval over their metrics, widened by the queries' bootstrap:
    # eval.stats.seed_level_ci; calibrated, see verdict); "seeds": a bootstrap resampling seeds and queries;
    # "queries": a bootstrap of the queries of the seed-averaged values (seeds held fixed)
    interval: str = "seed-level"
    stage0_config: str = "train/configs/toy_stage0.yaml"
    stage1_config: str = "train/configs/toy_stage1.yaml"
    stage2_config: str = "train/configs/toy_stage2.yaml"
    # key=value for every stage's training (e.g. max_steps=3 in tests); clip.* go to stage 0 alone, the stage that
    # builds the CLIP (stages I and II take their init_from's)
    overrides: list[str] = field(default_factory=list)
    # key=value for stage 0 alone, after `overrides`: how each CLIP is made from the pretrained toy CLIP (the stage
    # 0 config's init_from), or from scratch: [init_from=null, clip.model=toy-clip-64, max_steps=600, optim.lr=1e-3]
    stage0_overrides: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)  # claim ids to judge, their rows alone trained and evaluated
    # ([]: every claim); e.g. `only=[CTI-IR-1]` on the command line: one claim's verdict without the whole run
    # benchmarks (of `benchmarks`) whose report-split gallery is copied among the training images of the rows with
    # captions: leaked or leaked-excluded (each file once: resized 90%, JPEG q75 or cropped 5%, with its scene's
    # caption, as a web crawl holds a benchmark's images)
    leak: list[str] = field(default_factory=list)
    benchmarks: dict[str, BenchSpec] = field(default_factory=dict)
    rows: dict[str, RowSpec] = field(default_factory=dict)
    claims: list[ClaimSpec] = field(default_factory=list)


ROOT = Path(__file__).resolve().parents[1]  # the repository: beam_runner.py, train/configs/, toyworld/pretrained/


def anchored(cfg: ClaimsConfig, cwd: Path) -> ClaimsConfig:
    """cfg with absolute paths, for a run from the repository root whatever directory the command was started
    in: output_dir relative to `cwd`; a stage config relative to `cwd` when it is there, else to the repository
    (the shipped train/configs/)."""
    cfg.output_dir = str((cwd / cfg.output_dir).resolve())
    for name in ("stage0_config", "stage1_config", "stage2_config"):
        path = Path(getattr(cfg, name))
        if not path.is_absolute():
            setattr(cfg, name, str((cwd / path) if (cwd / path).is_file() else ROOT / path))
    return cfg


def load(path: str, overrides: Sequence[str] = ()) -> ClaimsConfig:
    """The YAML file and `key=value` overrides (e.g. `world_vocabulary=gems output_dir=runs/x`, or dotted into a
    row: `rows.stage1.overrides=[max_steps=900]`) -> ClaimsConfig; unknown keys, rows and benchmarks are named."""
    from cir.config import ConfigError, apply_overrides, from_dict, load_yaml

    p = Path(path)
    if not p.is_file():
        raise PredictionError(f"claims config not found: {path}")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise PredictionError(f"claims config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not data:
        got = "an empty file" if data is None else repr(data)
        raise PredictionError(f"claims config {path}: a mapping of fields with `rows` and `claims` "
                              f"(experiments/claims.yaml is one), got {got}")
    try:
        apply_overrides(data, overrides)
        rows = {name: from_dict(RowSpec, spec, f"rows.{name}") for name, spec in (data.pop("rows", {}) or {}).items()}
        benches = {name: from_dict(BenchSpec, spec, f"benchmarks.{name}")
                   for name, spec in (data.pop("benchmarks", {}) or {}).items()}
        claims = [from_dict(ClaimSpec, spec, f"claims[{i}]") for i, spec in enumerate(data.pop("claims", []) or [])]
        cfg = from_dict(ClaimsConfig, data, path)
    except ConfigError as err:
        raise PredictionError(str(err)) from err
    cfg.rows, cfg.claims, cfg.benchmarks = rows, claims, benches
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in cfg.seeds):
        raise PredictionError(f"seeds: distinct whole numbers >= 0, at least one, got {cfg.seeds!r} (a seed "
                              f"counted twice would narrow every interval)")
    if cfg.threads < 1 or cfg.jobs < 0:
        raise PredictionError(f"threads must be at least 1 and jobs at least 0 (0: one per `threads` cores), got "
                              f"threads={cfg.threads}, jobs={cfg.jobs}")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise PredictionError(f"output_dir {cfg.output_dir} is a file, not a folder: name another output_dir")
    if cfg.interval not in INTERVALS:
        raise PredictionError(f"interval: one of {INTERVALS}, got {cfg.interval!r}")
    effects = {"min_effect": cfg.min_effect, **{f"min_effect_by_metric.{k}": v
                                                for k, v in (cfg.min_effect_by_metric or {}).items()}}
    if not isinstance(cfg.min_effect_by_metric, dict) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in effects.values()):
        raise PredictionError(f"min_effect and min_effect_by_metric (metric: points) take numbers >= 0, got {effects}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.report):
        raise PredictionError(f"report: a file name of letters, digits, '.', '_' and '-', got {cfg.report!r}")
    for name, bench in benches.items():
        if bench.benchmark not in BENCHMARKS:
            raise PredictionError(f"benchmarks.{name}.benchmark: one of {BENCHMARKS}, got {bench.benchmark!r}")
        if bench.phrasing not in PHRASINGS:
            raise PredictionError(f"benchmarks.{name}.phrasing: one of {PHRASINGS}, got {bench.phrasing!r}")
    for name, row in rows.items():
        if row.stage not in STAGES:
            raise PredictionError(f"rows.{name}.stage: one of {STAGES}, got {row.stage!r}")
        if row.stage == "stage2" and (row.init not in rows or rows[row.init].stage != "stage1"):
            raise PredictionError(f"rows.{name}.init: {row.init!r} is not a stage1 row")
        if row.stage == "stage2" and row.data not in SOURCES and row.data not in benches:
            raise PredictionError(f"rows.{name}.data: one of {SOURCES} or a benchmark {sorted(benches)}, "
                                  f"got {row.data!r}")
        if row.seed_offset and (row.stage == "baseline" or row.seed_offset < 0):
            raise PredictionError(f"rows.{name}.seed_offset: a whole number > 0 for stage1/stage2 rows, got "
                                  f"{row.seed_offset} on a {row.stage} row")
        if row.count and row.data not in SOURCES:
            raise PredictionError(f"rows.{name}.count: only for the synthetic datasets {SOURCES}")
        if row.captions not in CAPTIONS or (row.captions != "world" and (row.stage == "stage2" or not cfg.leak)):
            raise PredictionError(f"rows.{name}.captions: one of {CAPTIONS} on baseline and stage1 rows (stage2 "
                                  f"rows take their init's), the leaked ones with `leak` set; got {row.captions!r}")
    for name in cfg.leak:
        if name not in benches:
            raise PredictionError(f"leak: no benchmark named {name!r} (have {sorted(benches)})")
    for claim in claims:
        for name in [*claim.better, *claim.than]:
            if name not in rows:
                raise PredictionError(f"claim {claim.id}: no row named {name!r} (rows: {sorted(rows)})")
        for bench in claim.benchmarks:
            if bench not in cfg.benchmarks:
                raise PredictionError(f"claim {claim.id}: no benchmark named {bench!r} (have {sorted(cfg.benchmarks)})")
    unknown = sorted(set(cfg.only) - {c.id for c in claims})
    if unknown:
        raise PredictionError(f"only: no claim {unknown} (claims: {[c.id for c in claims]})")
    if cfg.only:
        cfg.claims = [c for c in claims if c.id in cfg.only]
    return cfg


# ------------------------------------------------------------------------------------------ building

def _log(message: str) -> None:
    print(f"[claims] {message}", file=sys.stderr, flush=True)


MADE_FROM = ".made_from.json"  # suffix of the stamp beside each step's folder


def _digest(path: str) -> str:
    """A training config file by its contents (an edit to it changes every step trained from it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _reusable(folder: Path, finished: bool, made_from: dict) -> bool:
    """Whether the step in `folder` is done and may be reused: it is finished and was made from `made_from`.
    Not finished: False (make it, then `_stamp`). Finished from another definition, or with none recorded: an
    error naming what changed and the folder to delete."""
    if not finished:
        return False
    stamp = folder.parent / (folder.name + MADE_FROM)
    recorded = json.loads(stamp.read_text()) if stamp.is_file() else None
    if recorded == made_from:
        return True
    changed = "its definition was not recorded" if recorded is None else "changed: " + ", ".join(
        sorted(k for k in {*recorded, *made_from} if recorded.get(k) != made_from.get(k)))
    raise PredictionError(f"{folder} was made from another definition ({changed}): delete it (and {stamp.name}) "
                          f"to make it again, or use another output_dir")


def _stamp(folder: Path, made_from: dict) -> None:
    stamp = folder.parent / (folder.name + MADE_FROM)
    stamp.write_text(json.dumps(made_from, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def definitions(cfg: ClaimsConfig) -> dict[str, dict]:
    """What each shared step is made from."""
    world = {"images": cfg.world_images, "bench_queries": cfg.bench_queries, "seed": cfg.world_seed,
             "vocabulary": cfg.world_vocabulary}
    low = {"world": world, "seed": cfg.world_seed}
    high = {"world": world, "seed": cfg.world_seed, "triplets": cfg.hq_triplets}
    coarse = {**high, "coarse_fraction": cfg.coarse_fraction}
    leak = {name: {**cfg.benchmarks[name].definition(), "split": cfg.benchmarks[name].split or cfg.split}
            for name in cfg.leak}
    return {"world": world, "captions": {"world": world}, "low": low, "high": high, "mix": {"low": low, "high": high},
            "coarse": coarse, "captions-leaked": {"world": world, "leak": leak, "kinds": list(LEAK_KINDS)},
            "captions-leaked-excluded": {"world": world, "leak": leak, "kinds": list(LEAK_KINDS), "exclude": True}}


def captions_key(variant: str) -> str:
    """prepare's paths (and definitions) key of a caption data variant (CAPTIONS)."""
    return "captions" if variant == "world" else f"captions-{variant}"


def row_captions(cfg: ClaimsConfig, name: str) -> str:
    """The caption data behind a row's CLIP and stage I: its own, or its stage I init's for a stage II row."""
    row = cfg.rows[name]
    return row_captions(cfg, row.init) if row.stage == "stage2" else row.captions


def clip_seed(cfg: ClaimsConfig, seed: int) -> int:
    """The stage 0 seed behind a row's training seed."""
    return seed if cfg.clip_per_seed else cfg.world_seed


def stage0_definition(cfg: ClaimsConfig, seed: int, captions: str = "world") -> dict:
    """What the stage 0 CLIP behind training seed `seed` (trained on the `captions` variant) is made from: with
    the CLIP it starts from (init_from, the pretrained toy CLIP) named by its weights, so new pretrained weights
    retrain every step."""
    made = {"world": definitions(cfg)["world"], "config": _digest(cfg.stage0_config), "overrides": cfg.overrides,
            "seed": clip_seed(cfg, seed), "threads": cfg.threads}
    if captions != "world":  # absent for the world's own: CLIPs made before the field existed stay valid
        made["captions"] = definitions(cfg)[captions_key(captions)]
    if cfg.stage0_overrides:  # absent when empty: CLIPs made before the field existed keep their definition
        made["stage0_overrides"] = cfg.stage0_overrides
    start = _stage0_start(cfg.stage0_config, (*cfg.overrides, *cfg.stage0_overrides))
    return {**made, "init_weights": _weights_digest(start)} if start else made


@functools.lru_cache(maxsize=None)
def _stage0_start(config: str, overrides: tuple) -> Optional[str]:
    """The export stage 0 starts from (its config's init_from), or None when it trains from scratch."""
    from train.config import load_config
    from train.stage0 import Stage0Config

    return load_config(Stage0Config, config, list(overrides)).init_from


@functools.lru_cache(maxsize=None)
def _weights_digest(folder: str) -> str:
    from cir.backbone import WEIGHTS_FILE

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise PredictionError(f"stage 0 starts from {folder} (init_from), which has no {WEIGHTS_FILE}")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def prepare(cfg: ClaimsConfig) -> dict[str, Path]:
    """The toy world, its caption dataset, LQ and HQ triplets and a mix manifest (stage 0: `clip`)."""
    import beam_runner

    out = Path(cfg.output_dir)
    paths = {"world": out / "world", "captions": out / "data" / "captions", "low": out / "data" / "triplets_low",
             "high": out / "data" / "triplets_high", "mix": out / "data" / "mix.yaml", "stage0": out / "stage0",
             "coarse": out / "data" / "triplets_coarse"}
    made_from = definitions(cfg)
    beam = ["--runner", "DirectRunner"]
    world = ["--bench-queries", str(cfg.bench_queries), "--seed", str(cfg.world_seed), "--vocabulary",
             cfg.world_vocabulary]
    if not _reusable(paths["world"], (paths["world"] / "world.json").is_file(), made_from["world"]):
        _log("toy world")
        _check(beam_runner.main(["toy", "--output", str(paths["world"]), "--num-images", str(cfg.world_images),
                                 *world]), "toy world")
        _stamp(paths["world"], made_from["world"])
    # Benchmarks with other query texts: the same benchmarks written again (their own random streams: the same
    # queries and images) with one training image, which nothing reads.
    for phrasing in sorted({b.phrasing for b in cfg.benchmarks.values()} - {"editor"}):
        key = f"world-{phrasing}"
        names = sorted({b.name for b in cfg.benchmarks.values() if b.phrasing == phrasing})
        paths[key] = out / key
        made = {**made_from["world"], "query_phrasing": phrasing, "benchmarks": names}
        if not _reusable(paths[key], (paths[key] / "world.json").is_file(), made):
            _log(f"toy benchmarks phrased {phrasing}")
            _check(beam_runner.main(["toy", "--output", str(paths[key]), "--num-images", "1", *world,
                                     "--query-phrasing", phrasing, "--benchmarks", ",".join(names)]), key)
            _stamp(paths[key], made)
    for name, bench in cfg.benchmarks.items():
        if not bench.root(paths).is_dir():
            raise PredictionError(f"benchmarks.{name}: {bench.root(paths)} does not exist: the toy world in "
                                  f"{paths[bench.world]} was written before it; delete {out} to rebuild everything")
    if not _reusable(paths["captions"], (paths["captions"] / "stats.json").is_file(), made_from["captions"]):
        _log("caption job")
        _check(beam_runner.main(["caption", "--input", str(paths["world"] / "images"), "--output",
                                 str(paths["captions"]), "--shard-size", "500", "--no-near-duplicates", *beam]),
               "caption job")  # every toy image, as the documented verdicts had (docs/reports/NEAR_DUPLICATES.md)
        _stamp(paths["captions"], made_from["captions"])
    for variant in sorted({row.captions for row in cfg.rows.values()} - {"world"}):
        key = captions_key(variant)
        paths[key] = out / "data" / key
        if not _reusable(paths[key], (paths[key] / "stats.json").is_file(), made_from[key]):
            _log(f"caption job on the world's images and copies of {', '.join(cfg.leak)}'s ({variant})")
            inputs, folders = leaked_inputs(cfg, paths, out / "data" / "leaked_inputs")
            exclude = ["--exclude", *map(str, folders)] if variant == "leaked-excluded" else []
            _check(beam_runner.main(["caption", "--input", str(inputs), "--output", str(paths[key]), "--shard-size",
                                     "500", "--no-near-duplicates", *exclude, *beam]), f"{key} caption job")
            _stamp(paths[key], made_from[key])
    datasets = [("low", "low", []), ("high", "high", ["--num-triplets", str(cfg.hq_triplets)])]
    if any(row.data == "coarse" for row in cfg.rows.values()):  # made only when a row reads it
        datasets.append(("coarse", "high", ["--num-triplets", str(cfg.hq_triplets),
                                            "--toy-coarse-fraction", str(cfg.coarse_fraction)]))
    for name, quality, extra in datasets:
        if not _reusable(paths[name], (paths[name] / "stats.json").is_file(), made_from[name]):
            _log(f"{name} triplets")
            _check(beam_runner.main(["synth", "--input", str(paths["captions"]), "--output", str(paths[name]),
                                     "--quality", quality, "--image-weight", "0", "--seed", str(cfg.world_seed),
                                     *extra, *beam]), f"{name} synthesis")
            _stamp(paths[name], made_from[name])
    # a manifest's relative paths are read relative to the manifest: write them absolute
    paths["mix"].write_text(f"datasets:\n  - {{path: {paths['low'].resolve()}, weight: 1.0}}\n"
                            f"  - {{path: {paths['high'].resolve()}, weight: 1.0}}\n")
    return paths


def leaked_inputs(cfg: ClaimsConfig, paths: dict[str, Path], out: Path) -> tuple[Path, list[Path]]:
    """A folder of the world's training images with their captions and a copy of every
    report-split gallery image of the `leak` benchmarks (in turn resized to 90%, JPEG q75, cropped 5%: LEAK_KINDS),
    captioned from its toy scene -> (the folder, the folders those gallery images lie in, for --exclude).
    Made once (a marker says it is whole): the files a caption job resumes on must not change."""
    import random
    import shutil

    from PIL import Image

    from cir.benchmarks import load as load_benchmark
    from toyworld.scene import Scene, caption

    galleries = {}  # leaked benchmark -> its report split's gallery (name -> file)
    for name in cfg.leak:
        spec = cfg.benchmarks[name]
        galleries[name] = load_benchmark(spec.benchmark, spec.root(paths), spec.split or cfg.split).gallery
    folders = sorted({path.parent for gallery in galleries.values() for path in gallery.values()})
    if (out / ".complete").is_file():  # made before (the same every time): a caption job's rerun sees one input
        return out, folders
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in (paths["world"] / "images").iterdir():
        if path.suffix in (".jpg", ".png", ".txt"):
            shutil.copyfile(path, out / path.name)
    for name, gallery in galleries.items():
        scenes = json.loads((cfg.benchmarks[name].root(paths) / "toy_scenes.json").read_text(encoding="utf-8"))
        for i, (image, path) in enumerate(sorted(gallery.items())):
            kind, stem = LEAK_KINDS[i % len(LEAK_KINDS)], f"leak-{name}-{i:05d}"
            img = Image.open(path).convert("RGB")
            w, h = img.size
            if kind == "resize90":
                img = img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC)
            elif kind == "crop5":
                img = img.crop((round(w * 0.025), round(h * 0.025), w - round(w * 0.025), h - round(h * 0.025)))
            img.save(out / f"{stem}.jpg", quality=75 if kind == "jpeg75" else 95)
            text = caption(Scene.from_json(scenes[image]), random.Random(f"{cfg.world_seed}:leak:{stem}"))
            (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    (out / ".complete").write_text("")
    return out, folders


def _clip_dir(cfg: ClaimsConfig, paths: dict[str, Path], seed: int, captions: str = "world") -> Path:
    return paths["stage0"] / f"{'' if captions == 'world' else captions + '-'}seed{clip_seed(cfg, seed)}"


def clip_done(cfg: ClaimsConfig, paths: dict[str, Path], seed: int, captions: str = "world") -> bool:
    out = _clip_dir(cfg, paths, seed, captions)
    return _reusable(out, (out / "final" / "open_clip_model.safetensors").is_file(),
                     stage0_definition(cfg, seed, captions))


def clip(cfg: ClaimsConfig, paths: dict[str, Path], seed: int, captions: str = "world") -> Path:
    """The stage 0 CLIP export behind training seed `seed` on the `captions` data, trained unless it is there."""
    from train.stage0 import main as stage0

    s = clip_seed(cfg, seed)
    out = _clip_dir(cfg, paths, seed, captions)
    if not clip_done(cfg, paths, seed, captions):
        _log(f"stage 0 seed {s} (the toy CLIP of {'that seed' if cfg.clip_per_seed else 'every row and seed'}"
             f"{'' if captions == 'world' else ', on the ' + captions + ' captions'})")
        _check(stage0(["--config", cfg.stage0_config, f"output_dir={out}",
                       f"data.train=['{paths[captions_key(captions)]}']", f"seed={s}", *cfg.overrides,
                       *cfg.stage0_overrides]), f"stage 0 seed {s}")
        _stamp(out, stage0_definition(cfg, seed, captions))
    return out / "final"


def _later_stages(overrides: list[str]) -> list[str]:
    """The common overrides for stages I and II: not clip.*, which they take from their init_from."""
    return [o for o in overrides if not o.startswith("clip.")]


def row_definition(cfg: ClaimsConfig, name: str, seed: int) -> dict:
    """What a row's export for this seed is made from: the row, its training config's contents, the common
    overrides, the seed, and what it starts from and reads (nested definitions)."""
    row, shared = cfg.rows[name], definitions(cfg)
    captions = row_captions(cfg, name)
    if row.stage == "baseline":
        return {"baseline": stage0_definition(cfg, seed, captions)}
    config = cfg.stage1_config if row.stage == "stage1" else cfg.stage2_config
    made = {"row": {k: v for k, v in asdict(row).items()  # defaults left out: older steps stay valid
                    if k != "text" and not (k == "seed_offset" and v == 0) and not (k == "captions" and v == "world")},
            "config": _digest(config), "overrides": _later_stages(cfg.overrides), "seed": seed,
            "stage0": stage0_definition(cfg, seed, captions)}
    if row.stage == "stage2":
        made["init"] = row_definition(cfg, row.init, seed)
        made["data"] = shared[row.data] if row.data in SOURCES else {
            "benchmark": cfg.benchmarks[row.data].definition(), "world": shared["world"]}
    return made


def _check(code: int, what: str) -> None:
    if code != 0:
        raise PredictionError(f"{what} failed (exit {code}; its error is printed above)")


def fluctuation_summary(cfg: ClaimsConfig, name: str) -> dict:
    """A loss=mur row's measured fluctuations, from its seeds' train_log.jsonl (train/stage2.py logs them):
    target_cos (mean of the logged batches' cos(f_hat, f)) and its minimum, sigma's mean, its spread across each
    batch's samples (mean of the logged sigma_spread) and across batches (the logged means' std). {} for a row
    trained before these were logged."""
    logged = []
    for seed in row_seeds(cfg, name):
        path = export_dir(cfg, name, seed).parent / "train_log.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        logged += [r for r in map(json.loads, lines) if "target_cos" in r]
    if not logged:
        return {}
    sigmas = [r["sigma"] for r in logged]
    return {"target_cos": round(statistics.fmean(r["target_cos"] for r in logged), 3),
            "target_cos_min": round(min(r["target_cos_min"] for r in logged), 3),
            "sigma": round(statistics.fmean(sigmas), 3),
            "sigma_spread": round(statistics.fmean(r["sigma_spread"] for r in logged), 3),
            "sigma_across_batches": round(statistics.pstdev(sigmas), 3), "logged_steps": len(logged)}


def export_dir(cfg: ClaimsConfig, name: str, seed: int) -> Path:
    """Where a (stage I or II) row's export for one seed is written."""
    return Path(cfg.output_dir) / "cells" / f"{name}-seed{seed}" / "train" / "final"


def export_done(cfg: ClaimsConfig, name: str, seed: int) -> bool:
    """Whether a stage I/II row's export for this seed is finished (and made from its definition)."""
    final = export_dir(cfg, name, seed)
    return _reusable(final.parent, (final / "cir_config.json").is_file(), row_definition(cfg, name, seed))


def export(cfg: ClaimsConfig, paths: dict[str, Path], name: str, seed: int) -> Path:
    """The row's export (or CLIP, for baselines) for this seed, trained unless it is there already."""
    from eval.ablate import source_size

    row = cfg.rows[name]
    if row.stage == "baseline":
        return clip(cfg, paths, seed, row.captions)
    final = export_dir(cfg, name, seed)
    made_from = row_definition(cfg, name, seed)
    if export_done(cfg, name, seed):
        return final
    common = [f"output_dir={final.parent}", f"seed={seed + row.seed_offset}", "save_every=100000", "log_every=50",
              *_later_stages(cfg.overrides)]
    _log(f"train {name} seed {seed}")
    if row.stage == "stage1":
        from train.stage1 import main as stage1

        _check(stage1(["--config", cfg.stage1_config, *common, f"data.train=['{paths[captions_key(row.captions)]}']",
                       f"init_from={clip(cfg, paths, seed, row.captions)}", *row.overrides]), f"{name} seed {seed}")
    else:
        from train.stage2 import main as stage2

        if row.data in SOURCES:
            data = str(paths[row.data])
        else:  # a benchmark's own train split, read by train.supervised
            bench = cfg.benchmarks[row.data]
            data = f"{bench.benchmark}:{bench.root(paths).resolve()}#train"
        subset = [f"data.subset_fraction={min(1.0, row.count / max(1, source_size(data)))}"] if row.count else []
        banks = f"hard_negatives.cache_dir={Path(cfg.output_dir) / 'negative_banks'}"  # shared by rows of one CLIP
        _check(stage2(["--config", cfg.stage2_config, *common, banks, f"data.train=['{data}']",
                       f"init_from={export(cfg, paths, row.init, seed)}", *subset, *row.overrides]),
               f"{name} seed {seed}")
    _stamp(final.parent, made_from)
    return final


def _cell(cfg: ClaimsConfig, name: str, seed: int) -> Path:
    """A row's folder for one seed (a baseline on a CLIP every seed shares has one folder)."""
    shared = cfg.rows[name].stage == "baseline" and not cfg.clip_per_seed
    return Path(cfg.output_dir) / "cells" / (name if shared else f"{name}-seed{seed}")


def _evaluation(cfg: ClaimsConfig, name: str, seed: int, bench: str) -> tuple[Path, dict]:
    """Where one row, seed and benchmark's evaluation goes, and what it is made from."""
    row, spec = cfg.rows[name], cfg.benchmarks[bench]
    split = spec.split or cfg.split
    made_from = {"export": row_definition(cfg, name, seed), "benchmark": spec.definition(), "split": split,
                 "method": row.method, "world": definitions(cfg)["world"]}
    return _cell(cfg, name, seed) / "eval" / f"{bench}-{split}", made_from


def evaluation_dir(cfg: ClaimsConfig, name: str, seed: int, bench: str) -> Path:
    """The folder of one row, seed and benchmark's evaluation (per_query.json, metrics.json)."""
    return _evaluation(cfg, name, seed, bench)[0]


def evaluation_done(cfg: ClaimsConfig, name: str, seed: int, bench: str) -> bool:
    out, made_from = _evaluation(cfg, name, seed, bench)
    return _reusable(out, (out / "per_query.json").is_file(), made_from)


def evaluate(cfg: ClaimsConfig, paths: dict[str, Path], name: str, seed: int, bench: str) -> dict:
    """Per-query values of one row, seed and benchmark on the report split (eval run; reused when there)."""
    from eval.run import run

    row, spec = cfg.rows[name], cfg.benchmarks[bench]
    out, made_from = _evaluation(cfg, name, seed, bench)
    if not evaluation_done(cfg, name, seed, bench):
        run(spec.benchmark, str(spec.root(paths)), str(export(cfg, paths, name, seed)),
            split=made_from["split"], method=row.method, output=str(out), grids=0,
            cache_dir=str(Path(cfg.output_dir) / "gallery_cache"))
        _stamp(out, made_from)
    return json.loads((out / "per_query.json").read_text())


def evaluate_all(cfg: ClaimsConfig, paths: dict[str, Path], name: str, seed: int, benches: list[str]) -> None:
    for bench in benches:
        evaluate(cfg, paths, name, seed, bench)


def steps(cfg: ClaimsConfig, paths: dict[str, Path], needed: dict[str, list]) -> list[Step]:
    """What is left to make, as steps for eval.cells: a stage 0 CLIP per seed, each row's training per seed
    (after the CLIP or stage I row it starts from), each row's evaluations per seed (after its export). CLIPs
    first, then stage I, stage II, evaluations: everything waits on the CLIPs, stage II on stage I."""
    out: dict[str, Step] = {}

    def clip_step(seed: int, captions: str) -> list[str]:  # [the step training that CLIP], or [] when it is there
        step = f"stage 0 seed {clip_seed(cfg, seed)}" + ("" if captions == "world" else f" on {captions}")
        if step not in out and not clip_done(cfg, paths, seed, captions):
            out[step] = Step(step, str(_clip_dir(cfg, paths, seed, captions)) + ".log", clip,
                             (cfg, paths, seed, captions), rank=0)
        return [step] if step in out else []

    def train_step(name: str, seed: int) -> list[str]:  # the same for a row's export
        row = cfg.rows[name]
        if row.stage == "baseline":
            return clip_step(seed, row.captions)
        step = f"train {name} seed {seed}"
        if step not in out and not export_done(cfg, name, seed):
            after = clip_step(seed, row.captions) if row.stage == "stage1" else train_step(row.init, seed)
            out[step] = Step(step, str(export_dir(cfg, name, seed).parent.parent / "train.log"), export,
                             (cfg, paths, name, seed), tuple(after), rank=1 if row.stage == "stage1" else 2)
        return [step] if step in out else []

    for name, pairs in needed.items():
        for seed in row_seeds(cfg, name):
            benches = [b for b in dict.fromkeys(b for b, _ in pairs) if not evaluation_done(cfg, name, seed, b)]
            if benches:
                out[f"evaluate {name} seed {seed}"] = Step(
                    f"evaluate {name} seed {seed}", str(_cell(cfg, name, seed) / "eval.log"), evaluate_all,
                    (cfg, paths, name, seed, benches), tuple(train_step(name, seed)), rank=3)
    return list(out.values())


def row_seeds(cfg: ClaimsConfig, name: str) -> list[int]:
    """The seeds a row is evaluated for: a baseline is the CLIP's alone, one evaluation when every seed shares it."""
    return [cfg.seeds[0]] if cfg.rows[name].stage == "baseline" and not cfg.clip_per_seed else cfg.seeds


# ------------------------------------------------------------------------------------------ judging

def verdict(difference: float, lo: float, hi: float, min_effect: float) -> str:
    """The one rule, from a difference (better - other, metric points) and its 95% interval, unrounded:
    holds when the interval lies above 0 and the difference is at least `min_effect` (a gain that matters,
    measured as more than noise); does not hold when the interval lies below `min_effect` (the data rule out a
    gain that matters); inconclusive otherwise. With the seed-level interval a null comparison holds at most
    ~2.5% of the time (tests/test_eval_claims.py simulates it)."""
    if lo > 0 and difference >= min_effect:
        return "holds"
    if hi < min_effect:
        return "does not hold"
    return "inconclusive"


SATURATED = 99.0  # both rows at or above this (percent): the benchmark cannot tell them apart


def combine(verdicts: list[str]) -> str:
    """A claim is the conjunction of its comparisons: it holds when all hold, fails when any fails."""
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if "does not hold" in verdicts:
        return "does not hold"
    return "inconclusive"


def interval(runs: list[dict], over: str) -> tuple[float, float]:
    """The 95% interval (unrounded) of the mean of per-seed metric groups, as ClaimsConfig.interval says."""
    if over == "seed-level":
        return stats.seed_level_ci(runs, digits=None)
    if over == "seeds":
        return stats.bootstrap_ci_over_seeds(runs, digits=None)
    return stats.bootstrap_ci(stats.mean_over(runs), digits=None)


def row_summary(per_seed: list[dict], over: str = "seed-level") -> dict:
    """A row on one metric: mean over seeds, its interval (`interval`), the seeds' spread."""
    averaged = stats.mean_over(per_seed)
    by_seed = [stats.metric_of(g) for g in per_seed]
    return {"mean": round(stats.metric_of(averaged), 2), "ci95": [round(b, 2) for b in interval(per_seed, over)],
            "seeds": [round(v, 2) for v in by_seed],
            "seed_std": round(statistics.stdev(by_seed), 2) if len(by_seed) > 1 else 0.0}


def paired_runs(better: list[dict], worse: list[dict]) -> list[dict]:
    """Per-query differences seed by seed (seed i of both rows trains from the same CLIP); a row of one run (a
    baseline on a shared CLIP) is paired with each run of the other."""
    if len(better) != len(worse) and 1 not in (len(better), len(worse)):
        raise PredictionError(f"rows with {len(better)} and {len(worse)} seeds cannot be paired")
    n = max(len(better), len(worse))
    return [stats.paired_difference(better[i % len(better)], worse[i % len(worse)]) for i in range(n)]


def judge(claim: ClaimSpec, values: dict, min_effect: float, over: str = "seed-level",
          by_metric: Optional[dict[str, float]] = None) -> dict:
    """values: row -> (benchmark, metric) -> metric groups per seed. The claim's comparisons and its verdict,
    each from the interval of the paired per-query difference, seed i against seed i (`interval`), by `verdict`
    with the metric's min_effect (`by_metric`, else `min_effect`). Stored numbers are rounded after deciding."""
    comparisons = []
    for bench, metric in claim.benchmarks.items():
        for name in claim.better:
            better = values[name][(bench, metric)]
            for other in claim.than:
                worse = values[other][(bench, metric)]
                diffs = paired_runs(better, worse)
                lo, hi = interval(diffs, over)
                difference = stats.metric_of(stats.mean_over(diffs))
                effect = (by_metric or {}).get(metric, min_effect)
                saturated = min(stats.metric_of(stats.mean_over(better)),
                                stats.metric_of(stats.mean_over(worse))) >= SATURATED
                comparisons.append({"benchmark": bench, "metric": metric, "better": name, "other": other,
                                    "difference": round(difference, 2), "ci95": [round(lo, 2), round(hi, 2)],
                                    "min_effect": effect,
                                    "verdict": "inconclusive" if saturated else verdict(difference, lo, hi, effect),
                                    "saturated": saturated})
    held = sum(c["verdict"] == "holds" for c in comparisons)
    failed = sum(c["verdict"] == "does not hold" for c in comparisons)
    return {"id": claim.id, "text": claim.text, "source": claim.source,
            "verdict": combine([c["verdict"] for c in comparisons]), "comparisons": comparisons,
            "summary": f"holds in {held} of {len(comparisons)} comparisons, does not hold in {failed}"}


def claims(cfg: ClaimsConfig) -> dict:
    if not cfg.claims:
        raise PredictionError("the config has no claims to judge: nothing to train (experiments/claims.yaml has them)")
    started = time.time()
    paths = prepare(cfg)
    needed: dict[str, list] = {}  # row -> [(benchmark, metric)], rows in the order claims first name them
    for claim in cfg.claims:
        for name in [*claim.better, *claim.than]:
            for pair in claim.benchmarks.items():
                if pair not in needed.setdefault(name, []):
                    needed[name].append(pair)
    made = cells.run_steps(steps(cfg, paths, needed), cfg.jobs, cfg.threads, _log)
    values: dict = {}  # row -> (benchmark, metric) -> [metric groups per seed]
    rows_out: dict = {}
    for name, pairs in needed.items():
        for bench, metric in pairs:
            per_seed = [evaluate(cfg, paths, name, seed, bench) for seed in row_seeds(cfg, name)]
            if metric not in per_seed[0]:
                raise PredictionError(f"row {name} on {bench} has no metric {metric!r} (has {sorted(per_seed[0])})")
            values.setdefault(name, {})[(bench, metric)] = [p[metric] for p in per_seed]
            rows_out.setdefault(name, {"text": cfg.rows[name].text, "stage": cfg.rows[name].stage})[
                f"{bench}/{metric}"] = row_summary([p[metric] for p in per_seed], cfg.interval)
        if "loss=mur" in cfg.rows[name].overrides:
            rows_out[name]["fluctuation"] = fluctuation_summary(cfg, name)
    report = {"splits": {n: b.split or cfg.split for n, b in cfg.benchmarks.items()}, "seeds": cfg.seeds,
              "clip_per_seed": cfg.clip_per_seed, "interval": cfg.interval, "bench_queries": cfg.bench_queries,
              "min_effect": cfg.min_effect, "rows": rows_out,
              "min_effect_by_metric": cfg.min_effect_by_metric,
              "claims": [judge(c, values, cfg.min_effect, cfg.interval, cfg.min_effect_by_metric)
                         for c in cfg.claims]}
    out = Path(cfg.output_dir)
    previous = out / f"{cfg.report}.json"
    report["changes"] = verdict_changes(json.loads(previous.read_text(encoding="utf-8")) if previous.is_file()
                                        else None, report)
    report["seconds"] = timings(out, made, round(time.time() - started, 1), cfg).get("seconds", 0.0)
    (out / f"{cfg.report}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / f"{cfg.report}.md").write_text(markdown(report, cfg), encoding="utf-8")
    return report


def timings(out: Path, made: dict[str, float], seconds: float, cfg: ClaimsConfig) -> dict:
    """timings.json in output_dir, kept across runs: each step's seconds (`steps_s`; a step made again replaces
    its entry) and the wall-clock seconds of every run that made a step (`runs_s`); `seconds`, their sum, is
    the time the steps took, which a resumed run adds to and a run that made nothing leaves as it was."""
    path = out / "timings.json"
    kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not made:
        return kept
    runs = [*kept.get("runs_s", [kept["seconds"]] if "seconds" in kept else []), seconds]  # older files: one run
    new = {"seconds": round(sum(runs), 1), "runs_s": runs, "workers": cells.workers(cfg.jobs, cfg.threads),
           "threads": cfg.threads, "steps_s": {**kept.get("steps_s", {}), **made}}
    path.write_text(json.dumps(new, indent=1) + "\n", encoding="utf-8")
    return new


INTERVAL_TEXT = {  # ClaimsConfig.interval -> how the report says it
    "seed-level": "the seeds as the sample (mean ± a t interval over the seeds' metrics, widened by the "
                  "queries' bootstrap)",
    "seeds": "a bootstrap over seeds and queries (both resampled)",
    "queries": "a bootstrap over the queries of the seed-averaged values"}


def verdict_changes(old: Optional[dict], new: dict) -> list[dict]:
    """The claims whose verdict differs from the previous report in the same output_dir, with both rules."""
    if not old:
        return []
    before = {c["id"]: c["verdict"] for c in old.get("claims", [])}
    rule = {k: old.get(k) for k in ("interval", "min_effect", "min_effect_by_metric")}
    return [{"id": c["id"], "before": before[c["id"]], "after": c["verdict"], "rule_before": rule}
            for c in new["claims"] if c["id"] in before and before[c["id"]] != c["verdict"]]


def changes_markdown(changes: list[dict]) -> list[str]:
    if not changes:
        return []
    rule = changes[0]["rule_before"]
    by_metric = f", by metric {rule['min_effect_by_metric']}" if rule.get("min_effect_by_metric") else ""
    lines = [f"Verdicts changed since the previous report in this folder (its rule: interval {rule['interval']}, "
             f"min_effect {rule['min_effect']}{by_metric}; the new numbers are below):", "",
             "| claim | before | now |", "|---|---|---|"]
    return lines + [f"| {c['id']} | {c['before']} | {c['after']} |" for c in changes] + [""]


def fluctuation_text(f: Optional[dict]) -> str:
    """A loss=mur row's measured fluctuations for the Rows table ("" for other rows)."""
    if f is None:
        return ""
    if not f:
        return " (fluctuations not logged: trained before train/stage2.py logged them)"
    return (f" (measured: cos(f̂, f) {f['target_cos']}, min {f['target_cos_min']}; σ {f['sigma']}, spread "
            f"{f['sigma_spread']} across samples, {f['sigma_across_batches']} across batches)")


def markdown(report: dict, cfg: ClaimsConfig) -> str:
    show = stats.shown  # the stored values, rounded as a reader of claims.json rounds them
    effects = ", ".join(f"{m} {v}" for m, v in sorted(report.get("min_effect_by_metric", {}).items()))
    lines = ["# Claims of the seed papers, measured on the toy world", "",
             f"Splits {report['splits']}, {report['bench_queries']} queries per benchmark split, seeds "
             f"{report['seeds']} (each seed trains {'its own stage 0 CLIP and ' if report['clip_per_seed'] else ''}"
             f"stage I and II{'' if report['clip_per_seed'] else ' on one shared stage 0 CLIP'}). "
             "A row's number is the mean over seeds of its metric; [lo, hi] is its 95% interval, "
             f"{INTERVAL_TEXT[report['interval']]}; "
             "± is the seeds' standard deviation. A comparison (the paired per-query difference, seed i against "
             "seed i, its interval made the same way) **holds** when its interval lies above 0 and the difference "
             "is at least min_effect, **does not hold** when its interval lies below min_effect, and is "
             "**inconclusive** otherwise (also when both rows are at the metric's ceiling); min_effect is "
             f"{report['min_effect']} point(s){f' ({effects})' if effects else ''}. A claim is the conjunction of "
             "its comparisons.", "",
             *changes_markdown(report.get("changes", [])),
             "| claim | verdict | comparisons | what |", "|---|---|---|---|"]
    lines += [f"| {c['id']} | **{c['verdict']}** | {c['summary'].replace(' comparisons,', ';')} | {c['text']} |"
              for c in report["claims"]]
    for c in report["claims"]:
        lines += ["", f"## {c['id']}: {c['verdict']}", "", c["text"] + (f" ({c['source']})" if c["source"] else ""), "",
                  "| row | benchmark / metric | mean | 95% CI | ± seeds |", "|---|---|---|---|---|"]
        listed = set()
        for comp in c["comparisons"]:
            for name in (comp["better"], comp["other"]):
                key = f"{comp['benchmark']}/{comp['metric']}"
                if (name, key) in listed:
                    continue
                listed.add((name, key))
                r = report["rows"][name][key]
                lo, hi = r["ci95"]
                lines.append(f"| {name} | {key} | {show(r['mean'])} | [{show(lo)}, {show(hi)}] | "
                             f"{show(r['seed_std'])} |")
        lines += ["", "| comparison | difference | 95% CI | verdict |", "|---|---|---|---|"]
        lines += [f"| {x['better']} − {x['other']} on {x['benchmark']} {x['metric']} | {show(x['difference'], True)} "
                  f"| [{show(x['ci95'][0], True)}, {show(x['ci95'][1], True)}] | {x['verdict']}"
                  f"{' (saturated)' if x['saturated'] else ''} |" for x in c["comparisons"]]
    lines += ["", "## Rows", "", "| row | stage | what |", "|---|---|---|"]
    lines += [f"| {n} | {r['stage']} | {r['text']}{fluctuation_text(r.get('fluctuation'))} |"
              for n, r in report["rows"].items()]
    return "\n".join(lines) + "\n"
