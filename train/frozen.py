"""What a frozen tower computed, kept by its input: stages I and II run CLIP frozen over few images many times
(stage II's point is a small triplet set: 1,000 triplets in 400 steps of 64 are 25 epochs), and a frozen tower
gives the same output for the same input, so each distinct input is encoded once.

The key of a row is a hash of its input tensors' bytes (`row_ids`, computed in the stage's collate, inside the
loader), never a sample key: two datasets of a mix may share keys, and the same image under two keys is one
entry. Outputs are kept on the device that made them, up to `max_mib`; past that, new rows are computed and not
kept. A row computed inside a smaller batch can differ from the whole batch's in the last bit (the tower's
matmuls choose their kernels by batch size): training with and without the cache agree up to rounding.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch


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


def image_tower(clip, images: torch.Tensor, rows: Optional[list[int]], with_patches: bool) -> tuple[torch.Tensor, ...]:
    """A frozen CLIP's image tower on `rows` of `images` [B, 3, H, W] (None: all), as FrozenFeatures asks:
    (features [m, d],) or (features [m, d], patch tokens [m, n, w])."""
    from cir.mapping import image_features

    with torch.no_grad():
        v, patches = image_features(clip, pick(images, rows), with_patches)
    return (v, patches) if with_patches else (v,)


class FrozenFeatures:
    """Outputs of frozen towers by `row_ids` of their inputs, up to `max_mib` MiB (0: nothing kept)."""

    def __init__(self, max_mib: int):
        self.max_bytes, self.used = max_mib * 2 ** 20, 0
        self.rows: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}  # (tag, id) -> one row of each output
        self.hits = self.misses = 0

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
        fresh = {ids[i]: tuple(t[j] for t in computed) for j, i in enumerate(missing)}
        for k, row in fresh.items():
            size = sum(t.numel() * t.element_size() for t in row)
            if self.used + size <= self.max_bytes:
                self.rows[tag, k] = tuple(t.clone() for t in row)  # a view would keep the whole batch alive
                self.used += size
        if len(missing) == len(ids):
            return computed
        return tuple(torch.stack(parts) for parts in zip(*(fresh.get(k) or self.rows[tag, k] for k in ids)))
