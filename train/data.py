"""The training stream: an explicit list of webdataset stages, seeded, split by rank and worker.

Per source (a ShardSource of WebDataset shards; an annotated set, train.supervised.TripletSource, takes its
records in a seeded permutation instead):

    shard list (seed + epoch shuffle) -> split_by_node -> split_by_worker -> tarfile_to_samples
    -> [subset by key, kept in memory after a shard's first read] -> shuffle (seed + epoch)
    -> [sources mixed by weight] -> skip (resume) -> batched raw samples -> decode

Epochs repeat forever; the trainer stops at max_steps, so every rank runs the same number of steps whatever
its share of shards (no DDP hang on uneven counts). With fewer shards than rank x worker slots, shards are
*resampled* per slot instead (seeded by slot), since a slot without a shard would never produce a batch.
Decoding happens after batching, so skipping consumed batches on resume is cheap. Members are decoded by
extension only: images with PIL, text, json, `.npy` with allow_pickle=False; anything else (`.pyd`, `.pth`,
...) is dropped undecoded, so nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cir import dataset as ds
from cir import schema
from cir.errors import CIRError
from cir.schema import IMAGE, Role

LOG = logging.getLogger(__name__)
# In each batch from the stream: [worker id, that worker's skipped members/samples so far, the samples it has
# drawn beyond batch_size per batch so far (replacements of samples that did not decode)]; TrainLoader takes it
# out and keeps it as its position.
POSITION_KEY = "_position"


class DataError(CIRError, ValueError):
    """Training data that cannot be used; raised before training starts."""


def check_schema(source: "Source", required: tuple[str, ...]) -> None:
    """The source's first sample must have the fields this stage needs."""
    where = repr(source)
    try:
        first = source.first()
    except StopIteration:
        raise DataError(f"{where} is empty") from None
    except Exception as err:
        raise DataError(f"{where} is not a readable WebDataset shard: {err}") from err
    for need in required:
        options = need.split("|")
        if not any(o in first for o in options):
            raise DataError(f"{where}: samples lack {' or '.join(options)} (have {sorted(first)}); "
                            f"is this the right kind of dataset for this stage?")


def decode_member(key: str, value: bytes):
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in schema.IMAGE_EXTS:
        return Image.open(io.BytesIO(value)).convert("RGB")
    if ext == "txt":
        return value.decode("utf-8")
    if ext == "json":
        return json.loads(value)
    if ext == "npy":
        return np.load(io.BytesIO(value), allow_pickle=False)
    return None  # never decoded (pickles included)


class MissingMember(DataError):
    """A sample without a member its stage needs (a shard cut short): counted and skipped like a corrupt one."""


# In a decoded sample: {image member: sha256 hex of its encoded bytes} (see image_digest; 2-3 us per KiB).
DIGESTS_KEY = "__digests__"


def with_digests(sample: dict) -> dict:
    """A raw sample with its images' digests recorded (decode_sample does it; a pipeline that decodes samples
    another way calls it before decoding, so the stages' collates can key images by their bytes)."""
    return {**sample, DIGESTS_KEY: _digests(sample)}


def _digests(sample: dict) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in sample.items() if schema.image_role(k) is not None}


def decode_sample(sample: dict, lazy: tuple[Role, ...] = (), required: tuple[str, ...] = ()) -> dict:
    """Decode a raw sample's members, recording each image's digest; images of the roles in `lazy` stay encoded
    (see decode_images). Each of `required` ("txt", or alternatives "jpg|png") must be there, else MissingMember."""
    missing = [need for need in required if not any(option in sample for option in need.split("|"))]
    if missing:
        raise MissingMember(f"sample {sample.get('__key__')} has no {', '.join(missing)}")
    out = {"__key__": sample["__key__"], DIGESTS_KEY: _digests(sample)}
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        if lazy and schema.image_role(key) in lazy:
            out[key] = value
            continue
        decoded = decode_member(key, value)
        if decoded is not None:
            out[key] = decoded
    return out


def decode_images(sample: dict, roles: tuple[Role, ...]) -> dict:
    """Decode, in place, the images of `roles` that decode_sample(lazy=...) left encoded."""
    for key, value in list(sample.items()):
        if isinstance(value, bytes) and schema.image_role(key) in roles:
            sample[key] = decode_member(key, value)
    return sample


def image_digest(sample: dict, role: Role) -> str:
    """The sha256 of the encoded bytes of the image of `role` in a decoded sample (decoded, or left encoded):
    what identifies the image to a cache of what a frozen tower computed from it (train.frozen)."""
    member = role.image_member(sample)
    if member is None:
        raise DataError(f"sample {sample.get('__key__')} has no {role.name} image")
    return sample[DIGESTS_KEY][member]


def is_decoded(sample: dict, role: Role) -> bool:
    """Whether the stream decoded the image of `role` (it leaves encoded those the stage said it would not read)."""
    return not isinstance(sample[role.image_member(sample)], bytes)


class CountingHandler:
    """webdataset error handler: a corrupt member or tar is skipped and counted, never fatal."""

    def __init__(self):
        self.errors = 0

    def __call__(self, exn: Exception) -> bool:
        self.errors += 1
        return True


class Slot(NamedTuple):
    """Which share of the data the code running now reads: its rank, and its loader worker's place in the
    order the DataLoader takes batches (global batch b comes from worker b % workers)."""
    rank: int
    world: int
    worker: int
    workers: int


def current_slot(skipped_batches: int = 0) -> Slot:
    """The slot of the rank and loader worker running now. A stream resumed after `skipped_batches` goes on
    where it stopped: the DataLoader asks its worker 0 first, so worker i plays the part of worker
    (i + skipped_batches) % workers of the interrupted run (its shards, its shuffle, its counts)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    workers = info.num_workers if info else 1
    return Slot(rank, world, ((info.id if info else 0) + skipped_batches) % workers, workers)


def slot_share(urls: list, seed: int, epoch: int, slot: Slot) -> list:
    """This slot's shards (or record indices): the epoch's seeded permutation, split by node then worker (or
    resampled when there are fewer than slots)."""
    rank, world, worker, workers = slot
    slots = world * workers
    slot = rank * workers + worker
    if len(urls) < slots:
        rng = random.Random(f"{seed}:{epoch}:{slot}")
        return [rng.choice(urls) for _ in range(len(urls))]
    order = list(urls)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world][worker::workers]  # what split_by_node + split_by_worker do, on this order


class ShardReader:
    """A source's shards read as raw samples, keeping only a subset's keys (`data.subset_fraction`) before the
    shuffle. The kept samples of each shard stay in memory after its first read, up to `budget` bytes (then
    further shards are read again each epoch): a dataset or subset that fits is read from disk once, and a
    data-size ablation's 100 of 3,000 samples cost 100 reads per epoch, not 3,000. A corrupt member is met, and
    counted, on a shard's first read only."""

    def __init__(self, fraction: float = 1.0, budget: int = 0):
        self.fraction, self.budget, self.used = fraction, budget, 0
        self.cached: dict[str, list[dict]] = {}  # url -> its kept raw samples, in shard order

    def keep(self, key: str) -> bool:
        return in_subset(key, self.fraction)

    def read(self, url: str, handler: CountingHandler) -> Iterator[dict]:
        if url in self.cached:
            yield from self.cached[url]
            return
        kept: Optional[list[dict]] = []  # None once the shard cannot fit
        size = 0
        for sample in wds.tarfile_to_samples(handler=handler)([{"url": url}]):
            if not self.keep(sample["__key__"]):
                continue
            if kept is not None:
                size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
                kept.append(sample)
                if self.used + size > self.budget:
                    kept = None
            yield sample
        if kept is not None:  # the shard was read to its end, and fits
            self.cached[url], self.used = kept, self.used + size


def in_subset(key: str, fraction: float) -> bool:
    """A fixed subset of a dataset (for data-size ablations): the same samples whatever the training seed."""
    if fraction >= 1.0:
        return True
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) < fraction * 16 ** 12


@dataclass
class ReadOptions:
    """What the stream asks of each of its sources."""
    buffer: int = 0  # samples in the seeded shuffle buffer (shards; an annotated set's permutation is its shuffle)
    fraction: float = 1.0  # data.subset_fraction: keep only the keys in_subset
    keep_bytes: int = 0  # per shard source: raw samples kept in memory after a shard's first read (ShardReader)
    log_dir: Optional[str] = None  # shard sources log there which slot read which shard, per epoch


class Source:
    """Where a stream's samples come from (a `data.train` entry, or one dataset of a mix manifest): the raw
    samples of an epoch for the slot (rank x loader worker) running now, in a seeded order. ShardSource reads
    WebDataset shards; train.supervised.TripletSource an annotated set in its official layout."""

    def first(self) -> dict:
        """Its first raw sample (the stage's schema check)."""
        raise NotImplementedError

    def epoch(self, seed: int, epoch: int, slot: Slot, handler: CountingHandler,
              options: ReadOptions) -> Iterator[dict]:
        """The raw samples of `epoch` for `slot`; what cannot be read is counted by `handler` and skipped."""
        raise NotImplementedError


class ShardSource(Source):
    """WebDataset shards: the epoch's shard permutation, this slot's share (split_by_node, split_by_worker),
    tarfile_to_samples, the subset, a seeded shuffle buffer."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        self._reader: Optional[ShardReader] = None  # made in the process that reads (a loader worker)

    def __repr__(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else f"{self.urls[0]} (+{len(self.urls) - 1} shards)"

    def first(self) -> dict:
        return next(iter(ds.iter_shard(self.urls[0])))

    def epoch(self, seed: int, epoch: int, slot: Slot, handler: CountingHandler,
              options: ReadOptions) -> Iterator[dict]:
        if self._reader is None or (self._reader.fraction, self._reader.budget) != (options.fraction,
                                                                                  options.keep_bytes):
            self._reader = ShardReader(options.fraction, options.keep_bytes)
        shards = slot_share(self.urls, seed, epoch, slot)
        rank, worker = slot.rank, slot.worker
        if options.log_dir:  # which rank read which shard, per epoch: the way to check the split
            os.makedirs(options.log_dir, exist_ok=True)
            with open(os.path.join(options.log_dir, f"rank{rank}-worker{worker}.txt"), "a", encoding="utf-8") as f:
                f.writelines(f"{epoch} {u}\n" for u in shards)
        stream = (sample for url in shards for sample in self._reader.read(url, handler))
        rng = random.Random(f"{seed}:{epoch}:{rank}:{worker}:shuffle")
        buffer = options.buffer
        yield from wds.shuffle(buffer, min(buffer, 100), rng=rng)(stream) if buffer > 1 else stream


def _forever(source: Source, seed: int, slot: Slot, handler: CountingHandler,
             options: ReadOptions) -> Iterator[dict]:
    epoch = 0
    while True:
        got = False
        for sample in source.epoch(seed, epoch, slot, handler, options):
            got = True
            yield sample
        if not got:
            raise DataError(f"no readable samples in {source!r}")
        epoch += 1


class TrainStream(torch.utils.data.IterableDataset):
    """Batches of decoded samples, endless; read through a TrainLoader, which keeps its position."""

    def __init__(self, sources: list[Source], weights: Optional[list[float]], batch_size: int, seed: int,
                 shuffle_buffer: int, collate: Callable[[list[dict]], dict], log_dir: Optional[str] = None,
                 subset_fraction: float = 1.0, keep_mib: int = 0, lazy_roles: tuple[Role, ...] = (),
                 undecoded: Optional[Callable[[list[dict]], list[tuple[Role, ...]]]] = None,
                 required: tuple[str, ...] = ()):
        super().__init__()
        if weights is not None and len(weights) != len(sources):
            raise DataError(f"data.weights has {len(weights)} entries for {len(sources)} sources")
        self.sources, self.batch_size, self.seed = sources, batch_size, seed
        self.weights = weights or [1.0] * len(sources)
        shard_sources = sum(isinstance(source, ShardSource) for source in sources)
        self.options = ReadOptions(shuffle_buffer, subset_fraction, (keep_mib << 20) // max(1, shard_sources), log_dir)
        self.collate = collate
        self.skip_batches = 0  # global batches already taken (set by resume_at)
        # per worker, where it was: [members/samples skipped, samples drawn beyond batch_size per batch
        # (replacements of samples that did not decode)] (the POSITION_KEY counts of its last batch)
        self.resume_counts: list[list[int]] = []
        self.extra = 0  # this worker's running count of extra samples drawn, resumed ones included
        self.handler = CountingHandler()
        # Images a stage may not read (its cached embeddings, what its frozen tower computed from them before):
        # left encoded, then decoded for the samples `undecoded` does not name (Stage.undecoded_images).
        self.lazy_roles, self.undecoded = (lazy_roles, undecoded) if undecoded else ((), None)
        self.required = required  # the stage's members ("txt", "jpg|png|webp"): a sample without one is skipped

    def resume_at(self, batches: int, workers: list[list[int]]) -> None:
        """Start after `batches` global batches, each worker from its [skipped, extra] counts (TrainLoader)."""
        self.skip_batches, self.resume_counts = batches, [list(c) for c in workers]

    def _mixed(self, slot: Slot) -> Iterator[dict]:
        streams = [_forever(source, self.seed + 1000 * i, slot, self.handler, self.options)
                   for i, source in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(f"{self.seed}:mix:{slot.rank}:{slot.worker}")
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights=self.weights)[0]])

    def __iter__(self) -> Iterator[dict]:
        slot = current_slot(self.skip_batches)
        worker, workers = slot.worker, slot.workers
        # The DataLoader takes batches from workers in turn: global batch b is worker (b % W)'s (b // W)-th.
        # Resuming skips, undecoded, the samples this worker's consumed batches drew: batch_size each, plus the
        # replacements it drew for samples that did not decode.
        errors, self.extra = self.resume_counts[worker] if worker < len(self.resume_counts) else (0, 0)
        samples = self._mixed(slot)
        for _ in range(len(range(worker, self.skip_batches, workers)) * self.batch_size + self.extra):
            next(samples)
        self.handler.errors = errors  # corrupt members met again while skipping were counted before
        batch: list[dict] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) < self.batch_size:
                continue
            out = self.collate(self._decoded(batch, samples))
            # this worker's running counts: skipped members/samples (the loop's `data_errors` log) and extra
            # samples drawn (its resume position)
            out[POSITION_KEY] = torch.tensor([worker, self.handler.errors, self.extra])
            yield out
            batch = []

    def _decoded(self, batch: list[dict], samples: Iterator[dict]) -> list[dict]:
        """Decode a batch; a sample that does not decode (a corrupt image, bad json or npy) is counted and
        replaced by the next one, so batches keep their size (ranks gather equal shapes); each replacement
        drawn is counted in `self.extra`, which a resume skips too. Images of lazy roles are decoded only for
        the samples whose images the stage will read (decoding is much of the loader's cost)."""
        lazy = self.lazy_roles
        out = [self._decode_or_next(sample, samples, lazy) for sample in batch]
        replaced = bool(lazy)
        while replaced:  # a replacement may change what the batch needs: until a pass replaces nothing
            skipped = self.undecoded(out)  # per sample, the lazy roles the stage will not read
            replaced = False
            for i in range(len(out)):
                try:
                    decode_images(out[i], tuple(r for r in lazy if r not in skipped[i]))
                except Exception as err:  # noqa: BLE001 - a damaged image: skipped, counted, replaced
                    self.handler(err)
                    self.extra += 1
                    out[i], replaced = self._decode_or_next(next(samples), samples, lazy), True
        return out

    def _decode_or_next(self, sample: dict, samples: Iterator[dict], lazy: tuple[Role, ...]) -> dict:
        """`sample` decoded (images of `lazy` roles left encoded), or the first next one that decodes."""
        while True:
            try:
                return decode_sample(sample, lazy, self.required)
            except Exception as err:  # noqa: BLE001 - whatever a damaged member raises, it is skipped, counted
                self.handler(err)
                self.extra += 1
                sample = next(samples)


class TrainLoader:
    """The stream's batches on this rank, with their position: `state_dict()` is what a checkpoint keeps (the
    batches taken, each loader worker's skipped and extra samples), `load_state_dict()` before the first batch
    resumes there (consumed batches are skipped undecoded). Workers report their counts inside each batch
    (POSITION_KEY, taken out here), as torchdata's StatefulDataLoader does with its workers' states.

    Not passed to accelerator.prepare: every rank reads its own split (no dispatch from rank 0). With a GPU,
    batches come in pinned memory (as open_clip_train's loaders), so their copy to the device can be
    asynchronous."""

    def __init__(self, stream: TrainStream, workers: int, pin_memory: bool = False):
        self.stream, self.workers, self.pin_memory = stream, workers, pin_memory
        self.taken = 0  # batches taken, resumed ones included
        self.counts: dict[int, list[int]] = {}  # loader worker -> [skipped, extra] as of its last batch
        self._batches: Optional[Iterator[dict]] = None

    def state_dict(self) -> dict:
        return {"batches": self.taken,
                "workers": [self.counts.get(w, [0, 0]) for w in range(max(1, self.workers))]}

    def load_state_dict(self, state: dict) -> None:
        if self._batches is not None:
            raise RuntimeError("TrainLoader.load_state_dict after the first batch")
        self.taken = int(state["batches"])
        self.counts = {w: [int(n) for n in pair] for w, pair in enumerate(state["workers"])}

    @property
    def errors(self) -> int:
        """Corrupt members and samples skipped so far on this rank."""
        return sum(errors for errors, _ in self.counts.values())

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self.stream.resume_at(self.taken, self.state_dict()["workers"])
            self._batches = iter(torch.utils.data.DataLoader(
                self.stream, batch_size=None, num_workers=self.workers, persistent_workers=False, in_order=True,
                pin_memory=self.pin_memory))
        batch = next(self._batches)
        worker, errors, extra = (int(x) for x in batch.pop(POSITION_KEY))
        self.counts[worker] = [errors, extra]
        self.taken += 1
        return batch


def image_of(sample: dict, role: Role = IMAGE) -> Image.Image:
    member = role.image_member(sample)
    if member is None:
        raise DataError(f"sample {sample.get('__key__')} has no {role.name} image")
    return sample[member]


_MISMATCH_WARNED: set = set()  # (role, found, expected) already warned about in this process


def emb_made_by(meta: dict, role: Role, clip_id: Optional[str]) -> bool:
    """Whether a sample's cached embedding of `role` came from the CLIP whose fingerprint is `clip_id`
    (cir.backbone.clip_fingerprint), as its json's `role.emb_clip` records. Another CLIP's embeddings lie in
    another space: using them would be a silent substitute, so the image tower runs instead (warned once)."""
    found = (meta or {}).get(role.emb_clip)
    if clip_id is not None and found == clip_id:
        return True
    if clip_id is not None and (role, found, clip_id) not in _MISMATCH_WARNED:
        _MISMATCH_WARNED.add((role, found, clip_id))
        made_by = f"CLIP {found}" if found else f"an unrecorded CLIP (no {role.emb_clip} in its json)"
        LOG.warning("cached %s made by %s; this stage's frozen CLIP is %s: computing those image "
                    "features with the image tower instead", role.emb, made_by, clip_id)
    return False


def has_cached_embeddings(samples: list[dict], role: Role, clip_id: Optional[str]) -> bool:
    """Whether every decoded sample has `role`'s embedding made by this CLIP (see emb_made_by); never when
    clip_id is None (caching off)."""
    return clip_id is not None and all(role.emb in s and emb_made_by(s.get("json"), role, clip_id)
                                       for s in samples)


def cached_embeddings(samples: list[dict], role: Role, clip_id: Optional[str]) -> Optional[torch.Tensor]:
    """The batch's cached image embeddings [B, d] (float32) when has_cached_embeddings; None means: run the
    image tower."""
    if not has_cached_embeddings(samples, role, clip_id):
        return None
    return torch.from_numpy(np.stack([s[role.emb] for s in samples]).astype(np.float32))
