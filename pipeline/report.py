"""`python beam_runner.py inspect DIR --report OUT`: a page to look at a caption or triplet dataset.

OUT/index.html with PNG plots beside it: text lengths, edit kinds (triplets), the filter scores of the kept
triplets and of the rejected candidates (filter_scores.parquet, when synth's CLIP filter wrote one) with the
thresholds drawn, rejected candidates and failed inputs by reason (near-duplicates and excluded benchmark images
among them), a grid of random samples and one of the lowest-scoring kept triplets.
Built from what inspect read (pipeline/inspect.py) and the shards again for the pictures; nothing is unpickled.
"""
from __future__ import annotations

import html
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from cir import schema
from cir.dataset import SCORES_FILE, SHARD_DIR
from cir.grids import GridRow, render_grid

GRID_ROWS = 8  # samples per grid


def edit_kind(meta: dict) -> str:
    """What kind of change a triplet makes: the toy editor's edit kind, the mined caption's operations, or its
    method."""
    if isinstance(meta.get("edit"), dict) and meta["edit"].get("kind"):
        return str(meta["edit"]["kind"])
    if isinstance(meta.get("changes"), list) and meta["changes"]:
        return "+".join(sorted({str(c.get("op")) for c in meta["changes"] if isinstance(c, dict)}))
    return str(meta.get("method", "?"))


def thresholds(meta: dict) -> dict[str, list[float]]:
    """Score name -> the thresholds a triplet of this kind was kept by (from its provenance)."""
    prov = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    lines = {k: [float(v)] for k, v in (prov.get("thresholds") or {}).items() if isinstance(v, (int, float))}
    if isinstance(prov.get("band"), list):  # mined pairs: a similarity band
        lines["similarity"] = [float(v) for v in prov["band"]]
    return lines


def _bar(ax, counts: dict, title: str) -> None:
    names = sorted(counts, key=lambda k: (-counts[k], k))
    ax.barh(names[::-1], [counts[n] for n in names][::-1], color="#4a7bb7")
    ax.set_title(title)
    for i, n in enumerate(names[::-1]):
        ax.text(counts[n], i, f" {counts[n]}", va="center", fontsize=8)


def _figure(columns: int = 1, width: float = 6, height: float = 3):
    """A matplotlib Figure and its row of axes, without pyplot: no global backend or figure state is touched
    (the report may be written from a notebook)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, height))
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path.name


def _pictures(root: Path, wanted: set[str], kind: schema.Kind) -> dict[str, dict]:
    """key -> {"text", role name: PIL image} for the wanted keys, read from the shards."""
    found: dict[str, dict] = {}
    for tar_path in sorted((root / SHARD_DIR).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                if key not in wanted or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                entry = found.setdefault(key, {})
                if field == kind.text:
                    entry["text"] = data.decode("utf-8", "replace")
                for role in kind.roles:
                    if role.of_member(field):
                        entry[role.name] = Image.open(io.BytesIO(data)).convert("RGB")
    return found


def _grid(root: Path, rows: list[dict], kind: schema.Kind, label) -> Image.Image:
    """One grid row per sample: a triplet as reference | modification | target (labelled label(row) -> (name,
    number)), a caption sample as image | caption."""
    pictures = _pictures(root, {r["_key"] for r in rows}, kind)
    out = []
    for r in rows:
        p = pictures.get(r["_key"], {})
        if kind is schema.TRIPLET:
            out.append(GridRow(p.get("ref"), p.get("text", ""), [(p["tgt"], *label(r))] if "tgt" in p else []))
        else:
            out.append(GridRow(p.get("image"), p.get("text", ""), []))
    return render_grid(out, panel=128)


def write_report(root: Path, out: Path, summary: dict, seed: int = 0) -> Path:
    """The page and its plots under `out` from inspect()'s summary; returns the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    kind = schema.KINDS.get(summary["kind"] or "caption", schema.CAPTION)
    rows = [{**meta, "_key": key} for meta, key in zip(summary["rows"], summary["keys"])]
    stats = summary.get("stats") or {}
    sections = []

    fig, (ax,) = _figure()
    ax.hist(summary["caption_words"] or [0], bins=30, color="#4a7bb7")
    what = "modification text" if kind is schema.TRIPLET else "caption"
    ax.set_title(f"{what} length (words)")
    sections.append((f"{what.capitalize()} lengths", _save(fig, out / "text_lengths.png"), ""))

    dropped = dict(summary["failed_by_reason"] or {})
    if summary.get("duplicates"):
        dropped["exact duplicate"] = summary["duplicates"]
    rejected = stats.get("rejected_by_reason") or {}
    panels = [(counts, title) for counts, title in ((dropped, "inputs dropped, by reason"),
                                                     (rejected, "candidates rejected, by reason")) if counts]
    if panels:
        fig, axes = _figure(len(panels), width=5, height=3.5)
        for ax, (counts, title) in zip(axes, panels):
            _bar(ax, counts, title)
        sections.append(("Dropped and rejected", _save(fig, out / "dropped.png"),
                         "near_duplicate: the same picture as a kept input; excluded: a copy of an image of an "
                         "--exclude folder (a benchmark's)."))

    if kind is schema.TRIPLET and rows:
        fig, (ax,) = _figure()
        _bar(ax, dict(Counter(edit_kind(r) for r in rows)), "edit kinds")
        sections.append(("Edit kinds", _save(fig, out / "edit_kinds.png"), ""))
        names = sorted({n for r in rows for n, v in (r.get("scores") or {}).items() if isinstance(v, (int, float))})
        # synth's CLIP filter records every candidate it scored, kept or not (cir.dataset.SCORES_FILE)
        scored = pq.read_table(root / SCORES_FILE).to_pylist() if (root / SCORES_FILE).is_file() else []
        if names:
            fig, axes = _figure(len(names), width=4)
            for ax, name in zip(axes, names):
                kept = [r["scores"][name] for r in rows if name in (r.get("scores") or {})]
                dropped = [r[name] for r in scored if not r["kept"] and r.get(name) is not None]
                ax.hist([kept, dropped] if dropped else [kept], bins=30, stacked=True,
                        color=["#4a7bb7", "#bbbbbb"][:2 if dropped else 1],
                        label=["kept", "rejected"][:2 if dropped else 1])
                for line in sorted({t for r in rows for t in thresholds(r).get(name, [])}):
                    ax.axvline(line, color="#c0392b", linestyle="--", label=f"threshold {line:g}")
                ax.set_title(name)
                ax.legend(fontsize=7)
            note = ("Each score of each kept triplet and of each candidate the filter rejected (grey, from "
                    f"{SCORES_FILE}), the thresholds dashed." if scored else
                    "Each score of each kept triplet, the thresholds that kept them dashed (this dataset records "
                    "no rejected candidates' scores: only synth's CLIP filter does).")
            sections.append(("Filter scores", _save(fig, out / "scores.png"), note))

    rng = random.Random(seed)
    sample = rng.sample(rows, min(GRID_ROWS, len(rows)))
    if sample:
        _grid(root, sample, kind, lambda r: (edit_kind(r), 0.0)).save(out / "random.png")
        sections.append(("Random samples", "random.png", f"{len(sample)} drawn with seed {seed}."))
    varied = len({json.dumps(r.get("scores"), sort_keys=True) for r in rows}) > 1  # the toy editor's are all 1
    if kind is schema.TRIPLET and varied:
        # the CLIP filter's ranking score when every triplet has it, else the first score name
        score_name = "directional" if all("directional" in (r.get("scores") or {}) for r in rows) else min(
            n for r in rows for n in (r.get("scores") or {}))
        low = sorted((r for r in rows if isinstance((r.get("scores") or {}).get(score_name), (int, float))),
                     key=lambda r: r["scores"][score_name])
        _grid(root, low[:GRID_ROWS], kind, lambda r: (edit_kind(r), r["scores"][score_name])).save(
            out / "lowest.png")
        sections.append((f"Lowest {score_name} among the kept", "lowest.png",
                         f"The kept triplets the filter was least sure of; the number under each target is its "
                         f"{score_name}."))

    counts = {"samples": summary["samples"], "shards": summary["shards"],
              "inputs": stats.get("inputs"), "failed": stats.get("failed"),
              "duplicates": summary.get("duplicates")}
    page = ["<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(root.name)}: {kind.name} dataset</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
            "td,th{padding:2px 10px;text-align:left}</style></head><body>",
            f"<h1>{html.escape(str(root))}</h1><p>A {kind.name} dataset (docs/SPEC.md).</p><table>",
            *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in counts.items()
              if v is not None), "</table>"]
    for title, image, note in sections:
        page += [f"<h2>{html.escape(title)}</h2>", f"<img src='{html.escape(image)}' alt='{html.escape(title)}'>"]
        if note:
            page.append(f"<p>{html.escape(note)}</p>")
    page.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(page) + "\n", encoding="utf-8")
    return path
