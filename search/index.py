"""A gallery index on disk, built and extended by `python -m search index`; search/search.py queries it.

    INDEX/index.json              checkpoint, gallery fingerprint (the CLIP's weights), embed_dim, parts, count
    INDEX/parts/part-00000.npy    [n, d] float32 normalised image features
    INDEX/parts/part-00000.parquet  name, source, sha256, thumb (JPEG, <= --thumb-size px): one row per feature
    INDEX/faiss.index             (large galleries) an IVF index over the live rows, rebuilt when parts change
    INDEX/failed.parquet          the images the last `search index` run could not use, with the reason

Each `search index` run appends one or more parts and then rewrites index.json (atomically): a killed run leaves
parts that index.json does not list, and the next run overwrites them. Images already indexed with the same
content (name + sha256) are not encoded again; a name whose content changed gets a new row in the new part,
which supersedes the old one. Gallery features depend only on the image tower, so the index records the
fingerprint of the CLIP's weights and refuses a checkpoint with another CLIP.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from cir.dataset import write_atomic, write_json
from cir.encoder import Encoder, capped_k, top_k
from cir.errors import CIRError

INDEX_FILE = "index.json"
PART_DIR = "parts"
FAISS_FILE = "faiss.index"
FAILED_FILE = "failed.parquet"
INDEX_VERSION = 1
PART_SCHEMA = pa.schema([("name", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                         ("thumb", pa.binary())])
THUMB_ROWS = 256  # parquet row group size: a thumbnail read touches one small group


class GalleryError(CIRError, ValueError):
    """A gallery index or query problem the user can fix (printed without a traceback by `python -m search`)."""


# ------------------------------------------------------------------------------------------ gallery sources

@dataclass
class GalleryImage:
    name: str  # how results name it: path relative to the folder / glob root, or the sample key
    source: str  # where it is read from: a path, or "shard.tar#key"
    data: Optional[bytes]  # None: could not be read (error says why)
    error: str = ""


def _glob_root(pattern: str) -> str:
    head = pattern
    while any(ch in head for ch in "*?[{"):
        head = os.path.dirname(head)
    return head


def _files(src: str) -> Iterator[GalleryImage]:
    from apache_beam.io.filesystems import FileSystems

    from cir.dataset import read_file
    from pipeline.sources import IMAGE_EXTS, file_pattern

    # local paths are made absolute: the index's sources must open from any working directory
    pattern = file_pattern(src if "://" in src else os.path.abspath(src))
    root = _glob_root(pattern)
    metas = FileSystems.match([pattern])[0].metadata_list
    paths = sorted(m.path for m in metas if m.path.rpartition(".")[2].lower() in IMAGE_EXTS)
    if not paths:
        raise GalleryError(f"no images found in {src} (looked for {pattern})")
    for path in paths:
        name = os.path.relpath(path, root) if "://" not in path else path[len(root):].lstrip("/")
        try:  # read_file never opens a FIFO, device or socket
            yield GalleryImage(name, path, read_file(path))
        except Exception as err:  # not a regular file, permission denied, vanished file, remote errors
            yield GalleryImage(name, path, None, f"unreadable: {err!r}")


def _shards(urls: list[str]) -> Iterator[GalleryImage]:
    from cir.dataset import iter_shard
    from cir.schema import IMAGE

    for url in urls:
        try:
            for sample in iter_shard(url):
                key = sample["__key__"]
                field = IMAGE.image_member(sample)
                yield GalleryImage(key, f"{url}#{key}", sample[field] if field else None,
                                   "" if field else "sample has no jpg/png/webp member")
        except Exception as err:  # a damaged shard: what was read stays indexed, the rest is reported
            yield GalleryImage(os.path.basename(url), url, None, f"unreadable shard: {err!r}")


def gallery_images(src: str) -> Iterator[GalleryImage]:
    """The images of a folder (recursive), a glob, webdataset tars (brace patterns allowed) or a caption
    dataset directory (its committed shards)."""
    from cir.dataset import read_json, shard_urls
    from pipeline.sources import expand_braces, input_kind

    if "://" not in src and os.path.isdir(src) and read_json(os.path.join(src, "dataset.json")) is not None:
        urls = shard_urls(src)
        if not urls:
            raise GalleryError(f"{src} is a dataset with no committed shards")
        return _shards(urls)
    if input_kind(src) == "tar":
        return _shards(sorted(expand_braces(src)))
    return _files(src)


def thumbnail(img: Image.Image, size: int) -> bytes:
    small = img.copy()
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ the index

def read_manifest(index_dir: Path) -> Optional[dict]:
    path = index_dir / INDEX_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise GalleryError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("version") != INDEX_VERSION:
        raise GalleryError(f"{path}: unknown index version {manifest.get('version')!r}")
    return manifest


class GalleryIndex:
    """The live rows of an index: features [N, d], names, sources, sha256s; thumbnails read on demand."""

    def __init__(self, index_dir: Union[str, Path]):
        self.dir = Path(index_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise GalleryError(f"{self.dir} is not a gallery index (no {INDEX_FILE}): build one with "
                              f"`python -m search index`")
        self.manifest = manifest
        feats, names, sources, shas, where = [], [], [], [], []
        for part in manifest["parts"]:
            table = pq.read_table(self.dir / PART_DIR / f"{part}.parquet", columns=["name", "source", "sha256"])
            f = np.load(self.dir / PART_DIR / f"{part}.npy", allow_pickle=False)
            if len(f) != table.num_rows:
                raise GalleryError(f"{self.dir}: part {part} has {len(f)} features for {table.num_rows} rows")
            feats.append(f)
            names += table.column("name").to_pylist()
            sources += table.column("source").to_pylist()
            shas += table.column("sha256").to_pylist()
            where += [(part, i) for i in range(table.num_rows)]
        last = {n: i for i, n in enumerate(names)}  # a later row of the same name supersedes earlier ones
        live = sorted(last.values())
        all_feats = np.concatenate(feats) if feats else np.zeros((0, manifest["embed_dim"]), np.float32)
        self.features = torch.from_numpy(np.ascontiguousarray(all_feats[live]))
        self.names = [names[i] for i in live]
        self.sources = [sources[i] for i in live]
        self.sha256 = [shas[i] for i in live]
        self._where = [where[i] for i in live]
        self.row_of_sha = {s: r for r, s in enumerate(self.sha256)}
        self.faiss = None
        faiss_meta = manifest.get("faiss")
        if faiss_meta and (self.dir / FAISS_FILE).is_file():
            import faiss

            self.faiss = faiss.read_index(str(self.dir / FAISS_FILE))
            self.faiss.nprobe = int(faiss_meta.get("nprobe", 16))

    def __len__(self) -> int:
        return len(self.names)

    @functools.lru_cache(maxsize=64)
    def _thumb_group(self, part: str, group: int) -> list:
        f = pq.ParquetFile(self.dir / PART_DIR / f"{part}.parquet")
        return f.read_row_group(group, columns=["thumb"]).column("thumb").to_pylist()

    def thumb(self, row: int) -> bytes:
        part, i = self._where[row]
        return self._thumb_group(part, i // THUMB_ROWS)[i % THUMB_ROWS]

    def image_bytes(self, row: int) -> bytes:
        """The full image of a row, from its source (a file, or a member of a shard)."""
        from cir.dataset import iter_shard
        from cir.schema import IMAGE

        source = self.sources[row]
        url, _, key = source.rpartition("#")
        if url and url.endswith(".tar"):
            for sample in iter_shard(url):
                if sample["__key__"] == key:
                    return sample[IMAGE.image_member(sample)]
            raise GalleryError(f"{key} is no longer in {url}")
        from cir.dataset import read_file

        return read_file(source)

    def top(self, queries: torch.Tensor, k: int, exclude: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rows) [Q, <=k]: exact chunked top-k, or the faiss IVF index when the index has one."""
        k = capped_k(k, len(self), exclude)
        if self.faiss is None:
            return top_k(queries, self.features, k, exclude)
        scores, rows = self.faiss.search(queries.numpy().astype(np.float32), k + 1)
        out_s, out_r = [], []
        for s, r, e in zip(scores, rows, exclude):
            keep = [(float(a), int(b)) for a, b in zip(s, r) if b >= 0 and b != e][:k]
            out_s.append([a for a, _ in keep])
            out_r.append([b for _, b in keep])
        return torch.tensor(out_s), torch.tensor(out_r, dtype=torch.long)


@dataclass
class IndexConfig:
    images: str
    output: str
    checkpoint: str
    pretrained: Optional[str] = None  # with a CLIP architecture name: its open_clip tag or weights file
    batch_size: int = 64
    device: str = "cpu"
    thumb_size: int = 256
    part_size: int = 50_000  # rows per part file: bounds the memory of one run
    faiss_min: int = 100_000  # galleries at least this large also get a faiss IVF index
    faiss_nprobe: int = 16


def _indexed_sha(index_dir: Path, manifest: Optional[dict]) -> dict[str, str]:
    known: dict[str, str] = {}
    for part in (manifest or {}).get("parts", []):
        table = pq.read_table(index_dir / PART_DIR / f"{part}.parquet", columns=["name", "sha256"])
        known.update(zip(table.column("name").to_pylist(), table.column("sha256").to_pylist()))
    return known


class _PartWriter:
    """Buffers encoded rows and writes them as parts; index.json is rewritten after each part."""

    def __init__(self, cfg: IndexConfig, encoder: Encoder, manifest: dict):
        self.cfg, self.encoder, self.manifest = cfg, encoder, manifest
        self.dir = Path(cfg.output)
        (self.dir / PART_DIR).mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.images: list[Image.Image] = []
        self.feats: list[np.ndarray] = []
        self.written = 0

    def add(self, item: GalleryImage, sha: str, img: Image.Image) -> None:
        self.rows.append({"name": item.name, "source": item.source, "sha256": sha,
                          "thumb": thumbnail(img, self.cfg.thumb_size)})
        self.images.append(img)
        if len(self.images) == self.cfg.batch_size:
            self._encode()
        if len(self.rows) >= self.cfg.part_size:
            self.flush()

    def _encode(self) -> None:
        if self.images:
            self.feats.append(self.encoder.images(self.images, self.cfg.batch_size, progress=False).numpy())
            self.images = []

    def flush(self) -> None:
        self._encode()
        if not self.rows:
            return
        part = f"part-{len(self.manifest['parts']):05d}"
        # rows are grouped so that a thumbnail read decodes one small row group
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=PART_SCHEMA), buf, row_group_size=THUMB_ROWS)
        npy = io.BytesIO()
        np.save(npy, np.concatenate(self.feats).astype(np.float32), allow_pickle=False)
        write_atomic(str(self.dir / PART_DIR / f"{part}.npy"), npy.getvalue())
        write_atomic(str(self.dir / PART_DIR / f"{part}.parquet"), buf.getvalue())
        self.manifest["parts"].append(part)
        self.manifest.pop("faiss", None)  # stale until rebuilt at the end of the run
        write_json(str(self.dir / INDEX_FILE), self.manifest)
        self.written += len(self.rows)
        self.rows, self.feats = [], []


def build_index(cfg: IndexConfig) -> dict:
    """Encode the new or changed images of `cfg.images` into the index at `cfg.output`; returns a summary."""
    from cir.dataset import FAILED_SCHEMA, failed_row
    from pipeline.images import ImageRejected, prepare_image

    out = Path(cfg.output)
    manifest = read_manifest(out)
    encoder = Encoder(cfg.checkpoint, "image_only", None, cfg.device, cfg.pretrained)
    if manifest is not None and manifest["gallery_fingerprint"] != encoder.gallery_fingerprint:
        raise GalleryError(f"{out} was built with another CLIP ({manifest['checkpoint']}); its features cannot "
                          f"be mixed with {cfg.checkpoint}'s: index into a new --output")
    # a local checkpoint is recorded by absolute path: `search search` finds it from any directory
    recorded = os.path.abspath(cfg.checkpoint) if os.path.exists(cfg.checkpoint) else cfg.checkpoint
    weights = cfg.pretrained and (os.path.abspath(cfg.pretrained) if os.path.isfile(cfg.pretrained) else cfg.pretrained)
    manifest = manifest or {"version": INDEX_VERSION, "checkpoint": recorded, "pretrained": weights, "parts": [],
                            "gallery_fingerprint": encoder.gallery_fingerprint,
                            "embed_dim": encoder.backbone.embed_dim}
    known = _indexed_sha(out, manifest)
    writer = _PartWriter(cfg, encoder, manifest)
    failed, skipped = [], 0
    for item in tqdm(gallery_images(cfg.images), desc="index", unit="img", file=sys.stderr):
        if item.data is None:
            failed.append(failed_row(item.source, "read", "unreadable", item.error))
            continue
        sha = hashlib.sha256(item.data).hexdigest()
        if known.get(item.name) == sha:
            skipped += 1
            continue
        try:
            img = prepare_image(item.data).image
        except ImageRejected as err:
            failed.append(failed_row(item.source, "decode", err.reason, str(err)))
            continue
        known[item.name] = sha
        writer.add(item, sha, img)
    writer.flush()
    pq.write_table(pa.Table.from_pylist(failed, schema=FAILED_SCHEMA), out / FAILED_FILE)
    index = GalleryIndex(out)
    if writer.written or (len(index) >= cfg.faiss_min and not manifest.get("faiss")):
        _build_faiss(out, manifest, index, cfg)
    summary = {"index": str(out), "images": len(index), "encoded": writer.written, "unchanged": skipped,
               "failed": len(failed), "faiss": bool(manifest.get("faiss"))}
    if failed:
        print(f"search index: {len(failed)} images could not be used; see {out / FAILED_FILE}", file=sys.stderr)
    return summary


def _build_faiss(out: Path, manifest: dict, index: GalleryIndex, cfg: IndexConfig) -> None:
    """An IVF index (inner product on normalised features) for large galleries: trained on a seeded sample,
    rebuilt whenever parts change so its ids are the live rows. Smaller galleries are searched exactly."""
    (out / FAISS_FILE).unlink(missing_ok=True)
    manifest.pop("faiss", None)
    n = len(index)
    if n >= cfg.faiss_min:
        try:
            import faiss
        except ImportError:
            print("search index: faiss is not installed (pip install faiss-cpu): searches scan the features "
                  "exactly", file=sys.stderr)
            n = 0
    if n and n >= cfg.faiss_min:
        feats = index.features.numpy()
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(feats.shape[1])
        ivf = faiss.IndexIVFFlat(quantizer, feats.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 256 * nlist), replace=False)
        ivf.train(feats[np.sort(sample)])
        ivf.add(feats)
        faiss.write_index(ivf, str(out / FAISS_FILE))
        manifest["faiss"] = {"kind": "IVFFlat", "nlist": nlist, "nprobe": cfg.faiss_nprobe, "rows": n}
    write_json(str(out / INDEX_FILE), manifest)
