"""What a frozen tower computed, kept by its input: stages I and II run CLIP frozen over few images many times
(stage II's point is a small triplet set: 1,000 triplets in 400 steps of 64 are 25 epochs), and a frozen tower
gives the same output for the same input, so each distinct input is encoded once.

The key of an image is the sha256 of its encoded bytes (train.data.image_digest, computed where the stream
reads the sample), so an image already kept is neither decoded nor preprocessed again: the stage names it in
`undecoded_images` and the stream leaves it encoded. That works where the loader runs in the training process
(`data.workers=0`, the default); a loader worker holds its own, empty, copy of the cache and decodes
everything. Other inputs (stage I's caption tokens) are keyed by their tensor's bytes (`row_ids`). Never a
sample key: two datasets of a mix may share keys. Outputs are kept on the device that made them, up to
`max_mib`; past that, new rows are computed and not kept. A row computed inside a smaller batch can differ from
the whole batch's in the last bit (the tower's matmuls choose their kernels by batch size): training with and
without the cache agree up to rounding.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Callable, Optional

import torch

from cir.backbone import preprocess_batch
from cir.schema import Role
from train.data import image_digest, image_of, is_decoded


def row_ids(*tensors: torch.Tensor) -> list[str]:
    """One id per row of `tensors` (each [B, ...], on the CPU) together: the sha256 of the rows' bytes (with
    the CPU's SHA instructions, 2 ms for 64 images of 3 x 64 x 64; blake2b took 3.5)."""
    arrays = [t.contiguous().numpy() for t in tensors]
    ids = []
    for i in range(len(arrays[0])):
        h = hashlib.sha256()
        for a in arrays:
            h.update(a[i])
        ids.append(h.hexdigest())
    return ids


def pick(batch: torch.Tensor, rows: Optional[list[int]]) -> torch.Tensor:
    """`rows` of a batch tensor, as FrozenFeatures asks for them (None: all)."""
    return batch if rows is None else batch[rows]


def image_inputs(samples: list[dict], role: Role, preprocess, tag: str, frozen: "FrozenFeatures") -> dict:
    """A collate's entries for a frozen image tower's inputs of `role`: `{tag}_pixels` [m, 3, H, W] (None if
    m = 0), the m images the stream decoded, preprocessed; `{tag}_rows`, their rows in the batch (None: every
    row); `{tag}_ids` [B] with the cache on, each image's digest."""
    decoded = [i for i, s in enumerate(samples) if is_decoded(s, role)]
    pixels = preprocess_batch(preprocess, [image_of(samples[i], role) for i in decoded]) if decoded else None
    out = {f"{tag}_pixels": pixels, f"{tag}_rows": None if len(decoded) == len(samples) else decoded}
    if frozen.on:
        out[f"{tag}_ids"] = [image_digest(s, role) for s in samples]
    return out


def pixels_of(batch: dict, tag: str, rows: Optional[list[int]]) -> torch.Tensor:
    """The preprocessed images of `rows` of the batch (None: all) from what image_inputs collated."""
    pixels, decoded = batch[f"{tag}_pixels"], batch[f"{tag}_rows"]
    if decoded is None:
        return pick(pixels, rows)
    where = {row: j for j, row in enumerate(decoded)}
    if rows is None or any(r not in where for r in rows):  # the stream skips only images the cache keeps
        raise RuntimeError(f"{tag} images the loader did not decode are not in the frozen cache either")
    return pixels[[where[r] for r in rows]]


def image_tower(clip, pixels: torch.Tensor, with_patches: bool) -> tuple[torch.Tensor, ...]:
    """A frozen CLIP's image tower on `pixels` [m, 3, H, W], as FrozenFeatures asks: (features [m, d],) or
    (features [m, d], patch tokens [m, n, w])."""
    from cir.mapping import image_features

    with torch.no_grad():
        v, patches = image_features(clip, pixels, with_patches)
    return (v, patches) if with_patches else (v,)


class FrozenFeatures:
    """Outputs of frozen towers by `row_ids` of their inputs, up to `max_mib` MiB (0: nothing kept)."""

    def __init__(self, max_mib: int):
        self.max_bytes, self.used = max_mib * 2 ** 20, 0
        self.rows: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}  # (tag, id) -> one row of each output
        self.hits = self.misses = 0
        self.encoded: Counter = Counter()  # tag -> rows its tower computed (the misses, by tag)

    @property
    def on(self) -> bool:
        return self.max_bytes > 0

    def kept(self, tag: str, key: str) -> bool:
        """Whether the outputs for input `key` of `tag` are kept (its image need not be decoded)."""
        return (tag, key) in self.rows

    def kept_images(self, samples: list[dict], role: Role, tag: str) -> list[bool]:
        """Per sample, whether the outputs of `tag` for its image of `role` are kept (Stage.undecoded_images)."""
        if not self.on:
            return [False] * len(samples)
        return [self.kept(tag, image_digest(s, role)) for s in samples]

    def __call__(self, tag: str, ids: Optional[list[str]],
                 encode: Callable[[Optional[list[int]]], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The outputs [B, ...] for rows `ids` of what `tag` names (one cache holds several towers' outputs).
        `encode(rows)` computes them for those rows of the batch (None: all rows); it is called for the rows not
        kept, or for all when `ids` is None (the cache off)."""
        if ids is None:
            return encode(None)
        missing = [i for i, k in enumerate(ids) if (tag, k) not in self.rows]
        self.hits, self.misses = self.hits + len(ids) - len(missing), self.misses + len(missing)
        if not missing:
            return tuple(torch.stack(parts) for parts in zip(*(self.rows[tag, k] for k in ids)))
        computed = encode(None if len(missing) == len(ids) else missing)  # each [len(missing), ...]
        self.encoded[tag] += len(missing)
        fresh = {ids[i]: tuple(t[j] for t in computed) for j, i in enumerate(missing)}
        for k, row in fresh.items():
            size = sum(t.numel() * t.element_size() for t in row)
            if self.used + size <= self.max_bytes:
                self.rows[tag, k] = tuple(t.clone() for t in row)  # a view would keep the whole batch alive
                self.used += size
        if len(missing) == len(ids):
            return computed
        return tuple(torch.stack(parts) for parts in zip(*(fresh.get(k) or self.rows[tag, k] for k in ids)))
