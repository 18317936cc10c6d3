"""`python beam_runner.py inspect DIR`: check a caption or triplet dataset against SPEC.md and summarise it.

Every shard is read with `tarfile` (nothing is unpickled; `.npy` members load with allow_pickle=False).
Exit status 1 and one line per violation when the dataset breaks the contract; 0 otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cir import schema
from cir.dataset import KEY_RE, SCHEMA_VERSION, SHARD_DIR
MAX_REPORTED = 50  # violations listed before "... and N more"


class Report:
    def __init__(self):
        self.violations: list[str] = []

    def bad(self, message: str) -> None:
        self.violations.append(message)


def _check_image(report: Report, where: str, ext: str, data: bytes) -> Optional[tuple[int, int]]:
    try:
        img = Image.open(io.BytesIO(data))
        img.verify()
    except Exception as err:
        report.bad(f"{where}.{ext}: not a readable image ({err})")
        return None
    if img.format != schema.PIL_FORMATS[ext]:
        report.bad(f"{where}.{ext}: extension says {schema.PIL_FORMATS[ext]}, bytes are {img.format}")
    return img.size


def _check_embedding(report: Report, where: str, data: bytes) -> None:
    try:
        emb = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        report.bad(f"{where}: not a .npy array ({err})")
        return
    if emb.dtype != np.float16 or emb.ndim != 1:
        report.bad(f"{where}: expected a 1-d float16 vector, got {emb.dtype} {emb.shape}")
    elif abs(float(np.linalg.norm(emb.astype(np.float32))) - 1.0) > 1e-2:
        report.bad(f"{where}: not L2-normalised (norm {np.linalg.norm(emb.astype(np.float32)):.3f})")


def _check_sample(report: Report, kind: str, where: str, key: str, fields: dict[str, bytes], summary: dict) -> None:
    if not KEY_RE.match(key):
        report.bad(f"{where}: key {key!r} is not a 32-digit hex content hash")
    try:
        meta = json.loads(fields.get("json", b"null"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        report.bad(f"{where}: missing or invalid json member")
        meta = {}
    spec = schema.KINDS[kind]
    for role in spec.roles:
        images = [m for m in role.images if m in fields]
        if len(images) != 1:
            report.bad(f"{where}: expected exactly one {role.name} member, found {images or 'none'}")
        for member in images:
            ext = member[len(role.prefix):]
            size = _check_image(report, f"{where}.{role.prefix}".rstrip("."), ext, fields[member])
            if size and role is schema.IMAGE:
                summary["sizes"].append(size)
    missing = spec.json_fields - set(meta)
    if missing:
        report.bad(f"{where}: json lacks {sorted(missing)}")
    text = fields.get(spec.text, b"").decode("utf-8", "replace")
    if not text.strip():
        report.bad(f"{where}: empty or missing {spec.text}")
    summary["caption_words"].append(len(text.split()))
    if kind == "caption":
        if meta.get("key", key) != key:
            report.bad(f"{where}: json key {meta.get('key')} differs from __key__")
        if text.strip() and meta.get("caption") not in (None, text):
            report.bad(f"{where}: txt and json caption differ")
    elif meta.get("quality") not in (None, *spec.qualities):
        report.bad(f"{where}: quality must be one of {list(spec.qualities)}, got {meta.get('quality')!r}")
    allowed = set(spec.members())
    for field, data in fields.items():
        if field.endswith("emb.npy"):
            _check_embedding(report, f"{where}.{field}", data)
        elif field not in allowed:
            report.bad(f"{where}: unexpected member .{field}")
    summary["rows"].append(meta)
    summary["keys"].append(key)


def _read_shard(report: Report, path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    report.bad(f"{path.name}: non-file member {member.name}")
                    continue
                key, dot, field = member.name.partition(".")
                if not dot or "/" in member.name:
                    report.bad(f"{path.name}: member name {member.name!r} is not key.field")
                    continue
                f = tar.extractfile(member)
                samples.setdefault(key, {})[field] = f.read() if f else b""
    except (tarfile.TarError, OSError) as err:
        report.bad(f"{path.name}: unreadable tar ({err})")
    return samples


def inspect(root: Path) -> tuple[Report, dict]:
    report = Report()
    card = _load_json(report, root / "dataset.json")
    stats = _load_json(report, root / "stats.json")
    kind = card.get("kind") if card else None
    if card and kind not in ("caption", "triplet"):
        report.bad(f"dataset.json: kind must be 'caption' or 'triplet', got {kind!r}")
    if card and card.get("schema_version") != SCHEMA_VERSION:
        report.bad(f"dataset.json: schema_version {card.get('schema_version')} (this reader: {SCHEMA_VERSION})")
    summary: dict = {"caption_words": [], "sizes": [], "rows": [], "keys": []}
    shard_keys: dict[str, set[str]] = {}
    seen: Counter = Counter()
    tars = sorted((root / SHARD_DIR).glob("*.tar"))
    if not tars:
        report.bad(f"no shards under {root / SHARD_DIR}")
    for tar_path in tars:
        samples = _read_shard(report, tar_path)
        shard_keys[tar_path.stem] = set(samples)
        for key, fields in samples.items():
            seen[key] += 1
            _check_sample(report, kind or "caption", f"{tar_path.name}:{key}", key, fields, summary)
    for key, n in seen.items():
        if n > 1:
            report.bad(f"key {key} appears in {n} shards")
    index_rows = _load_parquet(report, root / "index.parquet")
    failed_rows = _load_parquet(report, root / "failed.parquet")
    index_keys: dict[str, set[str]] = {}
    for row in index_rows:
        index_keys.setdefault(row.get("shard"), set()).add(row.get("key"))
    if index_rows and index_keys != {k: v for k, v in shard_keys.items() if v}:
        report.bad("index.parquet rows do not match the shards' samples")
    written = sum(seen.values())
    if len(index_rows) != written:
        report.bad(f"index.parquet has {len(index_rows)} rows, shards hold {written} samples")
    if stats:
        if stats.get("written") != written:
            report.bad(f"stats.json says written={stats.get('written')}, shards hold {written}")
        if stats.get("failed") != len(failed_rows):
            report.bad(f"stats.json says failed={stats.get('failed')}, failed.parquet has {len(failed_rows)} rows")
        if kind == "caption" and stats.get("inputs") != written + len(failed_rows) + stats.get("duplicates", 0):
            report.bad("stats.json: inputs != written + failed + duplicates")
    summary.update(kind=kind, shards=len(tars), samples=written,
                   failed_by_reason=dict(Counter(r.get("reason") for r in failed_rows)),
                   duplicates=(stats or {}).get("duplicates"), stats=stats)
    return report, summary


def _load_json(report: Report, path: Path) -> Optional[dict]:
    if not path.is_file():
        report.bad(f"missing {path.name}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        report.bad(f"{path.name}: invalid JSON ({err})")
        return None


def _load_parquet(report: Report, path: Path) -> list[dict]:
    if not path.is_file():
        report.bad(f"missing {path.name}")
        return []
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:
        report.bad(f"{path.name}: unreadable parquet ({err})")
        return []


def _distribution(values: list[float]) -> str:
    if not values:
        return "-"
    return f"min {min(values)}, median {statistics.median(values)}, max {max(values)}"


def format_summary(summary: dict) -> str:
    lines = [f"kind: {summary['kind']}", f"shards: {summary['shards']}", f"samples: {summary['samples']}",
             f"duplicates: {summary['duplicates']}", f"failed by reason: {summary['failed_by_reason'] or {}}",
             f"{'caption' if summary['kind'] != 'triplet' else 'modification'} words: "
             f"{_distribution(summary['caption_words'])}"]
    if summary["sizes"]:
        lines.append(f"image width: {_distribution([w for w, _ in summary['sizes']])}; "
                     f"height: {_distribution([h for _, h in summary['sizes']])}")
    lines.append("sample rows:")
    for row in summary["rows"][:3]:
        lines.append("  " + json.dumps(row, ensure_ascii=False, sort_keys=True)[:300])
    return "\n".join(lines)


def run(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="beam_runner.py inspect", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a caption or triplet dataset directory")
    parser.add_argument("--report", metavar="OUT", help="also write a page with plots and sample grids: "
                                                        "OUT/index.html (pipeline/report.py)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        parser.error(f"{root} is not a directory")
    if args.report and Path(args.report).resolve().is_relative_to(root.resolve()):
        parser.error(f"--report {args.report} is inside the dataset {root}: write it elsewhere")
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        parser.error(f"--report {args.report} is a file, not a folder")
    report, summary = inspect(root)
    print(format_summary(summary))
    if args.report:
        from pipeline.report import write_report

        print(f"report: {write_report(root, Path(args.report), summary)}")
    if report.violations:
        print(f"\n{len(report.violations)} violation(s) of SPEC.md:", file=sys.stderr)
        for line in report.violations[:MAX_REPORTED]:
            print(f"  {line}", file=sys.stderr)
        if len(report.violations) > MAX_REPORTED:
            print(f"  ... and {len(report.violations) - MAX_REPORTED} more", file=sys.stderr)
        return 1
    print("OK: the dataset follows SPEC.md")
    return 0
