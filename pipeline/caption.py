"""`python beam_runner.py caption --input SRC --output DIR [options] [Beam options]`: the caption job.

images --read--> records --decode/validate--> prepared --dedup by content key--> unique
  --assign shard (skip shards already written)--> caption --> group by shard --> write shard (atomic)
  --> finalize: index.parquet, failed.parquet, stats.json

Rerunning the same command on the same input resumes: the shard of a key depends only on the key and the
number of unique keys, committed shards are skipped before captioning, and a shard becomes visible only by
an atomic rename, so every good input ends up written exactly once.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from cir import dataset as ds
from cir import schema
from cir.config import add_arguments, from_args, ranged
from pipeline import jobs, neardup
from pipeline.images import DEFAULT_MAX_PIXELS, ImageRejected, prepare_image
from pipeline.sources import (EXPECTED, FAILED, RECORDS, ReadInputs, check_has_inputs, check_has_sidecars,
                              input_fingerprint, list_inputs)

LOG = logging.getLogger("pipeline.caption")
KIND = "caption"


@dataclass
class CaptionConfig(neardup.ExcludeConfig):
    """The caption job's settings; each field is also its flag (cir.config.add_arguments: `--max-new-tokens`);
    --exclude and the near-duplicate thresholds come from neardup.ExcludeConfig."""
    input: str = ranged("", help="directory, glob, *.tar shards or a parquet of paths")
    output: str = ranged("", help="dataset directory (local path or gs://...)")
    captioner: str = ranged("sidecar", help="'sidecar' (the images' own .txt/.json captions) or a Hugging Face "
                                            "image-to-text model id / directory")
    prompt: str = ranged("", help="text prompt for the captioner (BLIP: 'a picture of')")
    max_new_tokens: int = ranged(30, min=1, help="caption length, in tokens")
    num_beams: int = ranged(1, min=1, help="beam search width")
    num_captions: int = ranged(1, min=1, help="caption candidates per image; with --clip the best-matching one "
                                              "is kept")
    clip: Optional[str] = ranged(None, help="CLIP model for L2-normalised image embeddings (emb.npy): open_clip "
                                            "name, hf-hub: id, directory or tiny name")
    clip_pretrained: Optional[str] = ranged(None, help="open_clip tag or weights file for --clip")
    batch_size: int = ranged(16, min=1, help="model batch size (RunInference)")
    device: str = ranged("cpu", help="torch device for the models (cpu, cuda)")
    shard_size: int = ranged(1000, min=1, help="target samples per shard")
    shard_prefix: str = ranged("part", help="shard file names: PREFIX-00000.tar ...")
    min_size: int = ranged(1, min=0, help="images with a side below this are dropped")
    max_size: Optional[int] = ranged(None, min=1, help="a longer side above this is resized down (bytes "
                                                       "re-encoded)")
    max_pixels: int = ranged(DEFAULT_MAX_PIXELS, min=1, max=2 * DEFAULT_MAX_PIXELS,
                             help="decompression-bomb guard (at most twice PIL's limit, past which PIL refuses)")
    path_column: str = ranged("path", help="parquet input: the column of image paths")
    caption_column: str = ranged("caption", help="parquet input: the column of captions (optional)")
    near_duplicates: bool = ranged(True, help="drop an image when a near-duplicate of it (resized, re-encoded, "
                                              "lightly cropped or recoloured) ranks before it (pipeline/neardup.py)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beam_runner.py caption",
                                description="Caption images into WebDataset shards (SPEC.md caption dataset).",
                                epilog="Other flags are Beam PipelineOptions (--runner, --direct_num_workers, ...).")
    add_arguments(p, CaptionConfig, required=("input", "output"))
    p.add_argument("--overwrite", action="store_true", help="replace a dataset of another configuration")
    return p


# ------------------------------------------------------------------------------------------ DoFns

LARGE_IMAGE = 32 * 1024  # bytes: images this size or larger are decoded on PrepareImage's threads,
DECODE_THREADS = 2  # this many per DoFn instance (a performance setting, not part of the dataset's config)


class PrepareImage(beam.DoFn):
    """A batch of records -> sample dicts with the content key, or failed rows.

    PIL's decoding and hashlib release the GIL, so images of LARGE_IMAGE bytes or more are decoded and hashed
    on DECODE_THREADS threads while this one goes on (the local runner runs the job on one thread: 3,000
    images of 114 KiB took 4.5 s instead of 5.9); smaller ones are done here, as a thread hand-off costs them
    more than it saves (12,000 images of 5.5 KiB ran slower on threads)."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.rejected = Metrics.counter(KIND, "rejected")

    def setup(self):
        self.pool = ThreadPoolExecutor(DECODE_THREADS)

    def teardown(self):
        self.pool.shutdown()

    def process(self, records: list[dict]) -> Iterator:
        pending = []
        for record in records:
            if len(record["data"]) >= LARGE_IMAGE:
                pending.append((record, self.pool.submit(self._check, record["data"])))
            else:
                yield from self._sample(record, self._check(record["data"]))
        for record, checked in pending:
            yield from self._sample(record, checked.result())

    def _check(self, data: bytes) -> tuple:
        """(the prepared image, its bytes' sha256, its near-duplicate Fingerprint or None) or (ImageRejected,
        None, None). Runs on a pool thread: no Beam."""
        try:
            img = prepare_image(data, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
                                max_pixels=self.cfg.max_pixels)
        except ImageRejected as err:
            return err, None, None
        fp = neardup.fingerprint(img.image) if screens(self.cfg) else None
        return img, hashlib.sha256(data).hexdigest(), fp

    def _sample(self, record: dict, checked: tuple) -> Iterator:
        img, sha256, fp = checked
        if isinstance(img, ImageRejected):
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(FAILED, ds.failed_row(record["source"], "decode", img.reason, str(img)))
            return
        # the stamp of a local source goes on only if its bytes are the ones stored (see leave_bytes)
        extra = {name: record[name] for name in ("sidecar_problem", "stamp") if name in record}
        if img.reencoded:
            extra.pop("stamp", None)
        if fp is not None:
            extra["fp"] = fp
        yield {"key": sha256[:ds.KEY_HEX], "sha256": sha256,  # the content key is this hash's prefix
               "source": record["source"], "caption": record["caption"], "data": img.data, "ext": img.ext,
               "width": img.width, "height": img.height, "reencoded": img.reencoded, **extra}


class SidecarCandidates(beam.DoFn):
    """The caption that came with the image is the only candidate."""

    def process(self, sample: dict) -> Iterator[dict]:
        caption = (sample.get("caption") or "").strip()
        yield {**sample, "candidates": [caption] if caption else []}


def _with_candidates(result) -> dict:
    """RunInference(HFCaptionerHandler) output -> the sample with its caption candidates."""
    return {**result.example, "candidates": [c for c in result.inference if c.strip()]}


def _with_embedding(result) -> dict:
    return {**result.example, "emb": result.inference, "emb_clip": result.model_id}  # model_id: weights hash


class ChooseCaption(beam.DoFn):
    """Keep one caption per sample; none is a failed row (never an empty caption). Both leave as shard items
    (jobs.as_sample / as_failed), the one input of WriteShards.

    With several candidates and a CLIP embedding of the image, the candidate whose CLIP text embedding is
    closest to the image embedding wins; otherwise the first (the most likely under beam search).
    """

    def __init__(self, captioner: str, clip: Optional[str], clip_pretrained: Optional[str], device: str):
        self.captioner, self.clip, self.clip_pretrained, self.device = captioner, clip, clip_pretrained, device
        self.backbone = None

    def setup(self):
        if self.clip:
            from cir.backbone import create_backbone

            self.backbone = create_backbone(self.clip, self.clip_pretrained, device=self.device)
            self.backbone.model.eval()

    def process(self, sample: dict) -> Iterator:
        candidates = sample.pop("candidates")
        if not candidates:
            if self.captioner != "sidecar":
                reason, message = "empty_caption", f"{self.captioner} generated only empty text"
            elif sample.get("sidecar_problem"):
                reason, message = "bad_sidecar", sample["sidecar_problem"]
            else:
                reason, message = "no_caption", "no sidecar caption"
            yield jobs.as_failed({**ds.failed_row(sample["source"], "caption", reason, message),
                                  "shard": sample["shard"], "key": sample["key"]})
            return
        caption = candidates[0]
        if len(candidates) > 1 and self.backbone is not None and "emb" in sample:
            caption = candidates[self._best(candidates, sample["emb"])]
        yield jobs.as_sample(leave_bytes({**sample, "caption": caption, "captioner": self.captioner}))

    def _best(self, candidates: list[str], emb) -> int:
        import torch

        from cir.mapping import encode_text

        with torch.no_grad():
            text = encode_text(self.backbone.model, self.backbone.tokenizer(candidates).to(self.device))
        scores = text.float().cpu() @ torch.as_tensor(emb, dtype=torch.float32)  # [num_candidates]
        return int(scores.argmax())


class Caption(beam.PTransform):
    """samples with their shard -> shard items: captioned samples (+ emb) and failed rows."""

    def __init__(self, cfg: CaptionConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, samples):
        cfg = self.cfg
        if cfg.captioner != "sidecar" or cfg.clip:  # Beam's ml package is slow to import: only when needed
            from apache_beam.ml.inference.base import RunInference

            from pipeline.models import ClipImageEmbedHandler, HFCaptionerHandler
        if cfg.captioner == "sidecar":
            with_candidates = samples | "SidecarCaption" >> beam.ParDo(SidecarCandidates())
        else:
            handler = HFCaptionerHandler(cfg.captioner, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                                         num_beams=cfg.num_beams, num_return_sequences=cfg.num_captions,
                                         device=cfg.device, batch_size=cfg.batch_size)
            with_candidates = (samples | "Captioner" >> RunInference(handler)
                               | "Candidates" >> beam.Map(_with_candidates))
        if cfg.clip:
            handler = ClipImageEmbedHandler(cfg.clip, cfg.clip_pretrained, device=cfg.device,
                                            batch_size=cfg.batch_size)
            with_candidates = (with_candidates | "ClipEmbed" >> RunInference(handler)
                               | "Embedding" >> beam.Map(_with_embedding))
        return with_candidates | "Choose" >> beam.ParDo(
            ChooseCaption(cfg.captioner, cfg.clip if cfg.num_captions > 1 else None, cfg.clip_pretrained,
                          cfg.device))


def leave_bytes(sample: dict) -> dict:
    """A sample whose stored image is its local source file, unchanged (it has a "stamp"), leaves the bytes
    behind: they are read again where its shard is written (with_bytes). So no image bytes of a local input
    cross the shard grouping, which on the local runner holds every element in memory, encoded and decoded
    (2.2 GB of memory for 340 MB of images before); a remote object's or a tar member's bytes travel with it
    (a second read of each would cost more than the shuffle)."""
    return {k: v for k, v in sample.items() if k != "data"} if "stamp" in sample else sample


def with_bytes(sample: dict) -> dict:
    """The sample with its image bytes, read again if leave_bytes left them (cir.dataset.reread: OSError when
    the file changed or went since, and WriteShard makes it a failed row)."""
    return sample if "data" in sample else {**sample, "data": ds.reread(sample["source"], sample["stamp"])}


def to_webdataset(sample: dict) -> dict:
    meta = {"key": sample["key"], "source": sample["source"], "width": sample["width"], "height": sample["height"],
            "sha256": sample["sha256"], "caption": sample["caption"], "captioner": sample["captioner"]}
    if sample.get("reencoded"):
        meta["reencoded"] = sample["reencoded"]
    # emb_clip: which CLIP's weights made emb.npy (cir.backbone.clip_fingerprint)
    image = schema.Picture(sample["data"], sample["ext"], sample.get("emb"), sample.get("emb_clip"))
    return schema.CaptionSample(sample["key"], image, sample["caption"], meta).to_webdataset()


def index_row(sample: dict, shard_name: str) -> dict:
    return {"key": sample["key"], "shard": shard_name, "source": sample["source"], "ext": sample["ext"],
            "width": sample["width"], "height": sample["height"], "sha256": sample["sha256"],
            "caption": sample["caption"], "captioner": sample["captioner"], "reencoded": sample.get("reencoded")}


class Finalize(beam.DoFn):
    """Runs once after every shard is written (its side inputs depend on them)."""

    def __init__(self, output: str, started: float):
        self.output, self.started = output, started

    def process(self, _, written: list, early_failed: list, inputs: int, skipped_duplicates: int) -> Iterator[dict]:
        duplicates = skipped_duplicates + sum(w["duplicates"] for w in written)
        yield jobs.finalize(self.output, self.started, written, early_failed,
                            {"inputs": inputs, "duplicates": duplicates}, LOG.name)


# ------------------------------------------------------------------------------------------ near-duplicates

def screens(cfg: CaptionConfig) -> bool:
    """Whether the job compares images with each other or with --exclude folders (pipeline/neardup.py)."""
    return cfg.near_duplicates or bool(cfg.exclude)


class DropScreened(beam.DoFn):
    """A sample -> itself without its fingerprint, or a failed row when the screen dropped it."""

    def process(self, sample: dict, drops: dict) -> Iterator:
        sample = {k: v for k, v in sample.items() if k != "fp"}
        drop = drops.get(sample["key"])
        if drop is None:
            yield sample
            return
        reason, match = drop
        message = (f"a near-duplicate of the image kept as key {match}" if reason == "near_duplicate"
                   else f"an exact or near duplicate of the excluded image {match}")
        yield beam.pvalue.TaggedOutput(FAILED, ds.failed_row(sample["source"], "dedup", reason, message))


def _first_drop(drops) -> tuple:
    """Of the (reason, order, match) to drop one key: an exclusion (the first file by path), else the best-ranked
    near-duplicate it has."""
    return min(drops, key=lambda d: (d[0] != "excluded", d[1]))


class Screen(beam.PTransform):
    """Prepared samples (with "fp") -> {"ok": samples (without), FAILED: rows `near_duplicate` / `excluded`}.

    What is dropped depends on every input's fingerprint, never on the order of work: a rerun drops the same
    images, and their failed rows are made again each run, like decode failures (finalize writes them once)."""

    def __init__(self, cfg: CaptionConfig, excluded_files: list[str]):
        super().__init__()
        self.cfg, self.excluded_files = cfg, excluded_files

    def expand(self, prepared):
        cfg, pipeline = self.cfg, prepared.pipeline
        fps = prepared | "Fingerprints" >> beam.Map(lambda s: (s["key"], s["fp"], neardup.rank(s)))
        found = []
        if cfg.exclude:
            table = pipeline | "ExcludedFiles" >> beam.Create(self.excluded_files) | neardup.ExcludedTable()
            found.append(fps | "KeyFp" >> beam.Map(lambda e: (e[0], e[1]))
                         | "MatchExcluded" >> beam.ParDo(neardup.MatchExcluded(cfg.near_dup_bits, cfg.near_dup_pixels,
                                                                               cfg.near_dup_tolerance),
                                                         beam.pvalue.AsSingleton(table))
                         | "ExcludedDrop" >> beam.Map(lambda kv: (kv[0], ("excluded", kv[1], kv[1]))))
        if cfg.near_duplicates:
            table = (fps | "Entries" >> beam.Map(lambda e: neardup.table_entry(*e))
                     | "InputTable" >> beam.combiners.ToList() | "InputIndex" >> beam.Map(neardup.hash_table))
            queries = fps | "Candidates" >> beam.ParDo(neardup.NearCandidates(cfg.near_dup_bits),
                                                       beam.pvalue.AsSingleton(table))
            by_key = fps | "FpByKey" >> beam.Map(lambda e: (e[0], e[1]))
            pairs = ({"fp": by_key, "query": queries} | "JoinCandidates" >> jobs.MeasuredCoGroupByKey()
                     | "Verify" >> beam.FlatMap(neardup.verify_near, cfg.near_dup_pixels, cfg.near_dup_tolerance))
            ranks = fps | "RankByKey" >> beam.Map(lambda e: (e[0], e[2]))
            # (key, kept key) -> (key, ("near_duplicate", the kept one's rank, kept key))
            found.append(({"pair": pairs | "ByKept" >> beam.Map(lambda kv: (kv[1], kv[0])), "rank": ranks}
                          | "JoinRanks" >> jobs.MeasuredCoGroupByKey()
                          | "Ranked" >> beam.FlatMap(lambda kv: [(key, ("near_duplicate", kv[1]["rank"][0], kv[0]))
                                                                 for key in kv[1]["pair"]])))
        drops = (found | "AllDrops" >> beam.Flatten() | "DropsByKey" >> jobs.MeasuredGroupByKey()
                 | "OnePerKey" >> beam.Map(lambda kv: (kv[0], _first_drop(kv[1])))
                 | "Named" >> beam.Map(lambda kv: (kv[0], (kv[1][0], kv[1][2]))))  # (key, (reason, match))
        return prepared | "Drop" >> beam.ParDo(DropScreened(), beam.pvalue.AsDict(drops)).with_outputs(
            FAILED, main="ok")


# ------------------------------------------------------------------------------------------ pipeline

def _one(_) -> int:
    return 1


def build(p: beam.Pipeline, cfg: CaptionConfig, started: float, listing: Optional[dict] = None,
          excluded_files: Optional[list[str]] = None) -> beam.PCollection:
    """Image bytes cross one shuffle, the shard grouping: the number of shards comes from a count of the
    listing (no bytes), each image goes to shard_of(its content key), so copies of the same bytes meet in one
    shard group, where one is kept (jobs.keep_one_per_key). Only keys cross the other groupings.
    listing: the launcher's list_inputs(cfg.input), read instead of listing a local input again;
    excluded_files: the images of the --exclude folders (neardup.excluded_images)."""
    read = p | "Read" >> ReadInputs(cfg.input, cfg.path_column, cfg.caption_column, listing,
                                    scratch=ds.join(cfg.output, ds.SHARD_DIR))  # finalize removes its temp file
    prepared = (read[RECORDS] | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=64)
                | "Prepare" >> beam.ParDo(PrepareImage(cfg)).with_outputs(FAILED, main="ok"))
    screened = prepared.ok | "Screen" >> Screen(cfg, excluded_files) if screens(cfg) else None
    assigned = (screened.ok if screened else prepared.ok) | "AssignShard" >> beam.ParDo(
        jobs.AssignShard(cfg.output, cfg.shard_size, cfg.shard_prefix, KIND, report_skipped=True),
        beam.pvalue.AsSingleton(read[EXPECTED])).with_outputs(jobs.AssignShard.SKIPPED, main="todo")
    written = assigned.todo | "Caption" >> Caption(cfg) | "WriteShards" >> jobs.WriteShards(
        cfg.output, cfg.shard_prefix, to_webdataset, index_row, LOG.name, dedup=True, load=with_bytes)
    # copies in shards committed before (a resumed run) are counted from their keys alone
    skipped_duplicates = (assigned[jobs.AssignShard.SKIPPED] | "KeyCopies" >> beam.Map(lambda key: (key, 1))
                          | "SkippedKeys" >> jobs.MeasuredGroupByKey()
                          | "ExtraCopies" >> beam.Map(lambda kv: sum(kv[1]) - 1)
                          | "SkippedDuplicates" >> beam.CombineGlobally(sum))
    early_failed = ((read[FAILED], prepared[FAILED], *([screened[FAILED]] if screened else []))
                    | "EarlyFailed" >> beam.Flatten())
    inputs = ((read[RECORDS] | "RecordOnes" >> beam.Map(_one), read[FAILED] | "FailedOnes" >> beam.Map(_one))
              | "AllInputs" >> beam.Flatten() | "CountInputs" >> beam.CombineGlobally(sum))
    return (p | "Once" >> beam.Create([None])
            | "Finalize" >> beam.ParDo(Finalize(cfg.output, started), beam.pvalue.AsList(written),
                                       beam.pvalue.AsList(early_failed), beam.pvalue.AsSingleton(inputs),
                                       beam.pvalue.AsSingleton(skipped_duplicates)))


def run(argv: Optional[list[str]] = None, save_main_session: bool = True, test_pipeline=None) -> dict:
    parser = build_parser()
    known, pipeline_args = parser.parse_known_args(argv)
    try:
        cfg = from_args(CaptionConfig, known)
    except ValueError as err:
        parser.error(str(err))
    jobs.check_prefix(parser, cfg.shard_prefix)
    options = jobs.pipeline_options(parser, pipeline_args, save_main_session)  # a mistyped flag is named first
    if "://" not in cfg.input and not any(ch in cfg.input for ch in "*?[{") and not os.path.exists(cfg.input):
        parser.error(f"--input {cfg.input} does not exist")
    try:
        if cfg.captioner != "sidecar":
            ds.check_model_reference(cfg.captioner, "captioner", markers=("config.json",))
        if cfg.clip:
            ds.check_model_reference(cfg.clip, "CLIP")
            from cir.backbone import BackboneError, check_weights

            try:  # an unknown model, or random embeddings (a silent substitute)
                check_weights(cfg.clip, cfg.clip_pretrained)
            except BackboneError as err:
                raise ValueError(str(err)) from err
        listing = list_inputs(cfg.input)
        check_has_inputs(cfg.input, listing)
        if cfg.captioner == "sidecar":
            check_has_sidecars(cfg.input, listing)
        excluded = neardup.excluded_images(cfg.exclude)
    except ValueError as err:
        parser.error(str(err))
    card = {"kind": KIND, "config": asdict(cfg),
            "command": ["beam_runner.py", "caption", *(argv if argv is not None else sys.argv[1:])],
            "models": {"captioner": cfg.captioner, "clip": cfg.clip, "clip_pretrained": cfg.clip_pretrained},
            # a rerun on changed --exclude folders is refused like one on a changed input
            "inputs": {**input_fingerprint(listing), **({"excluded": input_fingerprint(excluded)} if excluded else {})}}
    try:
        jobs.prepare_output(cfg.output, card, known.overwrite, [cfg.input, *cfg.exclude])
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:  # a path through a file, no permission, a full disk
        parser.error(f"--output {cfg.output} cannot be written: {err.strerror or err}")
    jobs.progress_logger(LOG.name)
    p = test_pipeline or jobs.new_pipeline(options)
    build(p, cfg, time.time(), listing, sorted(excluded))
    return jobs.run_and_read_stats(p, cfg.output)
