"""Plumbing shared by the Beam jobs that write datasets (caption, synth): options, shard assignment with
resume, atomic shard writing, the dataset card and the final stats.

The dataset itself is specified in `cir.dataset`; this module is the Beam side of it.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from typing import Callable, Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from cir import dataset as ds


def pipeline_options(parser: argparse.ArgumentParser, pipeline_args: list[str],
                     save_main_session: bool) -> PipelineOptions:
    """Beam options from the flags we did not parse; DirectRunner unless told otherwise; typos are errors."""
    options = PipelineOptions(pipeline_args)
    known = set(options.get_all_options())
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
    if unknown:
        parser.error(f"unrecognized arguments: {', '.join('--' + u for u in unknown)}")
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    options.view_as(SetupOptions).save_main_session = save_main_session
    return options


def new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline on the runner the options name. The DirectRunner (the default) runs our batch jobs on Beam's
    in-process FnApiRunner (`local_runner`); other runners as named (`--runner PrismRunner` asks for Prism)."""
    if (options.view_as(StandardOptions).runner or "").lower() not in ("directrunner", "direct"):
        return beam.Pipeline(options=options)
    return beam.Pipeline(runner=local_runner(options), options=options)


def local_runner(options: PipelineOptions):
    """Beam's in-process FnApiRunner, in the mode `--direct_running_mode` says, built as the DirectRunner builds
    it: the DirectRunner first tries to download and start Prism, which offline costs a quarter of a second and
    leaves a `beam-temp*` folder and a pickled main session in the temp directory on every run, and online runs
    the job on another runner than the one documented and measured. Tests give it to TestPipeline."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # the options reach the workers as the DirectRunner passes them (multi_processing workers read them there)
    info = beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=JobServiceHandle.encode_pipeline_options(options.get_all_options()))
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


def progress_logger(name: str) -> logging.Logger:
    """Progress lines on stderr without turning on Beam's own INFO chatter."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


# What a dataset job writes in its output directory: `--overwrite` deletes these and nothing else.
OWN_ENTRIES = (ds.SHARD_DIR, "index.parquet", "failed.parquet", ds.SCORES_FILE, "stats.json", "README.md",
               "dataset.json")


def _local_root(spec: str) -> Optional[tuple[str, bool]]:
    """(the absolute directory an input spec reads in, whether the job walks all of it), or None for a remote
    URL (gs://...), which cannot hold a local output. A folder is walked; a pattern or a file is read in its
    folder's top (the part before any glob or brace)."""
    if "://" in spec:
        return None
    cut = re.split(r"[*?\[{]", spec, maxsplit=1)[0]
    path = os.path.realpath(os.path.abspath(os.path.expanduser(cut or ".")))
    if cut == spec and os.path.isdir(path):
        return path, True
    return (path if cut.endswith(os.sep) else os.path.dirname(path)), False


def check_apart(inputs: list[str], output: str) -> None:
    """Refuse an output that is or contains an input, or lies inside a folder the job walks: a rerun would read
    our own shards back, and `--overwrite` could delete the user's files."""
    if "://" in output:
        return
    out = os.path.realpath(os.path.abspath(os.path.expanduser(output)))
    for spec in inputs:
        found = _local_root(spec)
        if found is None:
            continue
        root, walked = found
        if out == root or root.startswith(out + os.sep) or (walked and out.startswith(root + os.sep)):
            raise ValueError(f"--output {output} and --input {spec} overlap: the job would read its own output and "
                             f"--overwrite could delete inputs; write to a folder outside the input")


def prepare_output(output: str, card: dict, overwrite: bool, inputs: list[str]) -> None:
    """Refuse to mix two different jobs in one directory, or a dataset with files that are not ours; write the
    dataset card before the job starts.

    A rerun with the same `card["config"]` and the same `card["inputs"]` (a fingerprint of what the job reads)
    resumes; another config or changed inputs need `overwrite`, which deletes the old dataset's own entries
    (OWN_ENTRIES) and nothing else. A non-empty directory without our card is refused.
    """
    from apache_beam.io.filesystems import FileSystems

    ds.check_filesystem(output)
    check_apart(inputs, output)
    card_path = ds.join(output, "dataset.json")
    if "://" not in output and os.path.exists(output):
        if not os.path.isdir(output):
            raise ValueError(f"--output {output} exists and is not a directory")
        if os.listdir(output) and not os.path.isfile(card_path):
            raise ValueError(f"--output {output} is a non-empty folder without a dataset card (dataset.json): not "
                             f"a dataset of ours, so nothing there is overwritten; use a new or empty --output")
    old = ds.read_json(card_path)
    same_job = old is not None and old.get("config") == card["config"] and old.get("kind") == card["kind"]
    if same_job and old.get("inputs") not in (None, card.get("inputs")):
        if not overwrite:
            raise ValueError(f"the input changed since {output} was written ({old['inputs']} then, "
                             f"{card.get('inputs')} now): a rerun would mix two inputs in one dataset; pass "
                             f"--overwrite to rebuild it, or use a new --output")
        same_job = False
    if old is not None and not same_job:
        if not overwrite:
            raise ValueError(f"{output} holds a {old.get('kind')} dataset made with another configuration "
                             f"({old.get('config')}); use a new --output or pass --overwrite")
        owned = [ds.join(output, name) for name in OWN_ENTRIES]
        FileSystems.delete([path for path in owned if FileSystems.exists(path)])
    ds.write_json(card_path, {"schema_version": ds.SCHEMA_VERSION, **card})


class AssignShard(beam.DoFn):
    """Attach the shard index to each item; drop items whose shard is already committed (resume).

    The shard depends only on the item's key and the total count, so a rerun on the same input assigns
    the same shards and skips the finished ones *before* any expensive step downstream. With
    `report_skipped`, the key of each skipped item goes to the SKIPPED output (the caption job counts the
    duplicates among them from keys alone).
    """

    SKIPPED = "skipped"

    def __init__(self, output: str, shard_size: int, prefix: str, namespace: str, report_skipped: bool = False):
        self.output, self.shard_size, self.prefix = output, shard_size, prefix
        self.report_skipped = report_skipped
        self.skipped = Metrics.counter(namespace, "skipped_complete_shard")

    def setup(self):
        self.done = set(ds.complete_shards(self.output))

    def process(self, item: dict, count: int) -> Iterator:
        shard = ds.shard_of(item["key"], ds.num_shards_for(count, self.shard_size))
        if ds.shard_name(self.prefix, shard) in self.done:
            self.skipped.inc()
            if self.report_skipped:
                yield beam.pvalue.TaggedOutput(self.SKIPPED, item["key"])
            return
        yield {**item, "shard": shard}


def as_sample(sample: dict) -> tuple[int, dict]:
    return sample["shard"], {"sample": sample}


def as_failed(row: dict) -> tuple[int, dict]:
    """A failed row with its "shard" (and, where the job de-duplicates, the sample's "key")."""
    row = dict(row)
    shard, key = row.pop("shard"), row.pop("key", None)
    return shard, {"failed": row, **({"key": key} if key is not None else {})}


def keep_one_per_key(items: list[dict]) -> tuple[list[dict], int]:
    """Copies of the same bytes (one key) meet in their shard: keep a copy that got through (then the smallest
    source), so a captioned image is never lost to its uncaptioned copy; (kept items, duplicates dropped).
    Items without a key (failures of other jobs) are all kept."""
    kept, by_key = [], {}
    for item in items:
        key = item["sample"]["key"] if "sample" in item else item.get("key")
        if key is None:
            kept.append(item)
        else:
            by_key.setdefault(key, []).append(item)
    for copies in by_key.values():
        kept.append(min(copies, key=lambda i: ("failed" in i, (i.get("sample") or i.get("failed"))["source"])))
    return kept, len(items) - len(kept)


class WriteShard(beam.DoFn):
    """(shard, [{"sample": ...} | {"failed": ...} | {"scores": ...}]) -> one committed shard; yields {"shard": name,
    "duplicates": copies dropped} (with `dedup`: identical samples meet here, as their key fixes the shard).

    to_webdataset(sample) -> webdataset dict and index_row(sample, shard_name) -> index row are
    module-level functions of the job (picklable); so is load(sample) -> sample, run first on each sample kept
    (the caption job reads the bytes it left behind there): an OSError from it makes the sample a failed row
    (stage "write": "changed_during_job" for cir.dataset.SourceChanged, else "unreadable").
    """

    def __init__(self, output: str, prefix: str, to_webdataset: Callable, index_row: Callable, log_name: str,
                 dedup: bool = False, load: Optional[Callable] = None):
        self.output, self.prefix, self.log_name, self.dedup = output, prefix, log_name, dedup
        self.to_webdataset, self.index_row, self.load = to_webdataset, index_row, load
        self.written = Metrics.counter(log_name, "written")

    def process(self, element) -> Iterator[dict]:
        shard, items = element
        items, duplicates = keep_one_per_key(list(items)) if self.dedup else (list(items), 0)
        samples = [i["sample"] for i in items if "sample" in i]
        failed = [i["failed"] for i in items if "failed" in i]
        scores = [i["scores"] for i in items if "scores" in i]
        if self.load is not None:
            samples = list(self._loaded(samples, failed))
        name = ds.shard_name(self.prefix, shard)
        ds.write_shard(self.output, self.prefix, shard, [self.to_webdataset(s) for s in samples],
                       [self.index_row(s, name) for s in samples], failed, scores)
        self.written.inc(len(samples))
        logging.getLogger(self.log_name).info("wrote shard %s: %d samples, %d failed", name, len(samples),
                                              len(failed))
        yield {"shard": name, "duplicates": duplicates}

    def _loaded(self, samples: list[dict], failed: list[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                yield self.load(sample)
            except OSError as err:
                reason = "changed_during_job" if isinstance(err, ds.SourceChanged) else "unreadable"
                failed.append(ds.failed_row(sample["source"], "write", reason, str(err)))


class WriteShards(beam.PTransform):
    """Shard items (shard, {"sample": ...} | {"failed": ...}), made by as_sample / as_failed, -> one committed
    shard per shard index; yields {"shard", "duplicates"}. One PCollection in: a Flatten of samples and failures
    before the grouping would be one more copy of every image on the DirectRunner (it materializes Flattens)."""

    def __init__(self, output: str, prefix: str, to_webdataset: Callable, index_row: Callable, log_name: str,
                 dedup: bool = False, load: Optional[Callable] = None):
        super().__init__()
        self.args = (output, prefix, to_webdataset, index_row, log_name, dedup, load)

    def expand(self, items):
        return items | "GroupByShard" >> MeasuredGroupByKey() | "Write" >> beam.ParDo(WriteShard(*self.args))


# ------------------------------------------------------------------------------------------ shuffle volume
# On a cluster a job's cost is its shuffles: every grouping step is measured (a Beam counter per step, in the
# namespace below), and run_and_read_stats puts the figures in stats.json as "shuffle_bytes".

SHUFFLE_NAMESPACE = "shuffle_bytes"


def payload_bytes(obj) -> int:
    """About the bytes an element takes on the wire: bytes and arrays by their size, text by its length,
    containers summed, anything else 8. (Run on every element that enters a grouping: kept cheap.)"""
    kind = type(obj)
    if kind is bytes or kind is str or kind is bytearray:
        return len(obj)
    if kind is dict:
        return sum(len(k) if type(k) is str else payload_bytes(k) for k in obj) + sum(map(payload_bytes, obj.values()))
    if kind is tuple or kind is list:
        return sum(map(payload_bytes, obj))
    nbytes = getattr(obj, "nbytes", None)  # numpy arrays, memoryviews
    return nbytes if type(nbytes) is int else 8


class MeasureShuffle(beam.DoFn):
    """Counts the bytes of the elements about to enter the grouping step `step`, passing them on."""

    def __init__(self, step: str):
        self.step = step

    def setup(self):
        self.counter = Metrics.counter(SHUFFLE_NAMESPACE, self.step)

    def start_bundle(self):
        self.counter.inc(0)  # a step that moved nothing is reported as 0, not left out

    def process(self, element):
        self.counter.inc(payload_bytes(element))
        yield element


class MeasuredGroupByKey(beam.PTransform):
    """GroupByKey whose input volume is counted under the transform's own label (`"GroupByShard" >> ...`)."""

    def expand(self, pcoll):
        step = self.label.rsplit("/", 1)[-1]
        return pcoll | "Measure" >> beam.ParDo(MeasureShuffle(step)) | "Group" >> beam.GroupByKey()


class MeasuredCoGroupByKey(beam.PTransform):
    """CoGroupByKey of a dict of PCollections, its inputs' volume counted under the transform's label."""

    def expand(self, pcolls: dict):
        step = self.label.rsplit("/", 1)[-1]
        measured = {tag: pc | f"Measure{tag}" >> beam.ParDo(MeasureShuffle(step)) for tag, pc in pcolls.items()}
        return measured | "Group" >> beam.CoGroupByKey()


def shuffle_bytes(result) -> dict[str, int]:
    """The counters of SHUFFLE_NAMESPACE after a run, by step."""
    from apache_beam.metrics.metric import MetricsFilter

    found: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(SHUFFLE_NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + int(value or 0)
    return dict(sorted(found.items()))


def finalize(output: str, started: float, written_now: list, early_failed: list, extra: dict,
             log_name: str) -> dict:
    """Merge the shards' sidecars into index.parquet / failed.parquet; write the Hugging Face dataset card
    (README.md) and, last, stats.json (its presence means the dataset is complete)."""
    ds.remove_temp_files(output)
    index, failed = ds.merge_sidecars(output, early_failed)
    by_reason: dict[str, int] = {}
    for reason in failed.column("reason").to_pylist():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    stats = {"written": index.num_rows, "failed": sum(by_reason.values()),
             "failed_by_reason": dict(sorted(by_reason.items())), **extra,
             "shards": len(ds.complete_shards(output)), "shards_written_this_run": len(written_now),
             "seconds": round(time.time() - started, 2), "versions": ds.versions()}
    kind = ds.read_json(ds.join(output, "dataset.json"))["kind"]  # written by prepare_output before the job
    ds.write_atomic(ds.join(output, "README.md"),
                    ds.dataset_card(kind, f"{kind.capitalize()} dataset", stats["failed_by_reason"]).encode())
    ds.write_json(ds.join(output, "stats.json"), stats)
    logging.getLogger(log_name).info("%s: %s", log_name, {k: v for k, v in stats.items() if k != "versions"})
    return stats


def run_and_read_stats(p: beam.Pipeline, output: str) -> dict:
    """Run the job; its stats. A job that wrote nothing says so on stderr (exit 0 still: resuming a finished
    dataset writes nothing new, and failed.parquet says why inputs were dropped)."""
    result = p.run()
    result.wait_until_finish()
    stats = ds.read_json(ds.join(output, "stats.json")) or {}
    if stats:  # what each grouping step moved, known only once the run is over
        stats["shuffle_bytes"] = shuffle_bytes(result)
        ds.write_json(ds.join(output, "stats.json"), stats)
    if stats and stats.get("written") == 0:
        print(f"warning: {output}: the dataset holds no samples ({stats.get('failed')} inputs failed: "
              f"{stats.get('failed_by_reason')}; see failed.parquet)", file=sys.stderr)
    return stats


def check_prefix(parser: argparse.ArgumentParser, prefix: str) -> None:
    """Shard names come from the command line: letters, digits, '-' and '_' only, never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", prefix):
        parser.error(f"--shard-prefix {prefix!r}: use letters, digits, '-' and '_' only")
