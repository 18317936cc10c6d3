"""What the synth job's branches share: side-output tags, triplet keys, and the seeded orders that choose
`--num-triplets` of the candidates (or sources)."""
from __future__ import annotations

import hashlib

from cir import dataset as ds

FAILED = "failed"  # tag of failed.parquet rows
REJECTED = "rejected"  # tag of rejected candidates' reasons (counted in stats.json)
SCORED = "scored"  # tag of (shard, row): the CLIP filter's scores of each candidate, kept or not (filter_scores)


def triplet_key(*parts: str) -> str:
    return ds.content_key("|".join(parts).encode())


def pick_order(seed: int, key: str) -> str:
    """Seeded, uniform order for choosing `--num-triplets` of the candidates."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


class PickOrder:
    """Sort key of a source key for the seeded choice of `num_triplets` sources (module level: picklable)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, key: str) -> str:
        return pick_order(self.seed, key)


class SpecOrder(PickOrder):
    """Sort key of a triplet spec for the seeded choice of `num_triplets` among the candidates."""

    def __call__(self, spec: dict) -> str:
        return pick_order(self.seed, spec["key"])


def each(items: list) -> list:
    return items


def image_fields(role: str, image: dict) -> dict:
    """A caption sample's image (ReadCaptionShard's dict) as a triplet's `{role}_image`, `_ext`, `_emb`,
    `_emb_clip` fields."""
    return {f"{role}_image": image["image"], f"{role}_ext": image["ext"], f"{role}_emb": image["emb"],
            f"{role}_emb_clip": image.get("emb_clip")}
