"""Mined hard negatives for stage II: the keys a triplet lists (json "hard_negatives") -> frozen CLIP features.

A triplet names its hard negatives by the keys of the caption dataset it was mined from (an annotated set,
such as CIRR's image-set members, by image names); it does not carry their images (k more images per
triplet). Before training, the bank encodes that caption dataset (or the annotated set's named images) once with
the frozen CLIP (or takes its cached `emb.npy`), on the main process, into `{output_dir}/negative_bank/`
(reused by `resume` and by a rerun with the same CLIP and datasets), or into `hard_negatives.cache_dir`, by
fingerprint, where runs that share a CLIP and datasets (an ablation's cells) share it; the other ranks wait and
load it.
A batch then carries, per query, the bank rows of its hard negatives ([B, H], -1 where there is none), and
the loss adds them as weighted negatives beside the in-batch targets and the reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from cir import dataset as ds
from cir import schema
from cir.schema import IMAGE
from cir.backbone import preprocess_batch
from train.data import DataError, decode_member, emb_made_by

BANK_DIR = "negative_bank"
BANK_VERSION = 2  # 2: cached emb.npy taken only from the same CLIP (train.data.emb_made_by)


@dataclass
class HardNegativeConfig:
    weight: float = 0.1  # w of each mined hard negative in the InfoNCE denominator (0: unused, no bank built);
    # 0.1 measured on the toy val split (docs/reports/CLAIMS.md): weights of 1 trade global recall for local ranking
    per_query: int = 3  # at most this many of a triplet's hard negatives (in their stored order) are used
    bank: list[str] = field(default_factory=list)  # caption dataset dirs (or FORMAT:ROOT annotated sets) the
    # keys come from ([]: each triplet dataset's own input, as recorded in its dataset.json (synthesized_from),
    # and each annotated set of data.train that names hard negatives)
    batch_size: int = 256  # images per forward pass while encoding the bank
    target_neighbours: int = 0  # also the k bank images nearest to each query's target (near-copies of it, over
    # negative_max_similarity, left out) as negatives: the images a query that drifts from its target would rank first
    cache_dir: Optional[str] = None  # banks kept here, one folder per fingerprint (datasets, CLIP), and shared by
    # every run that asks for the same one (None: in the run's own output_dir)


def bank_datasets(cfg: HardNegativeConfig, train_entries: list[str]) -> list[str]:
    """The caption datasets (and annotated sets) whose keys the triplets' hard negatives name ([]: none known)."""
    from train.supervised import parse_entry, triplet_source

    if cfg.bank:
        return list(cfg.bank)
    found: list[str] = []
    for entry in train_entries:
        annotated = parse_entry(entry)
        if annotated:
            if triplet_source(*annotated).negative_images():
                found.append(entry)
            continue
        paths = [m["path"] for m in ds.load_mix(entry)] if entry.endswith((".yaml", ".yml", ".json")) else [entry]
        for path in paths:
            card = ds.read_json(ds.join(path, "dataset.json")) if os.path.isdir(path) else None
            source = synthesized_from(path, card)
            if source and source not in found:
                found.append(source)
    return found


def synthesized_from(path: str, card: Optional[dict]) -> Optional[str]:
    """The caption dataset the triplet dataset at `path` was synthesized from: its card's `config.input` while
    that holds shards; else the folder at the same place relative to `path`. The card's input and output were
    written from one working directory, so their relative position survives moving both folders together (a
    claims run's output, say) or reading them from another working directory. None when the card names none."""
    config = (card or {}).get("config") or {}
    source, output = config.get("input"), config.get("output")
    if not source or not output or ds.shard_urls(source):
        return source
    if "://" in source + output or os.path.isabs(source) != os.path.isabs(output):
        return source  # not comparable: the recorded one stands, and an empty bank names it
    moved = os.path.normpath(os.path.join(path, os.path.relpath(source, output)))
    return moved if ds.shard_urls(moved) else source


class NegativeBank:
    """keys -> rows of a float16 [M, d] feature table, kept on the CPU (gathered per batch)."""

    def __init__(self, keys: list[str], features: np.ndarray):
        self.row = {k: i for i, k in enumerate(keys)}
        self.features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float16))
        self._device_features: Optional[torch.Tensor] = None  # float32 copy for `nearest`, made on first use

    def __len__(self) -> int:
        return len(self.row)

    def rows(self, metas: list[dict], per_query: int) -> torch.Tensor:
        """[B, per_query] bank rows of each triplet's hard negatives (not its target), -1 padded."""
        out = torch.full((len(metas), per_query), -1, dtype=torch.long)
        for i, meta in enumerate(metas):
            keys = [k for k in meta.get("hard_negatives", []) if k != meta.get("tgt_key") and k in self.row]
            for j, key in enumerate(keys[:per_query]):
                out[i, j] = self.row[key]
        return out

    def nearest(self, v: torch.Tensor, k: int, max_similarity: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For features v [B, d]: the k bank features nearest to each row with cosine <= max_similarity
        ([B, k, d] float32 on v's device) and the mask [B, k] of real entries."""
        if self._device_features is None or self._device_features.device != v.device:
            self._device_features = self.features.to(device=v.device, dtype=torch.float32)
        sims = v.detach().float() @ self._device_features.T  # [B, M]
        sims = sims.masked_fill(sims > max_similarity, float("-inf"))
        top, idx = sims.topk(min(k, sims.shape[1]), dim=1)  # [B, k]
        return self._device_features[idx], torch.isfinite(top)

    def lookup(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, H, d] (float32, on device) and the mask [B, H] of real entries."""
        mask = rows >= 0
        feats = self.features[rows.clamp_min(0).cpu()].to(device=device, dtype=torch.float32)
        return feats, mask.to(device)


def _contents(entry: str) -> list[str]:
    """What a bank entry holds, for the fingerprint: shard urls, or an annotated set's negative image files."""
    from train.supervised import parse_entry, triplet_source

    annotated = parse_entry(entry)
    if annotated:
        return [f"{name}={path}" for name, path in sorted(triplet_source(*annotated).negative_images().items())]
    return ds.shard_urls(entry)


def bank_samples(entries: list[str], show: bool) -> Iterator[dict]:
    """Raw samples ({"__key__", image member, maybe "emb.npy"}) of every bank entry."""
    from train.supervised import parse_entry, triplet_source

    for entry in entries:
        annotated = parse_entry(entry)
        if annotated:
            yield from tqdm(triplet_source(*annotated).negative_samples(), desc=f"negative bank {entry}",
                            unit="img", disable=not show, file=sys.stderr)
            continue
        urls = ds.shard_urls(entry)
        if not urls:
            raise DataError(f"hard negative bank: no shards in {entry}; set hard_negatives.bank=[DIR] to the caption "
                            f"dataset the triplets were synthesized from, or hard_negatives.weight=0")
        for url in tqdm(urls, desc="negative bank", unit="shard", disable=not show, file=sys.stderr):
            yield from ds.iter_shard(url)


def _fingerprint(datasets: list[str], clip_id: str, use_cached: bool) -> str:
    contents = [c for d in datasets for c in _contents(d)]
    return hashlib.sha256(json.dumps([BANK_VERSION, clip_id, use_cached, contents]).encode()).hexdigest()[:16]


def encode_datasets(datasets: list[str], encode: Callable[[torch.Tensor], torch.Tensor], preprocess,
                    batch_size: int, cached_clip: Optional[str], show: bool) -> tuple[list[str], np.ndarray]:
    """Every sample of the bank entries -> (keys, L2-normalised features [M, d] float16). A sample's `emb.npy`
    is taken where `cached_clip` (the frozen CLIP's fingerprint; None: never) made it. A sample whose image
    does not decode is left out (its key is then simply not a negative)."""
    keys: list[str] = []
    feats: list[np.ndarray] = []
    pending_keys, pending = [], []

    def flush():
        if pending:
            keys.extend(pending_keys)
            feats.append(encode(preprocess_batch(preprocess, pending)).cpu().numpy().astype(np.float16))
            pending_keys.clear()
            pending.clear()

    for sample in bank_samples(datasets, show):
        if cached_clip and IMAGE.emb in sample and emb_made_by(schema.parse_json(sample), IMAGE, cached_clip):
            keys.append(sample["__key__"])
            feats.append(schema.load_npy(sample[IMAGE.emb]).astype(np.float16)[None])
            continue
        field = IMAGE.image_member(sample)
        if field is None:
            continue
        try:
            image = decode_member(field, sample[field])
        except Exception:  # noqa: BLE001 - an undecodable image is not a negative; the caption job logged it
            continue
        pending_keys.append(sample["__key__"])
        pending.append(image)
        if len(pending) >= batch_size:
            flush()
    flush()
    if not keys:
        raise DataError(f"hard negative bank: no readable images in {datasets}")
    return keys, np.concatenate(feats)


def load_or_build(out_dir: Path, datasets: list[str], clip_id: str, use_cached: bool, build: Callable[[], tuple],
                  accelerator, cache_dir: Optional[str] = None) -> NegativeBank:
    """The main process builds (or reuses) the bank on disk, in out_dir or under cache_dir; every rank loads it.
    Its files are written atomically, bank.json last, so a bank half written by a killed run is built again."""
    fingerprint = _fingerprint(datasets, clip_id, use_cached)
    where = Path(cache_dir) / fingerprint if cache_dir else out_dir / BANK_DIR
    if accelerator.is_main_process:
        meta = ds.read_json(str(where / "bank.json")) or {}
        if meta.get("fingerprint") != fingerprint:
            keys, feats = build()
            where.mkdir(parents=True, exist_ok=True)
            ds.write_atomic(str(where / "features.npy"), schema.npy_bytes(feats))
            ds.write_json(str(where / "bank.json"), {"fingerprint": fingerprint, "datasets": datasets,
                                                      "keys": keys})
    accelerator.wait_for_everyone()
    meta = ds.read_json(str(where / "bank.json"))
    feats = np.load(where / "features.npy", allow_pickle=False)
    return NegativeBank(meta["keys"], feats)

