"""The on-disk dataset contract (SPEC.md, "A dataset on disk"), shared by every writer and reader.

A dataset directory holds `shards/{prefix}-{i:05d}.tar` plus, per shard, `{prefix}-{i:05d}.index.parquet`
and `{prefix}-{i:05d}.failed.parquet` sidecars. A shard is committed by renaming its tar into place, after
its sidecars: a tar that a reader can see is complete, and a rerun skips it. `finalize` merges the sidecars
into `index.parquet` / `failed.parquet` and writes `stats.json` and `dataset.json`. Files are read and
written through fsspec (local paths, and gs:// etc. when their fsspec package is installed), never Beam.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
import uuid
from typing import Iterable, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cir import schema
from cir.errors import CIRError

SCHEMA_VERSION = 1
SHARD_DIR = "shards"
SCORES_FILE = "filter_scores.parquet"  # a synth job's CLIP filter scores of every candidate (merge_sidecars)
TAR_MTIME = 946684800  # 2000-01-01: a fixed member mtime makes equal samples give byte-identical tars
KEY_HEX = 32  # hex digits of sha256 kept in a key (128 bits)
KEY_RE = re.compile(rf"^[0-9a-f]{{{KEY_HEX}}}$")
FAILED_SCHEMA = pa.schema([("source", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("error", pa.string())])


def content_key(data: bytes) -> str:
    """Stable content hash used as `__key__`: hex, no dots or slashes (128 bits of sha256)."""
    return hashlib.sha256(data).hexdigest()[:KEY_HEX]


def join(*parts: str) -> str:
    """A path under a local folder or a URL (gs://bucket/dir)."""
    if "://" in parts[0]:
        return "/".join([parts[0].rstrip("/"), *(p.strip("/") for p in parts[1:])])
    return os.path.join(*parts)


def _fs(path: str):
    """The fsspec filesystem that holds `path` (local, or gs:// etc. with its fsspec package, e.g. gcsfs), and
    the path as that filesystem names it."""
    return fsspec.core.url_to_fs(path)


def check_filesystem(path: str) -> None:
    """ValueError naming what to install when fsspec has no filesystem here for `path`'s scheme (gs:// needs
    gcsfs: `pip install -e '.[gcp]'`; Dataflow workers get it from requirements-dataflow.txt)."""
    try:
        _fs(path)
    except ImportError as err:
        raise ValueError(f"{path}: {err} (for gs:// paths: pip install -e '.[gcp]')") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _names(folder: str) -> list[str]:
    """The names of the entries of a folder ([] when it does not exist). Listed, not globbed: a folder named
    like a pattern ("[2023]") is still just a folder."""
    fs, path = _fs(folder)
    if not fs.isdir(path):
        return []
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic grouping: the shard depends only on the key and the number of shards."""
    return int(key[:15], 16) % num_shards


def num_shards_for(count: int, shard_size: int) -> int:
    return max(1, -(-count // shard_size))


def failed_row(source: str, stage: str, reason: str, error: str) -> dict:
    """One dropped input: `reason` is a short code counted in stats.json, `error` the full message."""
    return {"source": str(source), "stage": stage, "reason": reason, "error": str(error)[:2000]}


def write_atomic(path: str, data: bytes) -> None:
    """Written under a temp name, then renamed into place: a reader sees the whole file or none."""
    fs, target = _fs(path)
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, target)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_table(path: str) -> pa.Table:
    with fsspec.open(path, "rb") as f:
        return pq.read_table(io.BytesIO(f.read()))


def write_shard(out_dir: str, prefix: str, index: int, samples: list[dict], index_rows: list[dict],
                failed_rows: list[dict], score_rows: Optional[list[dict]] = None) -> str:
    """Write one shard: sidecars first, then the tar under a temp name, renamed into place (the commit).

    score_rows (synth's CLIP filter: every scored candidate, kept or not) become a third sidecar,
    `{name}.scores.parquet`, merged into `filter_scores.parquet` (SCORES_FILE) by merge_sidecars.

    samples: webdataset dicts ({"__key__": ..., "jpg": bytes, "txt": str, "json": dict, ...}), sorted here
    by key so a retried bundle or a rerun writes the same bytes. A retried bundle writes its own temp file and
    renames it over the same final name, so nothing is written twice.
    """
    name = shard_name(prefix, index)
    shard_dir = join(out_dir, SHARD_DIR)
    index_rows = sorted(index_rows, key=lambda r: r["key"])
    write_atomic(join(shard_dir, f"{name}.index.parquet"), table_bytes(pa.Table.from_pylist(index_rows)))
    write_atomic(join(shard_dir, f"{name}.failed.parquet"),
                  table_bytes(pa.Table.from_pylist(sorted(failed_rows, key=lambda r: r["source"]),
                                                   schema=FAILED_SCHEMA)))
    if score_rows:
        write_atomic(join(shard_dir, f"{name}.scores.parquet"),
                     table_bytes(pa.Table.from_pylist(sorted(score_rows, key=lambda r: json.dumps(r, sort_keys=True)))))
    write_atomic(join(shard_dir, f"{name}.tar"), tar_bytes(sorted(samples, key=lambda s: s["__key__"])))
    return name


def tar_bytes(samples: Iterable[dict]) -> bytes:
    """A WebDataset tar of samples whose members are already bytes (cir.schema's to_webdataset): member
    `{key}.{name}` per entry, names sorted, in the archive format webdataset's TarWriter writes (pax, mode
    0444, owner "bigdata", TAR_MTIME; the tests compare the bytes with TarWriter's). Written with the standard
    library because the data jobs need nothing else from webdataset, and importing it loads torch: seconds of
    every job's start-up."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for name in sorted(sample):
                if name == "__key__":
                    continue
                data = sample[name]
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError(f"sample {key}: member {name} is {type(data).__name__}, not bytes")
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def complete_shards(out_dir: str) -> list[str]:
    """Names of committed shards (their tar exists), sorted."""
    return sorted(name[: -len(".tar")] for name in _names(join(out_dir, SHARD_DIR)) if name.endswith(".tar"))


def remove_temp_files(out_dir: str) -> int:
    """Temp files left by a killed run; readers never see them (no .tar suffix) but they take space."""
    fs, shard_dir = _fs(join(out_dir, SHARD_DIR))
    found = [f"{shard_dir}/{name}" for name in _names(join(out_dir, SHARD_DIR)) if ".tmp-" in name]
    if found:
        fs.rm(found)
    return len(found)


def merge_sidecars(out_dir: str, extra_failed: Iterable[dict] = ()) -> tuple[pa.Table, pa.Table]:
    """index.parquet = the union of committed shards' index sidecars; failed.parquet likewise plus the
    failures that happened before shard assignment (read/decode), given as `extra_failed`."""
    names = complete_shards(out_dir)
    shard_dir = join(out_dir, SHARD_DIR)
    index_tables = [read_table(join(shard_dir, f"{n}.index.parquet")) for n in names]
    index_tables = [t for t in index_tables if t.num_rows]
    index = pa.concat_tables(index_tables, promote_options="default") if index_tables else pa.table(
        {"key": pa.array([], pa.string()), "shard": pa.array([], pa.string())})
    failed = [read_table(join(shard_dir, f"{n}.failed.parquet")).to_pylist() for n in names]
    rows = [r for part in failed for r in part] + list(extra_failed)
    rows.sort(key=lambda r: (r["source"], r["stage"]))
    write_atomic(join(out_dir, "index.parquet"), table_bytes(index))
    failed_table = pa.Table.from_pylist(rows, schema=FAILED_SCHEMA)
    write_atomic(join(out_dir, "failed.parquet"), table_bytes(failed_table))
    names_there = set(_names(shard_dir))
    scores = [read_table(join(shard_dir, f"{n}.scores.parquet")) for n in names if f"{n}.scores.parquet" in names_there]
    if scores:
        write_atomic(join(out_dir, SCORES_FILE), table_bytes(pa.concat_tables(scores, promote_options="default")))
    return index, failed_table


def write_json(path: str, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json(path: str) -> Optional[dict]:
    fs, target = _fs(path)
    if not fs.exists(target):
        return None
    return json.loads(fs.cat_file(target).decode("utf-8"))


def versions() -> dict:
    from importlib.metadata import version  # not `import webdataset`: it loads torch

    import apache_beam
    import PIL

    return {"apache_beam": apache_beam.__version__, "pillow": PIL.__version__, "pyarrow": pa.__version__,
            "webdataset": version("webdataset"), "schema_version": SCHEMA_VERSION}


def check_model_reference(name: str, what: str, markers: tuple[str, ...] = ()) -> None:
    """Fail before the job starts, with one line, when a model cannot be loaded: a local path that is not
    there. With `markers` (the files a Hugging Face model folder holds: config.json, or model_index.json for a
    diffusers pipeline) also a folder without any of them, a malformed hub id, a hub id that is not in the local
    Hugging Face cache while offline, and one the Hub does not know. Without markers (an open_clip name) the
    model's own factory checks it."""
    path = os.path.expanduser(name)
    if name.startswith((".", "/", "~")) or os.path.isdir(path):
        if not os.path.exists(path):
            raise ValueError(f"{what} model not found: {name}")
        if markers and os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, m)) for m in markers):
            raise ValueError(f"{what} model {name} is a folder without {' or '.join(markers)}: not a Hugging Face "
                             f"model folder (one written by save_pretrained)")
        return
    if not markers:
        return
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ValueError(f"{what} model {name!r} is neither a local folder nor a Hugging Face Hub id ({err})") from None
    if any(isinstance(try_to_load_from_cache(name, marker), str) for marker in markers):
        return  # downloaded before: loads offline too
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{what} model {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                         f"download it once (huggingface-cli download {name}) or pass a local folder")
    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(f"{what} model {name} is not on the Hugging Face Hub (a typo? a private model needs "
                         f"huggingface-cli login)") from None
    except Exception as err:  # no network, a proxy, a timeout
        raise ValueError(f"{what} model {name} is not in the local Hugging Face cache and the Hub cannot be reached "
                         f"({err.__class__.__name__}): download it where there is a network, or pass a local "
                         f"folder") from None


class NotARegularFile(OSError):
    """A local input path that is a FIFO, a device or a socket: opening it could block forever, so it is not."""


class SourceChanged(OSError):
    """A file read again (reread, read_spans) is not the one read first: its size or modification time changed."""


def read_file(path: str) -> bytes:
    """A file's bytes (local, or gs:// etc. through fsspec). A local path that is not a regular file raises
    NotARegularFile without being opened; a broken symlink raises FileNotFoundError."""
    if "://" in path:
        with fsspec.open(path, "rb") as f:
            return f.read()
    return read_local(path)[0]


def read_local(path: str) -> tuple[bytes, str]:
    """A local file's bytes and its stamp ("size:mtime_ns", from the same open file), which reread checks.
    Not through fsspec: its open costs more than reading a small image."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotARegularFile(f"{path} is not a regular file (a FIFO, device or socket): not read")
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        return f.read(), f"{info.st_size}:{info.st_mtime_ns}"


def reread(path: str, stamp: str) -> bytes:
    """A local file's bytes again, as they were when read_local gave `stamp`; SourceChanged if its size or
    modification time moved since (the same test as a dataset's input fingerprint)."""
    data, now = read_local(path)
    if now != stamp:
        raise SourceChanged(f"{path} changed while the job ran (size:mtime_ns {stamp} when read, {now} now)")
    return data


def iter_shard(path: str) -> Iterator[dict]:
    """The samples of one committed shard as raw webdataset dicts ({"__key__", "jpg": bytes, ...})."""
    for sample, _ in shard_members(path):
        yield sample


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then extension
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def shard_members(path: str) -> Iterator[tuple[dict, dict[str, tuple[int, int]]]]:
    """Each sample of a shard as iter_shard gives it, with where its members' bytes lie in the file: {member:
    (offset, size)}, for read_spans. Grouped as webdataset's group_by_keys groups a tar (the key: a member's
    name up to the first dot of its last component; consecutive members of one key make a sample; extensions
    lower-cased), with the standard library: the data jobs read shards without webdataset, whose import loads
    torch (seconds of every job's start-up), and webdataset does not report offsets."""
    with fsspec.open(path, "rb") as stream:
        tar = tarfile.open(fileobj=stream, mode="r|")
        sample: Optional[dict] = None
        where: dict[str, tuple[int, int]] = {}
        for info in tar:
            found = _MEMBER.match(info.name)
            if not info.isreg() or not found or _META.match(info.name):
                continue
            key, ext = found.group(1), found.group(2).lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample, where
                sample, where = {"__key__": key}, {}
            if ext in sample:
                raise ValueError(f"{path}: {info.name} appears twice in the shard")
            sample[ext] = tar.extractfile(info).read()
            where[ext] = (info.offset_data, info.size)
        if sample is not None:
            yield sample, where


def shard_stamp(path: str) -> str:
    """A shard file's size and modification time (or object generation): read_spans checks that the file is
    the one its offsets were taken from."""
    fs, where = _fs(path)
    info = fs.info(where)
    return f"{info['size']}:{info.get('mtime') or info.get('generation') or info.get('updated')}"


def read_spans(path: str, stamp: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes at (offset, size) `spans` of a shard file, read in one opening; SourceChanged when the file is
    no longer the one `stamp` (shard_stamp) describes."""
    now = shard_stamp(path)
    if now != stamp:
        raise SourceChanged(f"{path} changed while the job ran (stamp {stamp} when read, {now} now)")
    out = []
    with fsspec.open(path, "rb") as f:
        for offset, size in spans:
            f.seek(offset)
            out.append(f.read(size))
    return out


def dataset_card(kind: str, title: str, dropped: Optional[dict] = None) -> str:
    """README.md in the Hugging Face dataset-card format: its YAML header names the shards and declares every
    member's type, so `datasets.load_dataset(DIR)` reads the dataset as it is (without the declaration, its
    webdataset loader refuses shards whose samples carry different image formats). `dropped`: inputs dropped by
    reason (stats.json's failed_by_reason), said in the body, where near-duplicates and excluded benchmark
    images are what a reader of the card wants to know."""
    features = []
    for name, kind_of in [*schema.KINDS[kind].members().items(), ("__key__", "string"), ("__url__", "string")]:
        features += [f"  - name: {name}",
                     "    list: float16" if kind_of == schema.EMBEDDING else f"    dtype: {kind_of}"]
    header = ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
              f"    path: {SHARD_DIR}/*.tar", "dataset_info:", "  features:", *features, "---"]
    body = [f"# {title}", "",
            f"A {kind} dataset of the CIR toolkit: WebDataset shards under `{SHARD_DIR}/`, their metadata in",
            "`index.parquet`, dropped inputs in `failed.parquet`, the command that made it in `dataset.json`.",
            "Members are described in the toolkit's docs/SPEC.md. Any WebDataset reader reads the shards;",
            "`datasets.load_dataset(\"path/to/this/folder\")` reads them with the types declared above."]
    if dropped:
        body += ["", "Inputs dropped, by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) + "."]
        if dropped.get("excluded"):
            body.append("`excluded`: copies of images in the folders given to `--exclude` (a benchmark's), removed so "
                        "that it does not score its own images (the folders are named in `dataset.json`, each match "
                        "in `failed.parquet`).")
    return "\n".join(header + [""] + body) + "\n"


class IncompleteDatasetError(CIRError, ValueError):
    """A finished dataset whose index.parquet names shards its folder does not hold."""


def shard_urls(path: str) -> list[str]:
    """Committed shard files of a dataset directory, sorted. A finished dataset's index.parquet must name no
    shard the folder lacks (IncompleteDatasetError): a deleted or partly copied shard would otherwise be read
    around without a word, as every reader of the folder goes through here (inspect checks it too)."""
    names = complete_shards(path)
    index = join(path, "index.parquet")
    fs, local = _fs(index)
    if fs.isfile(local):
        with fsspec.open(index, "rb") as f:  # the one column, its distinct values: cheap at 100M rows too
            listed = set(pc.unique(pq.read_table(f, columns=["shard"]).column("shard")).to_pylist())
        missing = sorted(listed - set(names))
        if missing:
            raise IncompleteDatasetError(
                f"{path}: index.parquet lists samples in {len(listed)} shard(s), {len(missing)} of them missing under "
                f"{SHARD_DIR}/ ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the dataset is damaged "
                f"or partly copied; copy it whole or rerun the job that made it")
    return [join(path, SHARD_DIR, f"{n}.tar") for n in names]


def load_mix(manifest: str) -> list[dict]:
    """A mix manifest (YAML or JSON): which datasets to train on and with what weight.

        datasets:
          - {path: runs/demo/triplets_low, weight: 1.0}
          - {path: runs/demo/triplets_high, weight: 2.0}

    Relative paths are relative to the manifest. Returns [{"path", "weight", "kind", "shards": [urls]}]
    with the weights normalised to sum to 1; a missing or empty dataset, or a mix of kinds, is an error.
    """
    import yaml

    with fsspec.open(manifest, "rb") as f:
        spec = yaml.safe_load(f.read().decode("utf-8"))
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries:
        raise ValueError(f"{manifest}: expected a 'datasets' list of {{path, weight}}")
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    out = []
    for entry in entries:
        path, weight = entry.get("path"), float(entry.get("weight", 1.0))
        if not path or weight <= 0:
            raise ValueError(f"{manifest}: each dataset needs a path and a positive weight, got {entry}")
        if "://" not in path and not os.path.isabs(path):
            path = join(base, path)
        card = read_json(join(path, "dataset.json"))
        if card is None:
            raise ValueError(f"{manifest}: {path} is not a dataset (no dataset.json)")
        urls = shard_urls(path)
        if not urls:
            raise ValueError(f"{manifest}: {path} has no shards")
        out.append({"path": path, "weight": weight, "kind": card.get("kind"), "shards": urls})
    kinds = {e["kind"] for e in out}
    if len(kinds) > 1:
        raise ValueError(f"{manifest}: mixes dataset kinds {sorted(kinds)}")
    total = sum(e["weight"] for e in out)
    for e in out:
        e["weight"] /= total
    return out
