"""High quality: a seeded choice of source images, each edited into a target (the toy world's exact editor,
or InstructPix2Pix with CLIP filters and a keyword-swap or LLM caption edit) -> edited triplet specs."""
from __future__ import annotations

import io
import random
from typing import TYPE_CHECKING, Iterator

import apache_beam as beam

from cir import dataset as ds
from pipeline import jobs
from synth.specs import FAILED, REJECTED, SCORED, PickOrder, image_fields, triplet_key

if TYPE_CHECKING:
    from synth.config import SynthConfig


class ToyEditor(beam.DoFn):
    """The toy world's exact editor: parse the caption into its scene, apply a random edit, re-render.

    The labelled exception to "no toy special cases": it exists so the offline demo has a truly
    high-quality set. Captions the toy grammar did not write are failed rows.
    """

    def __init__(self, seed: int, coarse_fraction: float = 0.0):
        self.seed, self.coarse_fraction = seed, coarse_fraction

    def process(self, item: tuple[str, dict]) -> Iterator:
        from PIL import Image

        from toyworld.edits import COARSE_KINDS, apply_edit, coarse_edits, coarse_texts, describe_edit, random_edit
        from toyworld.parse import parse_caption
        from toyworld.render import encode, layout, render
        from toyworld.scene import caption

        key, sample = item
        scene = parse_caption(sample["caption"])
        if scene is None:
            yield beam.pvalue.TaggedOutput(FAILED, ds.failed_row(key, "edit", "not_a_toy_caption",
                                                                 f"the toy editor cannot read {sample['caption']!r}"))
            return
        rng = random.Random(f"{self.seed}:toy-edit:{key}")
        edit = random_edit(scene, rng)
        target = apply_edit(scene, edit)
        size = Image.open(io.BytesIO(sample["image"])).size[0]
        tgt_image = encode(render(target, layout(target, rng), size), "png")
        tgt_key = ds.content_key(tgt_image)
        mod = describe_edit(scene, edit, rng)
        # a coarse text names what changes, not what it becomes; its own random stream keeps the exact triplets
        # (the edits, the images, the other texts) the same whatever the fraction
        coarse = random.Random(f"{self.seed}:toy-coarse:{key}")
        is_coarse = (coarse.random() < self.coarse_fraction and edit.kind in COARSE_KINDS
                     and len(coarse_edits(scene, edit.kind, edit.target)) >= 2)
        if is_coarse:
            mod = coarse.choice(coarse_texts(edit.kind, edit.target))
        yield {"key": triplet_key(key, tgt_key, "toy-edit"), "ref_key": key, "tgt_key": tgt_key,
               "ref_caption": sample["caption"], "tgt_caption": caption(target), "mod": mod,
               "quality": "high", "method": "toy-exact-edit", "scores": {"exact": 1.0}, "hard_negatives": [],
               "seed": self.seed, "edit": {**edit.to_json(), **({"coarse": True} if is_coarse else {})},
               "tgt_image": tgt_image, "tgt_ext": "png", "shard": sample["shard"], **image_fields("ref", sample),
               "provenance": {"editor": "toy", "filters": "none: the toy editor is exact"}}


class PickSources(beam.PTransform):
    """(key, sample) -> the samples of a seeded choice of `num_triplets` sources (all when not set).

    Only keys travel to the choice (a distributed top-n combiner); the chosen keys come back to every worker as a
    side input (n keys), which keeps the chosen samples where they are: no image crosses a shuffle to be chosen."""

    def __init__(self, cfg: SynthConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, samples):
        if not self.cfg.num_triplets:
            return samples | "All" >> beam.Values()
        chosen = (samples | "Keys" >> beam.Keys()
                  | "Choose" >> beam.combiners.Top.Of(self.cfg.num_triplets, key=PickOrder(self.cfg.seed), reverse=True)
                  | "AsSet" >> beam.Map(frozenset))
        return samples | "ChosenSamples" >> beam.FlatMap(_if_chosen, beam.pvalue.AsSingleton(chosen))


def _if_chosen(item: tuple[str, dict], chosen: frozenset) -> Iterator[dict]:
    if item[0] in chosen:
        yield item[1]


def _keyed(sample: dict) -> tuple[str, dict]:
    return sample["key"], sample


def _by_source(candidate: dict) -> tuple[str, dict]:
    return candidate["source_key"], candidate


class EditSources(beam.PTransform):
    """Chosen sources (with their shard) -> (high-quality specs, failed rows, rejected reasons, (shard, filter
    scores) of every scored candidate: none for the toy editor)."""

    def __init__(self, cfg: SynthConfig, vocab: list[str]):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab

    def expand(self, sources):
        cfg = self.cfg
        keyed = sources | "Keyed" >> beam.Map(_keyed)
        if cfg.editor == "toy":
            edited = keyed | "ToyEdit" >> beam.ParDo(ToyEditor(cfg.seed, cfg.toy_coarse_fraction)).with_outputs(
                FAILED, main="specs")
            empty = keyed.pipeline | "NoRejections" >> beam.Create([])
            return edited.specs, edited[FAILED], empty, empty
        from apache_beam.ml.inference.base import RunInference

        from synth.editing import (CaptionEdit, ClipFilter, InstructPix2PixHandler, batch_group, edit_batches,
                                   with_target)

        thresholds = {"image_image": cfg.min_image_image, "caption_image": cfg.min_caption_image,
                      "directional": cfg.min_directional}
        guidance = (cfg.text_guidance, cfg.image_guidance)
        if cfg.caption_edit == "llm":
            from synth.llm import LLMCaptionEdit, LLMHandler, edit_request, provenance

            chat = cfg.llm_chat == "on"  # resolved before the job (run)
            writer = LLMHandler(cfg.llm, cfg.llm_edit_prompt, fields={"caption": "caption"},
                                max_new_tokens=cfg.llm_max_new_tokens, device=cfg.device, batch_size=cfg.batch_size,
                                chat=chat)
            written = provenance(cfg.llm, cfg.llm_edit_prompt, cfg.llm_max_new_tokens, chat)
            candidates = (keyed | "EditRequests" >> beam.Map(edit_request) | "LLMEdit" >> RunInference(writer)
                          | "LLMCaptionEdit" >> beam.ParDo(LLMCaptionEdit(
                              written, cfg.samples_per_source, cfg.seed, *guidance))
                          .with_outputs(REJECTED, main="candidates"))
        else:
            candidates = keyed | "CaptionEdit" >> beam.ParDo(
                CaptionEdit(self.vocab, cfg.clip, cfg.clip_pretrained, (cfg.swap_low, cfg.swap_high),
                            cfg.samples_per_source, cfg.seed, guidance, mod_span=cfg.mod_span, device=cfg.device)
            ).with_outputs(REJECTED, main="candidates")
        handler = InstructPix2PixHandler(cfg.editor, steps=cfg.steps, device=cfg.device)
        # candidates sharing guidance scales, grouped per shard, in batches fixed by the data (edit_batches)
        batches = (candidates.candidates | "ByGuidance" >> beam.Map(batch_group)
                   | "GroupByGuidance" >> jobs.MeasuredGroupByKey()
                   | "EditBatches" >> beam.FlatMap(edit_batches, cfg.batch_size))
        filtered = (batches | "InstructPix2Pix" >> RunInference(handler)
                    | "WithTarget" >> beam.Map(with_target) | "BySource" >> beam.Map(_by_source)
                    | "GroupBySource" >> jobs.MeasuredGroupByKey()
                    | "ClipFilter" >> beam.ParDo(ClipFilter(cfg.clip, cfg.clip_pretrained, thresholds,
                                                            cfg.keep_per_source, cfg.seed, cfg.editor,
                                                            cfg.device))
                    .with_outputs(REJECTED, SCORED, main="specs"))
        rejected = (candidates[REJECTED], filtered[REJECTED]) | "AllRejected" >> beam.Flatten()
        return filtered.specs, keyed.pipeline | "NoFailures" >> beam.Create([]), rejected, filtered[SCORED]
