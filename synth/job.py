"""`python beam_runner.py synth --input CAPTION_DIR --output DIR --quality low|high [...]`: CIR triplets.

low  (mined, real targets): k-NN over CLIP image embeddings (`emb.npy`) and/or caption TF-IDF, pairs kept in
     a similarity band, modification text from the caption word diff, other neighbours as hard negatives.
     (`--llm MODEL` has a language model write the modification text instead: synth.llm, both qualities.)
high (edited targets): the reference is edited and the result becomes the target; `--editor toy` is the toy
     world's exact editor (re-renders the edited scene: the one place that knows the toy world).

caption shards --read--> samples --(low) mine pairs | (high) pick sources + edit--> triplet specs
  --assign shard (skip committed shards)--> join reference/target images --> write shards --> stats

Here: the configuration, reading, assembly and the pipeline; the neighbour graph is synth.knn, mined specs and
hard negatives synth.mined, edited specs synth.edited.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import sys
import time
from dataclasses import asdict, replace
from typing import Iterator, Optional

import apache_beam as beam
import numpy as np

from cir import dataset as ds
from cir import schema
from cir.config import add_arguments, from_args
from pipeline import jobs, neardup
from pipeline.images import ImageRejected, prepare_image
from pipeline.sources import input_fingerprint
from synth.config import EDIT_FIELDS, MODTEXT_FIELDS, SynthConfig, check_prompt
from synth.edited import EditSources, PickSources
from synth.knn import NeighbourGraph
from synth.mined import MinePairs, neighbour_keys, with_negatives
from synth.specs import FAILED, REJECTED, SpecOrder, each, image_fields

LOG = logging.getLogger("synth")
KIND = "triplet"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beam_runner.py synth", description="Synthesize CIR triplets (SPEC.md).",
                                epilog="Other flags are Beam PipelineOptions (--runner, --direct_num_workers, ...).")
    add_arguments(p, SynthConfig, required=("input", "output", "quality"))
    p.add_argument("--overwrite", action="store_true", help="replace a dataset of another configuration")
    return p


# ------------------------------------------------------------------------------------------ reading

class ReadCaptionShard(beam.DoFn):
    """A caption shard -> (key, sample): caption, embedding (if any), where the image lies in the shard
    (`where`: path, stamp, offset, size), when the job edits images (`with_bytes`) the image's bytes, and with
    `fingerprints` its near-duplicate fingerprint ("fp", for --exclude). A mined triplet's images are read again
    from `where` where its shard is written (read_images): they cross no grouping."""

    def __init__(self, with_bytes: bool, fingerprints: bool = False):
        self.with_bytes, self.fingerprints = with_bytes, fingerprints

    def process(self, path: str) -> Iterator[tuple[str, dict]]:
        stamp = ds.shard_stamp(path)
        for raw, spans in ds.shard_members(path):
            try:
                sample = schema.CaptionSample.from_webdataset(raw)
            except schema.SchemaError as err:
                yield beam.pvalue.TaggedOutput(FAILED, ds.failed_row(f"{path}::{raw['__key__']}", "read",
                                                                     "incomplete_sample", str(err)))
                continue
            image = sample.image  # with emb and emb_clip (which CLIP made it), carried into the triplets
            fields = {"key": sample.key, "image": image.data if self.with_bytes else None,
                      "where": (path, stamp, *spans[image.ext]), "ext": image.ext,
                      "caption": sample.caption, "emb": image.emb, "emb_clip": image.emb_clip}
            if self.fingerprints:
                try:
                    fields["fp"] = neardup.fingerprint(prepare_image(image.data).image)
                except ImageRejected as err:
                    yield beam.pvalue.TaggedOutput(FAILED, ds.failed_row(f"{path}::{raw['__key__']}", "read",
                                                                         err.reason, str(err)))
                    continue
            yield sample.key, fields


class DropExcluded(neardup.MatchExcluded):
    """(key, sample with "fp") -> (key, sample without it), or a failed row `excluded` naming the file of the
    --exclude folders its image duplicates: an excluded image is no reference, target or hard negative."""

    def process(self, item: tuple[str, dict], table: dict) -> Iterator:
        key, sample = item
        sample = dict(sample)
        match = self.match(sample.pop("fp"), table)
        if match is None:
            yield key, sample
        else:
            yield beam.pvalue.TaggedOutput(FAILED, ds.failed_row(key, "exclude", "excluded",
                                                                 f"an exact or near duplicate of the excluded "
                                                                 f"image {match}"))


def _summary(item: tuple[str, dict]) -> tuple[str, str, Optional[np.ndarray]]:
    key, sample = item
    return key, sample["caption"], sample["emb"]


# ------------------------------------------------------------------------------------------ assembly

def _needs(spec: dict, neighbours: bool) -> Iterator[tuple[str, tuple[int, str, str]]]:
    """(image key, (shard, triplet key, role)): each image a triplet takes from the caption dataset (a mined
    triplet's two; an edited one carries both its own), and with `neighbours` its reference's nearest real images."""
    for role in ("ref", "tgt"):
        if f"{role}_image" not in spec:
            yield spec[f"{role}_key"], (spec["shard"], spec["key"], role)
    if neighbours:
        yield spec["ref_key"], (spec["shard"], spec["key"], "neighbours")


def _route(element) -> Iterator[tuple[int, tuple[str, str, object]]]:
    """An image (or its nearest real images) and the triplets that need it -> one part per (triplet, role), keyed
    by the triplet's shard: the bytes go straight to the shard grouping."""
    _, grouped = element
    found = {"image": next(iter(grouped.get("image", ())), None),
             "neighbours": next(iter(grouped.get("neighbours", ())), None)}
    for shard, triplet, role in grouped["need"]:
        part = found["neighbours" if role == "neighbours" else "image"]
        if part is not None:
            yield shard, (triplet, role, part)


def _by_shard(spec: dict) -> tuple[int, dict]:
    return spec["shard"], spec


def read_images(parts: list[dict]) -> None:
    """Fill in, in place, the bytes of the images that came without them (`image` None), from where they lie in
    their caption shards: each shard opened once, each image read once."""
    wanted: dict[tuple[str, str], dict[tuple[int, int], list[dict]]] = {}  # (shard, stamp) -> span -> its parts
    for part in parts:
        if part["image"] is None:
            path, stamp, offset, size = part["where"]
            wanted.setdefault((path, stamp), {}).setdefault((offset, size), []).append(part)
    for (path, stamp), at in wanted.items():
        spans = sorted(at)
        for span, data in zip(spans, ds.read_spans(path, stamp, spans)):
            for part in at[span]:
                part["image"] = data


def _assemble(spec: dict, parts: dict[str, dict]) -> dict:
    """A triplet from its spec and the images it does not carry ("ref" and "tgt" of a mined triplet)."""
    spec = dict(spec)
    for role in ("ref", "tgt"):
        if f"{role}_image" not in spec:
            spec.update(image_fields(role, parts[role]))
    return spec


def _assemble_shard(element, cfg: SynthConfig) -> tuple[int, list[dict]]:
    """(shard, {"spec": specs, "part": (triplet key, role, image or neighbours), "scored": filter score rows}) ->
    (shard, its triplets and score rows as shard items), the input jobs.WriteShard takes. Edited triplets get their
    hard negatives here."""
    shard, grouped = element
    parts: dict[str, dict] = {}
    for triplet, role, part in grouped.get("part", ()):
        parts.setdefault(triplet, {})[role] = dict(part) if role in ("ref", "tgt") else part
    read_images([p[role] for p in parts.values() for role in ("ref", "tgt") if role in p])
    triplets = [_assemble(spec, parts.get(spec["key"], {})) for spec in grouped.get("spec", ())]
    if cfg.quality == "high" and cfg.hard_negatives > 0:
        triplets = [with_negatives(t, parts.get(t["key"], {}).get("neighbours"), cfg) for t in triplets]
    return shard, [{"sample": t} for t in triplets] + [{"scores": row} for row in grouped.get("scored", ())]


def to_webdataset(t: dict) -> dict:
    meta = {k: t[k] for k in ("ref_key", "tgt_key", "ref_caption", "tgt_caption", "quality", "method", "scores",
                              "hard_negatives", "seed")}
    meta.update({k: t[k] for k in ("changes", "edit", "provenance", "mod_template") if k in t})
    ref, tgt = (schema.Picture(t[f"{role}_image"], t[f"{role}_ext"], t.get(f"{role}_emb"), t.get(f"{role}_emb_clip"))
                for role in ("ref", "tgt"))
    return schema.TripletSample(t["key"], ref, tgt, t["mod"], meta).to_webdataset()


def index_row(t: dict, shard_name: str) -> dict:
    return {"key": t["key"], "shard": shard_name, "ref_key": t["ref_key"], "tgt_key": t["tgt_key"], "mod": t["mod"],
            "quality": t["quality"], "method": t["method"], "ref_caption": t["ref_caption"],
            "tgt_caption": t["tgt_caption"]}


class Finalize(beam.DoFn):
    def __init__(self, output: str, started: float):
        self.output, self.started = output, started

    def process(self, _, written: list, failed: list, rejected: list, sources: int, candidates: int
                ) -> Iterator[dict]:
        by_reason: dict[str, int] = {}
        for reason in rejected:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        yield jobs.finalize(self.output, self.started, written, failed,
                            {"inputs": sources, "candidates": candidates,
                             "rejected_by_reason": dict(sorted(by_reason.items()))}, LOG.name)


def _times(n: int, k: int) -> int:
    return n * k


def build(p: beam.Pipeline, cfg: SynthConfig, started: float, vocab: Optional[list[str]] = None,
          excluded_files: Optional[list[str]] = None) -> None:
    """excluded_files: the images of the --exclude folders (pipeline.neardup.excluded_images)."""
    shard_paths = ds.shard_urls(cfg.input)
    read = (p | "ShardPaths" >> beam.Create(shard_paths) | "Reshuffle" >> beam.Reshuffle()
            | "ReadShards" >> beam.ParDo(ReadCaptionShard(with_bytes=cfg.quality == "high",
                                                          fingerprints=bool(cfg.exclude)))
            .with_outputs(FAILED, main="samples"))
    samples, early_failed = read.samples, [read[FAILED]]
    if cfg.exclude:  # the excluded folders' hashes as a side input (pipeline.neardup)
        table = p | "ExcludedFiles" >> beam.Create(excluded_files or []) | neardup.ExcludedTable()
        drop = DropExcluded(cfg.near_dup_bits, cfg.near_dup_pixels, cfg.near_dup_tolerance)
        kept = samples | "DropExcluded" >> beam.ParDo(drop, beam.pvalue.AsSingleton(table)).with_outputs(
            FAILED, main="samples")
        samples = kept.samples
        early_failed.append(kept[FAILED])
    shard_args = (cfg.output, cfg.shard_size, cfg.shard_prefix, KIND)
    neighbours = None  # high quality with hard negatives: (image key, its nearest real images)
    scored = None  # the diffusers editor: (shard, filter scores) of every candidate
    if cfg.quality == "low":
        hoods, edit_failed = samples | "Summaries" >> beam.Map(_summary) | "Neighbours" >> NeighbourGraph(cfg)
        mined = hoods | "Mine" >> beam.ParDo(MinePairs(cfg)).with_outputs(REJECTED, main="specs")
        candidates, rejected = mined.specs, mined[REJECTED]
        specs = candidates if not cfg.num_triplets else (
            candidates | "Take" >> beam.combiners.Top.Of(cfg.num_triplets, key=SpecOrder(cfg.seed), reverse=True)
            | "EachSpec" >> beam.FlatMap(each))
        count = specs | "CountSpecs" >> beam.combiners.Count.Globally()
        assigned = specs | "AssignShard" >> beam.ParDo(jobs.AssignShard(*shard_args), beam.pvalue.AsSingleton(count))
    else:
        # Shards are assigned to *sources* before editing, so a rerun skips the expensive edits of
        # committed shards; each source's triplets land in its shard.
        chosen = samples | "PickSources" >> PickSources(cfg)
        expected = (chosen | "CountSources" >> beam.combiners.Count.Globally()
                    | "TimesKeep" >> beam.Map(_times, cfg.keep_per_source if cfg.editor != "toy" else 1))
        sources = chosen | "AssignShard" >> beam.ParDo(jobs.AssignShard(*shard_args), beam.pvalue.AsSingleton(expected))
        candidates, edit_failed, rejected, scored = sources | "Edit" >> EditSources(cfg, vocab or [])
        if cfg.hard_negatives > 0:  # each reference's nearest real images, attached where triplets are assembled
            hoods, _ = samples | "NeighbourSummaries" >> beam.Map(_summary) | "Neighbours" >> NeighbourGraph(cfg)
            neighbours = hoods | "NeighbourKeys" >> beam.Map(neighbour_keys)
        assigned = candidates
    if rewrites_mod_text(cfg):
        from synth.llm import LLMModText

        # After shard assignment: a rerun does not pay for the texts of committed shards.
        written_by_llm = assigned | "LLMModText" >> LLMModText(cfg.llm, cfg.llm_prompt, cfg.llm_max_new_tokens,
                                                               cfg.device, cfg.batch_size, cfg.llm_chat == "on")
        assigned = written_by_llm.specs
        rejected = (rejected, written_by_llm[REJECTED]) | "WithLLMRejections" >> beam.Flatten()
    # A mined triplet's images join it by key (each image once, where it lies in its caption shard, not its
    # bytes) and go, keyed by its shard, into the shard grouping, where each shard's triplets are assembled, their
    # images read and written: image bytes cross no grouping. An edited triplet carries its own images from the
    # editor (they cross the shard grouping): only its reference's nearest real images (keys and captions) join it.
    needs = assigned | "Needs" >> beam.FlatMap(_needs, neighbours is not None)
    by_key = {"need": needs, **({"image": samples} if cfg.quality == "low" else {}),
              **({"neighbours": neighbours} if neighbours is not None else {})}
    by_shard = {"spec": assigned | "SpecByShard" >> beam.Map(_by_shard),
                **({"scored": scored} if scored is not None else {})}
    if len(by_key) > 1:
        join = "JoinImages" if "image" in by_key else "JoinNeighbours"
        by_shard["part"] = by_key | join >> jobs.MeasuredCoGroupByKey() | "Route" >> beam.FlatMap(_route)
    written = (by_shard | "GroupByShard" >> jobs.MeasuredCoGroupByKey() | "Assemble" >> beam.Map(_assemble_shard, cfg)
               | "Write" >> beam.ParDo(jobs.WriteShard(cfg.output, cfg.shard_prefix, to_webdataset, index_row,
                                                       LOG.name)))
    failed = (*early_failed, edit_failed) | "AllFailed" >> beam.Flatten()
    n_sources = read.samples | "CountInputs" >> beam.combiners.Count.Globally()  # excluded ones included
    n_candidates = candidates | "CountCandidates" >> beam.combiners.Count.Globally()
    _ = (p | "Once" >> beam.Create([None])
         | "Finalize" >> beam.ParDo(Finalize(cfg.output, started), beam.pvalue.AsList(written),
                                    beam.pvalue.AsList(failed), beam.pvalue.AsList(rejected),
                                    beam.pvalue.AsSingleton(n_sources), beam.pvalue.AsSingleton(n_candidates)))


def resolve_knn(cfg: SynthConfig) -> SynthConfig:
    """--knn auto -> global up to --global-max images (the caption job's count), sharded above: resolved
    before the job, so that the card and every triplet's provenance say which ran."""
    if cfg.knn != "auto":
        return cfg
    stats = ds.read_json(ds.join(cfg.input, "stats.json")) or {}  # missing: check_input says so
    return replace(cfg, knn="global" if stats.get("written", 0) <= cfg.global_max else "sharded")


def caption_fingerprint(path: str) -> dict:
    """The caption dataset read, by content: its samples and the hash of its index (a caption dataset re-made at
    the same path is another input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(ds.join(path, "index.parquet")) as f:
        index = f.read()  # read once: its rows from the parquet footer, its hash from the bytes
    return {"samples": pq.read_metadata(pa.BufferReader(index)).num_rows,
            "sha256": hashlib.sha256(index).hexdigest()[:16]}


TOY_CHECK = 50  # captions looked at by check_toy_captions


def check_toy_captions(src: str, captions: list) -> None:
    """`--editor toy` (the default) re-renders the toy world's scenes from their captions: on any other images
    every input would become a failed row, so a dataset none of whose first TOY_CHECK captions the toy grammar
    wrote is refused before the job, naming the editor to use instead."""
    from toyworld.parse import parse_caption  # the toy editor's own parser (the labelled exception)

    looked = [c for c in captions[:TOY_CHECK] if isinstance(c, str)]
    if looked and not any(parse_caption(c) for c in looked):
        raise ValueError(f"--editor toy (the default) edits the toy world's images only, and none of the first "
                         f"{len(looked)} captions of {src} is a toy-world caption (e.g. {looked[0][:60]!r}): pass "
                         f"--editor MODEL, an InstructPix2Pix model (timbrooks/instruct-pix2pix) with --clip MODEL, "
                         f"or mine real pairs with --quality low")


def check_input(cfg: SynthConfig) -> None:
    """Bad input is a clear error before the job starts."""
    card = ds.read_json(ds.join(cfg.input, "dataset.json"))
    if card is None:
        raise ValueError(f"{cfg.input} is not a dataset (no dataset.json)")
    if card.get("kind") != "caption":
        raise ValueError(f"{cfg.input} is a {card.get('kind')!r} dataset; synth reads caption datasets")
    if card.get("schema_version") != ds.SCHEMA_VERSION:
        raise ValueError(f"{cfg.input} has schema version {card.get('schema_version')}; this synth reads "
                         f"version {ds.SCHEMA_VERSION}: rerun the caption job")
    index = ds.read_table(ds.join(cfg.input, "index.parquet")) if ds.read_json(
        ds.join(cfg.input, "stats.json")) else None
    if index is None:
        raise ValueError(f"{cfg.input} is incomplete (no stats.json): rerun its caption job")
    if index.num_rows < 2:
        raise ValueError(f"{cfg.input} has {index.num_rows} image(s); synthesis needs at least two")
    ds.shard_urls(cfg.input)  # every shard its index names is there (IncompleteDatasetError otherwise)
    mines = cfg.quality == "low" or cfg.hard_negatives > 0  # high quality mines its hard negatives
    if mines and cfg.image_weight > 0 and not (card.get("models") or {}).get("clip"):
        what = "pairs" if cfg.quality == "low" else "hard negatives"
        raise ValueError(f"--image-weight {cfg.image_weight} mines {what} by CLIP image embeddings, but {cfg.input} "
                         f"has none: rerun the caption job with --clip, or mine by captions alone with --image-weight 0"
                         + ("" if cfg.quality == "low" else " (or --hard-negatives 0)"))
    if mines and cfg.knn == "sharded" and importlib.util.find_spec("faiss") is None:
        raise ValueError("--knn sharded trains its lists with faiss's k-means: pip install -e '.[faiss]'")
    if cfg.quality == "high" and cfg.editor == "toy":
        check_toy_captions(cfg.input, index.column("caption").to_pylist())
    if cfg.toy_coarse_fraction and not (cfg.quality == "high" and cfg.editor == "toy"):
        raise ValueError("--toy-coarse-fraction describes the toy editor's edits: it needs --quality high --editor toy")
    if not cfg.band_low <= cfg.band_high:
        raise ValueError(f"--band-low {cfg.band_low} is above --band-high {cfg.band_high}")
    if cfg.quality == "high" and cfg.editor != "toy":
        ds.check_model_reference(cfg.editor, "editor", markers=("model_index.json",))
        if not cfg.clip:
            raise ValueError("the diffusers editor needs --clip: keyword swaps and the filters use CLIP")
        ds.check_model_reference(cfg.clip, "CLIP")
    if cfg.caption_edit == "llm" and not (cfg.quality == "high" and cfg.editor != "toy" and cfg.llm):
        raise ValueError("--caption-edit llm edits captions for the diffusers editor (--quality high --editor MODEL) "
                         "with the language model of --llm MODEL")
    if rewrites_mod_text(cfg):
        check_prompt(cfg.llm_prompt, MODTEXT_FIELDS)
    if cfg.caption_edit == "llm":
        check_prompt(cfg.llm_edit_prompt, EDIT_FIELDS, "--llm-edit-prompt")
    if cfg.llm:
        ds.check_model_reference(cfg.llm, "LLM", markers=("config.json",))
    if cfg.quality == "high" and cfg.editor != "toy":  # last: it reads the CLIP's config, after the flag checks
        _check_clip(cfg.clip, cfg.clip_pretrained)


def _check_clip(clip: str, pretrained: Optional[str]) -> None:
    """A CLIP the job can build, with weights: filters on a randomly initialised one would keep and reject
    at random (cir.backbone.check_weights)."""
    from cir.backbone import BackboneError, check_weights

    try:
        check_weights(clip, pretrained)
    except BackboneError as err:
        raise ValueError(str(err)) from err


def swap_vocabulary(cfg: SynthConfig) -> Optional[list[str]]:
    """The diffusers editor's keyword swaps draw from the captions' content words (synth.editing.vocabulary);
    captions without one that occurs twice (a captioner that writes one word) leave nothing to swap: an error
    before the job, naming the other way to edit captions, not a crash of its first worker."""
    if not (cfg.quality == "high" and cfg.editor != "toy" and cfg.caption_edit == "swap"):
        return None
    from synth.editing import vocabulary

    vocab = vocabulary(ds.read_table(ds.join(cfg.input, "index.parquet")).column("caption").to_pylist())
    if not vocab:
        raise ValueError(f"no content word occurs twice in {cfg.input}'s captions (longer than 2 letters, not a "
                         "stopword): keyword swaps have nothing to draw from. Caption with a model that writes "
                         "descriptions, or let a language model edit the captions (--caption-edit llm --llm MODEL)")
    return vocab


def rewrites_mod_text(cfg: SynthConfig) -> bool:
    """--llm rewrites the modification texts, unless it already wrote them as caption edits."""
    return bool(cfg.llm) and cfg.caption_edit != "llm"


def run(argv: Optional[list[str]] = None, save_main_session: bool = True, test_pipeline=None) -> dict:
    parser = build_parser()
    known, pipeline_args = parser.parse_known_args(argv)
    jobs.check_prefix(parser, known.shard_prefix)
    try:
        cfg = from_args(SynthConfig, known)
        cfg = resolve_knn(cfg)
        check_input(cfg)
        if cfg.llm:  # auto -> on/off here, so that the card and every json say what was done
            from synth.llm import resolve_chat

            cfg = replace(cfg, llm_chat="on" if resolve_chat(cfg.llm, cfg.llm_chat) else "off")
        vocab = swap_vocabulary(cfg)
        excluded = neardup.excluded_images(cfg.exclude)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    options = jobs.pipeline_options(parser, pipeline_args, save_main_session)
    card = {"kind": KIND, "config": asdict(cfg), "quality": cfg.quality, "seed": cfg.seed,
            "command": ["beam_runner.py", "synth", *(argv if argv is not None else sys.argv[1:])],
            "source": ds.read_json(ds.join(cfg.input, "dataset.json")),
            # a rerun on changed --exclude folders is refused like one on a changed input
            "inputs": {**caption_fingerprint(cfg.input),
                       **({"excluded": input_fingerprint(excluded)} if excluded else {})},
            "models": {**({"editor": cfg.editor, "clip": cfg.clip, "clip_pretrained": cfg.clip_pretrained}
                          if cfg.quality == "high" else {"mining": "hashed-tfidf + emb.npy"}),
                       **({"llm": cfg.llm} if cfg.llm else {})}}
    try:
        jobs.prepare_output(cfg.output, card, known.overwrite, [cfg.input, *cfg.exclude])
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:  # a path through a file, no permission, a full disk
        parser.error(f"--output {cfg.output} cannot be written: {err.strerror or err}")
    jobs.progress_logger(LOG.name)
    p = test_pipeline or jobs.new_pipeline(options)
    build(p, cfg, time.time(), vocab, sorted(excluded))
    return jobs.run_and_read_stats(p, cfg.output)
