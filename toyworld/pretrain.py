"""The pretrained toy CLIP: the toy world's counterpart of a CLIP trained on web-scale image-text pairs.

A user of the toolkit starts from a CLIP pretrained on billions of pairs and adapts it to a domain (stage 0); the
toy world's flow starts the same way, from a CLIP pretrained here on an *open-domain* corpus that is broader than
any benchmark world:

* every shape, colour and background word of every world plus words no world uses (`scene.OPEN_DOMAIN`), mixed
  freely in one scene (a star on a gray background beside a teal ring);
* captions of many kinds (`describe`): the world's full description, partial ones (one object, objects without
  positions, only colours or only shapes), relations ("a red circle to the left of a blue star"), counts;
  every scene drawn `captions_per_scene` times, each drawing with a caption of its own;
* no scene that a benchmark of the checked worlds (`CHECK_WORLDS`, as the shipped configs build them) shows:
  such draws are redrawn, and how many were is on the card.

`python -m toyworld pretrain` rebuilds it through the toolkit's own flow (this corpus -> the caption job ->
stage 0 with `train/configs/toy_stage0_pretrain.yaml`) and writes the export with its card (`toyworld/pretrained/`).
The steps run as commands, so this package does not import the pipeline or the trainers.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from cir.config import ranged

from .scene import OPEN_DOMAIN, SLOT_PHRASE, SLOTS, VOCABULARIES, Obj, Scene, Vocabulary, caption, random_scene
from .world import dump_json, stream, write_image, written_into_place

if TYPE_CHECKING:  # torch and open_clip load only when a CLIP is scored
    from cir.backbone import Backbone

# The caption kinds of the corpus and how often each is drawn (`describe`).
CAPTION_KINDS = {"full": 0.3, "objects": 0.2, "one": 0.15, "relation": 0.15, "count": 0.1, "attributes": 0.1}
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass
class CorpusConfig:
    """The pretraining corpus; each field is also a flag of `python -m toyworld pretrain`."""
    seed: int = ranged(0, help="root of the corpus's random streams (named apart from every world's)")
    num_scenes: int = ranged(100000, min=1, help="open-domain scenes (independent draws)")
    captions_per_scene: int = ranged(2, min=1, help="drawings of each scene, each with a caption of its own")
    image_size: int = ranged(64, min=16, max=1024, help="side in pixels")


def _article(words: str) -> str:
    return f"a {words}"


def _object_phrase(o: Obj, rng: random.Random, size: Optional[bool] = None, where: Optional[bool] = None) -> str:
    """'a [size] colour shape [position]'; size and position each included at random unless told."""
    size = rng.random() < 0.5 if size is None else size
    where = rng.random() < 0.3 if where is None else where
    words = f"{o.size} {o.colour} {o.shape}" if size else f"{o.colour} {o.shape}"
    return _article(words) + (f" {SLOT_PHRASE[o.slot]}" if where else "")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background(scene: Scene, rng: random.Random, p: float = 0.5) -> str:
    """' on a gray background' (or a shorter form) with probability p, else ''."""
    if rng.random() >= p:
        return ""
    return rng.choice((f" on a {scene.background} background", f" on {scene.background}",
                       f" against a {scene.background} background"))


def describe(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(kind, caption): one caption of the scene, of a kind drawn from CAPTION_KINDS. Every caption is true of
    the scene; most say only part of it."""
    kinds = [k for k in CAPTION_KINDS if k != "relation" or len(scene.objects) > 1]
    kind = rng.choices(kinds, weights=[CAPTION_KINDS[k] for k in kinds])[0]
    objs = list(scene.objects)
    prefix = rng.choice(OPEN_DOMAIN.caption_prefixes)
    if kind == "full":  # the benchmark worlds' own caption form
        text = caption(scene)
    elif kind == "objects":  # every object, in any order, positions mostly left out
        rng.shuffle(objs)
        text = _join([_object_phrase(o, rng) for o in objs]) + _background(scene, rng)
    elif kind == "one":  # one object of several: a partial description
        text = _object_phrase(rng.choice(objs), rng) + _background(scene, rng, 0.3)
    elif kind == "relation":
        a, b = sorted(rng.sample(objs, 2), key=lambda o: SLOTS.index(o.slot))  # a is left of b
        if rng.random() < 0.5:
            text = f"{_object_phrase(a, rng, where=False)} to the left of {_object_phrase(b, rng, where=False)}"
        else:
            text = f"{_object_phrase(b, rng, where=False)} to the right of {_object_phrase(a, rng, where=False)}"
        text += _background(scene, rng, 0.3)
    elif kind == "count":
        n = len(objs)
        noun = rng.choice(("shape", "object")) + ("s" if n > 1 else "")
        if rng.random() < 0.5:
            text = f"{NUMBERS[n]} {noun} on a {scene.background} background"
        else:
            text = f"{NUMBERS[n]} {noun}: {_join([_object_phrase(o, rng, size=False, where=False) for o in objs])}"
    else:  # attributes: only the colours or only the shapes
        if rng.random() < 0.5:
            colours = list(dict.fromkeys(o.colour for o in objs))
            text = f"{_join(colours)} shape{'s' if len(objs) > 1 else ''}{_background(scene, rng, 0.7)}"
        else:
            text = _join([_article(o.shape) for o in objs]) + _background(scene, rng, 0.7)
    # an opening ("a photo of ") always on the full form, as the worlds' captions have it; on half the others
    return kind, prefix + text if kind == "full" or rng.random() < 0.5 else text


def corpus_scene(seed: int, i: int, excluded: frozenset = frozenset()) -> tuple[Scene, int]:
    """Scene i of the corpus: an open-domain scene from its own stream, redrawn while it is one a checked
    benchmark shows; and how many draws were skipped so."""
    rng = stream(seed, "pretrain-scene", i)
    skipped = 0
    while True:
        scene = random_scene(rng, vocab=OPEN_DOMAIN)
        if scene.key not in excluded:
            return scene, skipped
        skipped += 1


def write_corpus_part(images: Path, cfg: CorpusConfig, start: int, stop: int, excluded: frozenset) -> dict:
    """Scenes [start, stop) as `pt_{scene}_{k}.{jpg|png}` + `.txt` caption + `.json` scene; counts by caption
    kind, and how many draws were skipped as a benchmark's scene."""
    counts: dict[str, int] = {}
    skipped = 0
    for i in range(start, stop):
        scene, skips = corpus_scene(cfg.seed, i, excluded)
        skipped += skips
        for k in range(cfg.captions_per_scene):
            rng = stream(cfg.seed, f"pretrain-image-{k}", i)
            fmt = "png" if rng.random() < 0.2 else "jpg"
            kind, text = describe(scene, rng)
            stem = images / f"pt_{i:07d}_{k}"
            meta = write_image(stem, scene, rng, fmt, cfg.image_size)
            meta.update(caption=text, caption_kind=kind, file=f"{stem.name}.{fmt}")
            stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
            dump_json(meta, stem.with_suffix(".json"))
            counts[kind] = counts.get(kind, 0) + 1
    return {"caption_kinds": counts, "skipped_benchmark_scenes": skipped}


def benchmark_keys(world_dirs: Iterable[Path]) -> frozenset:
    """The canonical keys of every scene in every benchmark (bench/*/toy_scenes.json) of these toy worlds."""
    keys = set()
    for world in world_dirs:
        files = sorted(Path(world).glob("bench/*/toy_scenes.json"))
        if not files:
            raise FileNotFoundError(f"{world} has no bench/*/toy_scenes.json: not a toy world with benchmarks")
        for f in files:
            keys.update(s["key"] for s in json.loads(f.read_text(encoding="utf-8")).values())
    return frozenset(keys)


# --------------------------------------------------------------------------------- how strong a CLIP is

def heldout_scenes(vocab: Vocabulary, n: int, seed: int = 0) -> list[Scene]:
    """n distinct scenes of one vocabulary from a stream no corpus or world draws from (the CLIP's held-out
    caption -> image check)."""
    rng = random.Random(f"{seed}:clip-heldout:{vocab.name}")
    scenes, seen = [], set()
    while len(scenes) < n:
        s = random_scene(rng, vocab=vocab)
        if s.key not in seen:
            seen.add(s.key)
            scenes.append(s)
    return scenes


def caption_retrieval(bb: "Backbone", vocab: Vocabulary, n: int = 1000, seed: int = 0, batch: int = 250) -> dict:
    """Caption -> image R@1 and R@5 (percent) among n held-out scenes of `vocab`, each drawn once and described by
    its full canonical caption: how well the CLIP (`cir.backbone.create_backbone(DIR)`) tells scenes of that
    vocabulary apart."""
    import torch

    from cir.backbone import preprocess_batch
    from .render import layout, render

    model = bb.model.eval()
    scenes = heldout_scenes(vocab, n, seed)
    rng = random.Random(f"{seed}:clip-heldout-render:{vocab.name}")
    images = [render(s, layout(s, rng), bb.image_size) for s in scenes]
    with torch.no_grad():
        img = torch.cat([model.encode_image(preprocess_batch(bb.preprocess, images[i:i + batch]), normalize=True)
                         for i in range(0, n, batch)])  # [n, D]
        txt = torch.cat([model.encode_text(bb.tokenizer([caption(s) for s in scenes[i:i + batch]]), normalize=True)
                         for i in range(0, n, batch)])  # [n, D]
    sims = txt @ img.T  # [n captions, n images]
    return {"r1": round(recall(sims, 1), 2), "r5": round(recall(sims, 5), 2), "n": n}


def recall(sims, k: int) -> float:
    """Percent of rows whose own column (the diagonal) is among their k highest: sims [n, n]."""
    rank = (sims > sims.diag()[:, None]).sum(1)  # [n] columns scoring above the right one
    return 100 * (rank < k).float().mean().item()


STRENGTH_VOCABS = {"open": OPEN_DOMAIN, **VOCABULARIES}  # where a CLIP's strength is measured (its card)


def clip_strength(clip_dir: str, n: int = 1000) -> dict:
    """caption_retrieval in the open domain and in each benchmark world's vocabulary, the CLIP loaded once."""
    from cir.backbone import create_backbone

    bb = create_backbone(clip_dir)
    return {name: caption_retrieval(bb, vocab, n) for name, vocab in STRENGTH_VOCABS.items()}

# --------------------------------------------------------------------------------- the rebuild command

ROOT = Path(__file__).resolve().parent.parent  # the repository: beam_runner.py and train/ are run from here
CHECK_WORLDS = ("shapes", "gems")  # the worlds (seed 0, 1,000 queries) every shipped config builds
CHECK_QUERIES = 1000
TRAIN_CONFIG = "train/configs/toy_stage0_pretrain.yaml"
CARD = "README.md"  # the model card beside the weights (its numbers also in card.json)


class Timings(dict):
    """Seconds of each step of the rebuild when it did its work, kept in a file: a rerun that reuses a step (or
    follows a killed run) keeps the time the step took."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.is_file() else {})
        self.path = path

    def record(self, name: str, seconds: float) -> None:
        self[name] = round(seconds, 1)
        self.path.write_text(json.dumps(self, indent=1) + "\n")


def _command(name: str, cmd: list[str], timings: Timings) -> None:
    import subprocess

    print(f"[pretrain] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.time()
    code = subprocess.call(cmd, cwd=ROOT)
    if code:
        raise SystemExit(f"[pretrain] {name} failed (exit {code}): {' '.join(cmd)}")
    timings.record(name, time.time() - start)


def write_corpus(out: Path, cfg: CorpusConfig, excluded: frozenset, jobs: int) -> dict:
    """The whole corpus under out/images, written by `jobs` processes into a temporary folder renamed into place;
    out/corpus.json holds the config and counts (its presence means the corpus is whole)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cir.cli import cores

    with written_into_place(out) as tmp:
        (tmp / "images").mkdir()
        jobs = jobs if jobs > 0 else cores()
        bounds = [cfg.num_scenes * j // jobs for j in range(jobs + 1)]
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = [pool.submit(write_corpus_part, tmp / "images", cfg, a, b, excluded)
                     for a, b in zip(bounds, bounds[1:])]
            results = [p.result() for p in parts]
        kinds: dict[str, int] = {}
        for r in results:
            for k, n in r["caption_kinds"].items():
                kinds[k] = kinds.get(k, 0) + n
        card = {"config": dataclasses.asdict(cfg), "images": cfg.num_scenes * cfg.captions_per_scene,
                "caption_kinds": dict(sorted(kinds.items())),
                "skipped_benchmark_scenes": sum(r["skipped_benchmark_scenes"] for r in results),
                "checked_benchmark_scenes": len(excluded), "checked_worlds": list(CHECK_WORLDS)}
        dump_json(card, tmp / "corpus.json")
    return card


def build_parser():
    import argparse

    from cir.config import add_arguments

    p = argparse.ArgumentParser(prog="python -m toyworld pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/pretrain", help="the corpus, its caption dataset and the stage 0 run")
    p.add_argument("--out", default="toyworld/pretrained/toy-clip-64",
                   help="where the export and its card go (an open_clip local directory)")
    add_arguments(p, CorpusConfig)
    p.add_argument("--jobs", type=int, default=0, help="processes drawing the corpus (0: one per core)")
    p.add_argument("--check-queries", type=int, default=CHECK_QUERIES,
                   help="queries per split of the checked worlds' benchmarks (the shipped configs' number)")
    p.add_argument("--heldout", type=int, default=1000, help="held-out scenes per vocabulary on the card")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides of {TRAIN_CONFIG} (max_steps=3000, ...)")
    return p


def run(argv: Optional[list[str]] = None) -> int:
    """Check worlds -> corpus -> caption job -> stage 0 -> export + card. Each step is skipped when its output is
    whole (stage 0 resumes from its last checkpoint), so a killed rebuild is run again as it was."""
    import shutil

    from cir.config import ConfigError, from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = from_args(CorpusConfig, args)
    except ConfigError as err:
        parser.error(str(err))
    if args.check_queries < 1 or args.heldout < 5:
        parser.error(f"--check-queries must be at least 1 and --heldout at least 5, not {args.check_queries} and "
                     f"{args.heldout}")
    work, out = (ROOT / args.work).resolve(), (ROOT / args.out).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "card.json").is_file())):
        parser.error(f"--out {out} exists and is not a pretrained toy CLIP (no card.json); refusing to replace it")
    work.mkdir(parents=True, exist_ok=True)
    timings = Timings(work / "timings.json")
    py = sys.executable
    worlds = [work / "check_worlds" / v for v in CHECK_WORLDS]
    for vocab, world in zip(CHECK_WORLDS, worlds):
        if not (world / "world.json").is_file():
            _command(f"check world {vocab}", [py, "beam_runner.py", "toy", "--output", str(world), "--num-images",
                                              "1", "--bench-queries", str(args.check_queries), "--vocabulary", vocab,
                                              "--seed", "0", "--overwrite"], timings)
    corpus = work / "corpus"
    if (corpus / "corpus.json").is_file() and json.loads((corpus / "corpus.json").read_text())["config"] != \
            dataclasses.asdict(cfg):
        parser.error(f"{corpus} holds a corpus of another config; delete it or pass that config")
    if not (corpus / "corpus.json").is_file():
        start = time.time()
        print(f"[pretrain] corpus: {cfg.num_scenes} scenes x {cfg.captions_per_scene} into {corpus}", file=sys.stderr)
        write_corpus(corpus, cfg, benchmark_keys(worlds), args.jobs)
        timings.record("corpus", time.time() - start)
    captions = work / "captions"
    if not (captions / "stats.json").is_file():
        _command("caption job", [py, "beam_runner.py", "caption", "--input", str(corpus / "images"), "--output",
                                 str(captions), "--shard-size", "5000", "--runner", "DirectRunner"], timings)
    stage0 = work / "stage0"
    trained_before = timings.get("stage 0") if (stage0 / "final" / "open_clip_model.safetensors").is_file() else None
    _command("stage 0", [py, "train/stage0.py", "--config", TRAIN_CONFIG, f"output_dir={stage0}",
                         f"data.train=['{captions}']", *args.overrides], timings)
    if trained_before is not None:  # stage 0 found its run finished and did nothing
        timings.record("stage 0", trained_before)
    start = time.time()
    strength = clip_strength(str(stage0 / "final"), args.heldout)
    # the held-out scenes come from a stream of their own; how many the corpus shows too (drawn otherwise)
    shown = {json.loads(p.read_text(encoding="utf-8"))["key"] for p in (corpus / "images").glob("*_0.json")}
    for name, vocab in STRENGTH_VOCABS.items():
        strength[name]["in_corpus"] = sum(s.key in shown for s in heldout_scenes(vocab, strength[name]["n"]))
    timings.record("held-out check", time.time() - start)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy2(stage0 / "final" / name, out / name)
    write_card(out, json.loads((corpus / "corpus.json").read_text()), stage0, strength, dict(timings))
    print(f"[pretrain] the pretrained toy CLIP: {out} (card: {out / CARD})", file=sys.stderr)
    return 0


def write_card(out: Path, corpus: dict, stage0: Path, strength: dict, timings: dict) -> None:
    """card.json (every number) and README.md (the same, for people) beside the weights."""
    import hashlib

    config = json.loads((stage0 / "config.json").read_text(encoding="utf-8"))
    log = [json.loads(line) for line in (stage0 / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    weights = (out / "open_clip_model.safetensors").read_bytes()
    card = {"corpus": corpus, "train_config": config, "final_loss": log[-1].get("loss") if log else None,
            "steps": config["max_steps"], "seconds": timings, "heldout_caption_to_image": strength,
            "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_mib": round(len(weights) / 2**20, 1)}
    dump_json(card, out / "card.json")
    rows = "\n".join(f"| {name} | {s['r1']:.1f} | {s['r5']:.1f} | {s['in_corpus']} |" for name, s in strength.items())
    kinds = ", ".join(f"{k} {n:,}" for k, n in corpus["caption_kinds"].items())
    total = sum(timings.values())
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    (out / CARD).write_text(f"""# The pretrained toy CLIP

The toy world's stand-in for a CLIP pretrained on web-scale pairs: every toy flow's stage 0 starts from it and
adapts it to a world's captions, as a user adapts a pretrained CLIP to their domain (docs/TOYWORLD.md).
Architecture `{config["clip"]["model"]}` (open_clip local directory: load it with
`cir.backbone.create_backbone("{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")`).

- **Corpus** (toyworld/pretrain.py): {corpus["config"]["num_scenes"]:,} open-domain scenes (every world's words
  and words no world uses, mixed) drawn {corpus["config"]["captions_per_scene"]} times each, {corpus["images"]:,}
  images of {corpus["config"]["image_size"]} px with a caption each; caption kinds: {kinds}. Seed
  {corpus["config"]["seed"]}.
- **Disjoint from the benchmarks**: {corpus["checked_benchmark_scenes"]:,} distinct scenes of the benchmarks of
  the {" and ".join(corpus.get("checked_worlds", CHECK_WORLDS))} worlds (seed 0) were checked; the corpus
  redrew {corpus["skipped_benchmark_scenes"]} draws that matched one of them exactly, so it shows none.
- **Training**: stage 0 (`{TRAIN_CONFIG}`), {config["max_steps"]} steps of batch {config["data"]["batch_size"]},
  lr {config["optim"]["lr"]}; final loss {card["final_loss"]:.3f}.
- **Time** on the machine that built it: {total / 60:.1f} min ({steps}).
- **Weights**: open_clip_model.safetensors, {card["weights_mib"]} MiB, sha256 {card["weights_sha256"][:16]}...

Held-out caption -> image retrieval among {strength["open"]["n"]:,} distinct scenes of each vocabulary, from a random stream of their
own (each scene's full caption against all of their images; percent). The last column counts those scenes that the
corpus also shows (drawn otherwise: the open domain's one-object scenes are few and the corpus holds most):

| vocabulary | R@1 | R@5 | scenes also in the corpus |
|---|---|---|---|
{rows}

Rebuild: `python -m toyworld pretrain` (deterministic on one machine; another machine's float order gives a
slightly different CLIP). Score any CLIP the same way: `python -m toyworld strength DIR`.
""", encoding="utf-8")
