"""Reading images into records, from any path Beam's FileSystems reads (local, gs://, ...).

A record is a dict `{"source": str, "data": bytes, "caption": str | None}`, with `"stamp"` (cir.dataset.read_local)
when the source is a local file that can be read again; inputs that cannot be read become `failed` rows
instead. Supported inputs (`--input`):

* a directory (recursive) or a glob: image files, with an optional sidecar `{stem}.txt` or `{stem}.json`
  (its "caption" or "text" field) next to each; files are paired with their sidecars by a GroupByKey on the
  path without its last extension, so one listing serves both and no per-file existence checks are made;
* WebDataset / img2dataset tar shards (`*.tar`, brace patterns allowed): `key.jpg` + `key.txt`/`key.json`;
* a parquet file (or glob) with a path column (`--path-column`) and an optional caption column
  (`--caption-column`); relative paths are relative to the parquet file.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import uuid
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from cir.dataset import NotARegularFile, failed_row, join, read_file, read_local, write_atomic

# Input files (and input tar members) read as images; the job writes them as one of cir.schema.IMAGE_EXTS.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
SIDECAR_EXTS = ("txt", "json")
FAILED = "failed"
RECORDS = "records"
EXPECTED = "expected"  # ReadInputs' count of inputs before any bytes are read


def input_kind(src: str) -> str:
    if src.endswith(".parquet"):
        return "parquet"
    if src.endswith(".tar") or src.endswith(".tar}"):
        return "tar"
    return "files"


def file_pattern(src: str) -> str:
    """A directory means everything below it; anything else is taken as a glob. A local path that exists is
    taken literally, glob characters in its name escaped (a folder named "[2023]")."""
    if "://" not in src and os.path.exists(src):
        return os.path.join(glob.escape(src), "**") if os.path.isdir(src) else glob.escape(src)
    if any(ch in src for ch in "*?["):
        return src
    is_dir = src.endswith("/")  # the only way to say "directory" for object stores without listing them
    if not is_dir:
        try:
            is_dir = FileSystems.match([FileSystems.join(src, "*")])[0].metadata_list != []
        except Exception:  # no such path or a filesystem that cannot list here: take it as a glob
            is_dir = False
    if not is_dir:
        return src
    # Plain string join for URLs: building the job must not need the remote filesystem's client library.
    return src.rstrip("/") + "/**" if "://" in src else FileSystems.join(src, "**")


def expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def list_inputs(src: str) -> dict:
    """What the job will read: path -> Beam file metadata (size, mtime) of every file its patterns match."""
    kind = input_kind(src)
    patterns = expand_braces(src) if kind == "tar" else [file_pattern(src)] if kind == "files" else [src]
    found = {}
    for result in FileSystems.match(patterns):
        found.update({m.path: m for m in result.metadata_list})
    return found


def input_fingerprint(listing: dict) -> dict:
    """A listing (list_inputs) in three numbers: its files, their bytes, and a hash of the sorted
    (path, size, mtime) lines. A rerun into the same output compares it, so a changed input is not half-added to
    a finished dataset."""
    digest = hashlib.sha256()
    for path in sorted(listing):
        digest.update(f"{path}\t{listing[path].size_in_bytes}\t{listing[path].last_updated_in_seconds}\n".encode())
    return {"files": len(listing), "bytes": sum(m.size_in_bytes for m in listing.values()),
            "sha256": digest.hexdigest()[:16]}


def check_has_inputs(src: str, listing: dict) -> None:
    """An input that matches nothing the job reads (a glob's typo, an empty folder) is an error, not an empty
    dataset: ValueError naming what was looked for."""
    kind = input_kind(src)
    wanted = {"files": IMAGE_EXTS, "tar": ("tar",), "parquet": ("parquet",)}[kind]
    if not any(_split_ext(path)[1] in wanted for path in listing):
        what = f"image files ({', '.join(IMAGE_EXTS)})" if kind == "files" else f"{kind} files"
        raise ValueError(f"--input {src} matches no {what}" + (f" ({len(listing)} other files)" if listing else ""))


def check_has_sidecars(src: str, listing: dict) -> None:
    """For `--captioner sidecar` on image files: ValueError when not one image has a sidecar caption beside it
    (real photos rarely do), naming the flag to use instead; every input would otherwise become a failed row.
    Images with and without sidecars mixed are left to the job (the ones without: failed rows)."""
    if input_kind(src) != "files":  # tars carry their captions inside: the job reads them
        return
    groups = stem_groups(listing)
    images = [paths for _, paths in groups if any(_split_ext(p)[1] in IMAGE_EXTS for p in paths)]
    if images and not any(_split_ext(p)[1] in SIDECAR_EXTS for paths in images for p in paths):
        raise ValueError(f"--captioner sidecar reads each image's own caption file (IMAGE.txt or IMAGE.json), and "
                         f"none of the {len(images)} images under --input {src} has one (a glob must match them too: "
                         f"dir/* rather than dir/*.jpg): caption them with a model, e.g. --captioner "
                         f"Salesforce/blip-image-captioning-base (docs/CAPTION.md)")


def broken_links(src: str) -> list[dict]:
    """Failed rows for the image names under a local input whose symlink points nowhere: Beam's listing skips
    them without a word, so they are counted here."""
    if "://" in src or input_kind(src) != "files":
        return []
    paths = _symlinks_under(src) if os.path.isdir(src) else glob.glob(file_pattern(src), recursive=True)
    return [failed_row(path, "read", "broken_symlink", f"{path} -> {os.readlink(path)}: the link's target does "
                       f"not exist") for path in sorted(paths)
            if is_image(path) and os.path.islink(path) and not os.path.exists(path)]


def _symlinks_under(folder: str) -> list[str]:
    """The symbolic links below a folder, without following linked folders (as the listing does not): a walk
    that looks at no file but the links (glob stats every name)."""
    found, todo = [], [folder]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    found.append(entry.path)
                elif entry.is_dir():
                    todo.append(entry.path)
    return found


def _split_ext(path: str) -> tuple[str, str]:
    stem, dot, ext = path.rpartition(".")
    if not dot or "/" in ext:
        return path, ""
    return stem, ext.lower()


def caption_from_json(text: bytes | str) -> Optional[str]:
    """The caption field of a sidecar or img2dataset json ("caption", else "text"); None when absent."""
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(meta, dict):
        for field in ("caption", "text"):
            if isinstance(meta.get(field), str):
                return meta[field]
    return None


def is_image(path: str) -> bool:
    return _split_ext(path)[1] in IMAGE_EXTS


def read_stamped(path: str) -> tuple[bytes, Optional[str]]:
    """A file's bytes and, for a local file, its stamp (cir.dataset.read_local: it can be read again)."""
    return (read_file(path), None) if "://" in path else read_local(path)


class ByStem(beam.DoFn):
    """(stem, path) for image files and their sidecars; other files are not inputs."""

    def process(self, path: str) -> Iterator[tuple[str, str]]:
        stem, ext = _split_ext(path)
        if ext in IMAGE_EXTS or ext in SIDECAR_EXTS:
            yield stem, path


def stem_groups(paths) -> list[tuple[str, list[str]]]:
    """What ByStem + a grouping make of a listing, in memory: (stem, its image and sidecar paths), sorted."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        for stem, path in ByStem().process(path):
            groups.setdefault(stem, []).append(path)
    return sorted(groups.items())


class ReadImageGroup(beam.DoFn):
    """An image file (+ sidecar) -> record; a sidecar with no image is not an input."""

    def process(self, element) -> Iterator:
        stem, paths = element
        paths = sorted(paths)
        by_ext = {_split_ext(p)[1]: p for p in paths}
        sidecar_caption, problem = None, None  # problem: why a sidecar there gave no caption (for failed.parquet)
        if "txt" in by_ext:
            try:
                sidecar_caption = read_file(by_ext["txt"]).decode("utf-8").strip()
            except UnicodeDecodeError as err:
                problem = f"sidecar {by_ext['txt']} is not UTF-8 ({err.reason} at byte {err.start})"
            except OSError as err:
                problem = f"sidecar {by_ext['txt']} cannot be read ({err})"
        elif "json" in by_ext:
            try:
                sidecar_caption = caption_from_json(read_file(by_ext["json"]))
            except OSError as err:
                problem = f"sidecar {by_ext['json']} cannot be read ({err})"
        for path in paths:
            if not is_image(path):
                continue
            try:
                data, stamp = read_stamped(path)
            except NotARegularFile as err:
                yield beam.pvalue.TaggedOutput(FAILED, failed_row(path, "read", "not_a_regular_file", str(err)))
                continue
            except Exception as err:  # permission denied, vanished file, remote errors
                yield beam.pvalue.TaggedOutput(FAILED, failed_row(path, "read", "unreadable", repr(err)))
                continue
            yield {"source": path, "data": data, "caption": sidecar_caption, **({"stamp": stamp} if stamp else {}),
                   **({"sidecar_problem": problem} if problem else {})}


class TarIntegrity:
    """A read-through wrapper that tells whether a tar stream really ended.

    Python's tarfile, in the stream mode webdataset uses, stops *silently* at a damaged header after the
    first one, and at a cut-off end: the samples after it would vanish without a failed row. A complete
    tar is a whole number of 512-byte blocks that ends in two zero blocks, with only zeros after the last
    member; `problem()` says which of these does not hold.
    """

    BLOCK = 512

    def __init__(self, raw):
        self.raw = raw
        self.total = 0
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-2 * self.BLOCK:]
        return data

    def problem(self) -> Optional[str]:
        leftover_nonzero = False
        while True:  # drain what tarfile did not read
            chunk = self.read(1 << 20)
            if not chunk:
                break
            leftover_nonzero |= chunk.count(0) != len(chunk)
        if leftover_nonzero:
            return "unreadable data after the last good member (damaged header?)"
        if self.total % self.BLOCK or self.tail != bytes(2 * self.BLOCK):
            return f"no end-of-archive marker after {self.total} bytes (truncated tar?)"
        return None


class ReadTarShard(beam.DoFn):
    """A WebDataset tar -> one record per sample; a corrupt member or a truncated tar is a failed row and
    the samples before it are kept."""

    def process(self, meta) -> Iterator:
        from webdataset import tariterators

        path = meta.path if hasattr(meta, "path") else meta
        errors: list[Exception] = []

        def keep_going(err: Exception) -> bool:
            errors.append(err)
            return False  # webdataset: False stops the iterator (a tar stream cannot be resynchronised)

        try:
            stream = FileSystems.open(path, compression_type="uncompressed")
        except Exception as err:
            yield beam.pvalue.TaggedOutput(FAILED, failed_row(path, "read", "unreadable", repr(err)))
            return
        with stream:
            checked = TarIntegrity(stream)
            files = tariterators.tar_file_expander([{"url": path, "stream": checked}], handler=keep_going)
            for sample in tariterators.group_by_keys(files, handler=keep_going):
                yield from self._record(path, sample)
            if not errors and (problem := checked.problem()):
                errors.append(ValueError(problem))
        for err in errors:
            yield beam.pvalue.TaggedOutput(FAILED, failed_row(path, "read", "corrupt_tar", repr(err)))

    @staticmethod
    def _record(path: str, sample: dict) -> Iterator:
        source = f"{path}::{sample['__key__']}"
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if image_ext is None:
            yield beam.pvalue.TaggedOutput(FAILED, failed_row(source, "read", "no_image", "sample has no image member"))
            return
        caption = None
        if "txt" in sample:
            try:
                caption = sample["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                caption = None
        elif "json" in sample:
            caption = caption_from_json(sample["json"])
        yield {"source": source, "data": sample[image_ext], "caption": caption}


class ReadParquetRow(beam.DoFn):
    """(parquet file, row) -> record, reading the image the row points to."""

    def __init__(self, path_column: str, caption_column: Optional[str]):
        self.path_column = path_column
        self.caption_column = caption_column

    def process(self, element) -> Iterator:
        parquet_path, row = element
        path = row.get(self.path_column)
        if not isinstance(path, str) or not path:
            yield beam.pvalue.TaggedOutput(FAILED, failed_row(f"{parquet_path}:{row}", "read", "no_path",
                                                              f"row has no '{self.path_column}' value"))
            return
        if "://" not in path and not posixpath.isabs(path):
            path = FileSystems.join(posixpath.dirname(parquet_path), path)
        try:
            data, stamp = read_stamped(path)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(FAILED, failed_row(path, "read", "unreadable", repr(err)))
            return
        caption = row.get(self.caption_column) if self.caption_column else None
        yield {"source": path, "data": data, "caption": caption if isinstance(caption, str) else None,
               **({"stamp": stamp} if stamp else {})}


class EmitListed(beam.DoFn):
    """Impulse -> the (stem, paths) groups of a listing, read from the file ReadInputs wrote them to. Not carried
    in the DoFn: Beam pickles a DoFn's state and compresses it with bz2 at every translation of the graph (three
    in a local run: 0.47 s for 12,000 images' groups), and beam.Create also infers a type from every element."""

    def __init__(self, path: str):
        self.path = path

    def process(self, _) -> Iterator[tuple[str, list[str]]]:
        for stem, paths in json.loads(read_file(self.path)):
            yield stem, paths


class ReadInputs(beam.PTransform):
    """--input -> {RECORDS: records, FAILED: failed rows, EXPECTED: one element, the number of inputs known
    before their bytes are read (the image paths of the listing, the parquet rows; a tar's members are known
    only by reading it), which sizes the shards without waiting on the bytes}.

    listing: the launcher's list_inputs(src). A local folder or glob is read from it, its images already paired
    with their sidecars, rather than matched and grouped again (the job reads exactly the files the input
    fingerprint covers, and lists them once); a remote one is matched and grouped by the workers, as a listing
    of millions of paths does not belong in the pipeline's graph. The pairs go to the workers in a file under
    `scratch` (a folder they can read; named `listing.tmp-*`, which cir.dataset.remove_temp_files removes from a
    dataset's shard folder)."""

    def __init__(self, src: str, path_column: str = "path", caption_column: Optional[str] = "caption",
                 listing: Optional[dict] = None, scratch: Optional[str] = None):
        super().__init__()
        if listing is not None and scratch is None:
            raise ValueError("ReadInputs: a listing needs a scratch folder to hand it to the workers")
        self.src = src
        self.path_column = path_column
        self.caption_column = caption_column
        self.listing = listing
        self.scratch = scratch

    def expand(self, p):
        from pipeline.jobs import MeasureShuffle, MeasuredGroupByKey

        kind = input_kind(self.src)
        if kind == "tar":
            read = (p | "TarPatterns" >> beam.Create(expand_braces(self.src))
                    | "MatchTars" >> fileio.MatchAll()
                    | "MeasureReshuffle" >> beam.ParDo(MeasureShuffle("Reshuffle"))  # file metadata, no bytes
                    | "Reshuffle" >> beam.Reshuffle()
                    | "ReadTars" >> beam.ParDo(ReadTarShard()).with_outputs(FAILED, main=RECORDS))
            return {RECORDS: read[RECORDS], FAILED: read[FAILED],
                    EXPECTED: read[RECORDS] | "CountRecords" >> beam.combiners.Count.Globally()}
        if kind == "parquet":
            from apache_beam.io.parquetio import ReadAllFromParquet

            rows = (p | "ParquetPatterns" >> beam.Create([self.src])
                    | "ReadParquet" >> ReadAllFromParquet(with_filename=True))
            read = rows | "ReadRows" >> beam.ParDo(ReadParquetRow(self.path_column, self.caption_column)).with_outputs(
                FAILED, main=RECORDS)
            return {RECORDS: read[RECORDS], FAILED: read[FAILED],
                    EXPECTED: rows | "CountRows" >> beam.combiners.Count.Globally()}
        if self.listing is not None and "://" not in self.src:
            path = join(self.scratch, f"listing.tmp-{uuid.uuid4().hex}.json")
            write_atomic(path, json.dumps(stem_groups(self.listing)).encode())
            groups = p | "Impulse" >> beam.Impulse() | "Listed" >> beam.ParDo(EmitListed(path))
            expected = p | "CountListed" >> beam.Create([sum(map(is_image, self.listing))])
        else:
            by_stem = (p | "MatchFiles" >> fileio.MatchFiles(file_pattern(self.src))
                       | "ByStem" >> beam.ParDo(lambda meta: ByStem().process(meta.path)))
            groups = by_stem | "GroupSidecars" >> MeasuredGroupByKey()
            expected = (by_stem | "ImagePaths" >> beam.Filter(lambda item: is_image(item[1]))
                        | "CountImages" >> beam.combiners.Count.Globally())
        read = groups | "ReadFiles" >> beam.ParDo(ReadImageGroup()).with_outputs(FAILED, main=RECORDS)
        failed = (read[FAILED], p | "BrokenLinks" >> beam.Create(broken_links(self.src))) | "ReadFailed" >> beam.Flatten()
        return {RECORDS: read[RECORDS], FAILED: failed, EXPECTED: expected}
