"""`data.train` entries -> the training stream's sources, each with its mixing weight: dataset directories, mix
manifests and shard patterns become train.data.ShardSources; `FORMAT:ROOT[#SPLIT]` entries, annotated sets in
their official layouts, train.supervised.TripletSources. Above both modules, so neither imports the other's
caller."""
from __future__ import annotations

import glob
import os

import braceexpand

from cir import dataset as ds
from train.data import DataError, ShardSource, Source
from train.supervised import SupervisedError, TripletSource, parse_entry


def expand_weighted_sources(entries: list[str]) -> list[tuple[Source, float]]:
    """Each `data.train` entry -> (its Source, its mixing weight). An entry is a dataset directory, a mix
    manifest (its datasets become separate sources, in order, with the manifest's normalised weights), a
    brace/glob pattern of tar files (weight 1.0): ShardSources; or `FORMAT:ROOT[#SPLIT]`, an annotated triplet
    set read from its official layout: a train.supervised.TripletSource. To weigh a manifest against other
    entries, set data.weights."""
    sources: list[tuple[Source, float]] = []
    for entry in entries:
        annotated = parse_entry(entry)
        if annotated is not None:  # FORMAT:ROOT, an annotated triplet set in its official layout
            try:
                sources.append((TripletSource(*annotated), 1.0))
            except SupervisedError as err:
                raise DataError(str(err)) from err
            continue
        if entry.endswith((".yaml", ".yml", ".json")) and os.path.isfile(entry):
            try:
                sources += [(ShardSource(m["shards"]), m["weight"]) for m in ds.load_mix(entry)]
            except ValueError as err:
                raise DataError(str(err)) from err
            continue
        if os.path.isdir(entry):
            try:
                urls = ds.shard_urls(entry)
            except ds.IncompleteDatasetError as err:
                raise DataError(f"data.train {entry!r}: {err}") from err
        else:
            urls = sorted(u for pattern in braceexpand.braceexpand(entry) for u in (glob.glob(pattern) or [pattern]))
            missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
            if missing:
                raise DataError(f"data.train {entry!r}: missing shard(s) {missing[:3]}")
        if not urls:
            raise DataError(f"data.train {entry!r}: no shards")
        sources.append((ShardSource(urls), 1.0))
    if not sources:
        raise DataError("data.train is empty: give shard patterns, dataset directories or a mix manifest")
    return sources
