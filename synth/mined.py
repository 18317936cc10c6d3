"""Low quality: each reference's neighbourhood (synth.knn) -> mined triplet specs, targets in the similarity
band and the other neighbours as hard negatives; and the hard negatives of edited (high-quality) triplets, the
real images nearest their reference."""
from __future__ import annotations

import random
from dataclasses import asdict
from typing import TYPE_CHECKING, Iterator, Optional

import apache_beam as beam

from synth import mining
from synth.modtext import modification_text
from synth.specs import REJECTED, triplet_key

if TYPE_CHECKING:
    from synth.config import SynthConfig


class MinePairs(beam.DoFn):
    """A reference's neighbourhood -> its triplet specs (targets in the similarity band, other neighbours as
    hard negatives); rejected candidates as (reason) on a tag."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg

    def process(self, hood) -> Iterator:
        cfg = self.cfg
        chosen = mining.select_targets(hood.neighbours, low=cfg.band_low, high=cfg.band_high,
                                       per_reference=cfg.pairs_per_image, hard_negatives=cfg.hard_negatives)
        if not chosen:
            yield beam.pvalue.TaggedOutput(REJECTED, "no_neighbour_in_band")
        for tgt, negatives in chosen:
            rng = random.Random(f"{cfg.seed}:{hood.key}:{tgt.key}")
            mod, changes, reason = modification_text(hood.caption, tgt.caption, rng, cfg.max_changes, cfg.mod_span)
            if mod is None:
                yield beam.pvalue.TaggedOutput(REJECTED, reason)
                continue
            scores = {"similarity": round(tgt.sim, 4)}
            if tgt.image_sim is not None:
                scores["image_similarity"] = round(tgt.image_sim, 4)
            if tgt.text_sim is not None:
                scores["caption_similarity"] = round(tgt.text_sim, 4)
            yield {"key": triplet_key(hood.key, tgt.key, "mined"), "ref_key": hood.key, "tgt_key": tgt.key,
                   "ref_caption": hood.caption, "tgt_caption": tgt.caption, "mod": mod,
                   "quality": "low", "method": "mined-template", "scores": scores,
                   "hard_negatives": negatives, "seed": cfg.seed, "changes": [asdict(c) for c in changes],
                   "provenance": {**knn_provenance(cfg, hood.method), "band": [cfg.band_low, cfg.band_high]}}


def knn_provenance(cfg: SynthConfig, method: Optional[str]) -> dict:
    """How the neighbours were found: the k-NN method (None: not searched) and the similarity it ranked by."""
    approximate = {"nprobe": cfg.nprobe, **({"nlist": cfg.nlist} if cfg.nlist else {})
                   } if method not in (None, "exact") else {}
    return {"knn": method, **approximate, "neighbours": cfg.neighbours, "image_weight": cfg.image_weight,
            "text": f"hashed-tfidf-{cfg.text_dim}"}


def neighbour_keys(hood) -> tuple[str, tuple[str, list]]:
    """(key, (k-NN method, [(neighbour key, its caption)])): the hard negative candidates of an edited triplet
    are the real images nearest its reference (the edited target is not in the dataset)."""
    return hood.key, (hood.method, [(n.key, n.caption) for n in hood.neighbours])


def with_negatives(spec: dict, neighbours: Optional[tuple[str, list]], cfg: SynthConfig) -> dict:
    """An edited triplet with its hard negatives: the real images nearest its reference (`neighbour_keys`; None:
    the reference had none, no emb.npy), except any captioned exactly as its (edited) target: that image would
    be a right answer."""
    method, found = neighbours or (None, [])
    negatives = [k for k, c in found if k != spec["ref_key"] and c != spec["tgt_caption"]]
    return {**spec, "hard_negatives": negatives[:cfg.hard_negatives],
            "provenance": {**spec.get("provenance", {}), "hard_negatives": {
                "from": "nearest real images of the reference", **knn_provenance(cfg, method)}}}
