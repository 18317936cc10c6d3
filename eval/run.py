"""`python -m eval run`: encode a benchmark's gallery and queries with a checkpoint, rank, write the
predictions / test-server files, score them with `eval score` and print the metrics (last line of stdout).

Methods: `model` (a stage I/II export: query "a photo of $ that {caption}" with $ := the reference's pseudo
tokens), and the baselines every table shows: `image_only` (v_ref), `text_only` (E_T(caption)) and `sum`
(normalize(v_ref + E_T(caption))), which need only a CLIP (a stage export or any CLIP directory / name).
Queries and galleries come from cir.benchmarks, built as each benchmark's protocol does: FashionIQ joins its two
captions in both orders and averages; CIRR, Shoes and Fashion200k remove the reference from the ranking; CIRR
also ranks the image set (recall_subset); Fashion200k's text is TIRG's "replace OLD with NEW".
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cir import benchmarks
from cir.benchmarks import Benchmark
from cir.config import from_dict
from cir.encoder import Encoder, top_k
from eval import score as scoring
from eval import stats
from eval.config import RunConfig
from eval.score import TOP, PredictionError


# ------------------------------------------------------------------------------------------ the command

def default_output(checkpoint: str) -> Path:
    """CHECKPOINT/eval for a checkpoint on disk; runs/eval/NAME for a CLIP given by name or hub id (a name is
    not a folder to write into; its characters outside [A-Za-z0-9._-] become '_')."""
    if Path(checkpoint).exists():
        return Path(checkpoint) / "eval"
    return Path("runs") / "eval" / re.sub(r"[^A-Za-z0-9._-]", "_", checkpoint)


def run(benchmark: str, data: str, checkpoint: str, split: Optional[str] = None, cache_dir: Optional[str] = None,
        **settings) -> dict:
    """evaluate() from Python: the other RunConfig fields as keywords (`method="sum", output=...`); an unknown
    one or a value out of range is a ConfigError."""
    cfg = from_dict(RunConfig, {"benchmark": benchmark, "data": data, "checkpoint": checkpoint, "split": split,
                                **settings}, where="eval run")
    return evaluate(cfg, cache_dir)


def evaluate(cfg: RunConfig, cache_dir: Optional[str] = None) -> dict:
    """Metrics (and ci95) of a checkpoint on a benchmark split (None: the benchmark's evaluation split, see
    cir.benchmarks.SPLITS); files under `cfg.output`. Gallery features (and method `model`'s reference features)
    are cached in `cache_dir` (default: the output), keyed by the image tower's weights and the images' bytes, so
    runs that share an image tower (every stage I and II export of one CLIP) can share one cache, also across
    copies of a gallery."""
    benchmark, checkpoint, method, batch_size = cfg.benchmark, cfg.checkpoint, cfg.method, cfg.batch_size
    root = Path(cfg.data)
    split = benchmarks.split_name(benchmark, cfg.split)  # as the files name it (CIRR's test is test1)
    bench = benchmarks.load(benchmark, root, split, cfg.shared_concept)
    out = Path(cfg.output) if cfg.output else default_output(checkpoint) / f"{benchmark}-{split}-{method}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:  # the output, or a folder above it, is a file
        raise PredictionError(f"output {out} cannot be a folder: {err.filename} is a file; name another "
                              f"output") from err
    missing = sorted(n for n, p in bench.gallery.items() if not p.is_file())
    names = [n for n in bench.gallery if n not in set(missing)]
    if missing:
        print(f"eval run: {len(missing)} of {len(bench.gallery)} gallery images are missing and left out "
              f"(e.g. {missing[:3]})", file=sys.stderr)
    encoder = Encoder(checkpoint, method, cfg.template, cfg.device, cfg.pretrained)
    cache_root = Path(cache_dir) if cache_dir else out
    gallery_feats = _cached_gallery(encoder, [bench.gallery[n] for n in names], cache_root, batch_size)
    row = {n: i for i, n in enumerate(names)}
    predictions: dict = {}
    subset_predictions: dict = {}
    shown = _grid_sample(bench, cfg.grids)
    examples = []
    for group, queries in bench.queries.items():
        queries = [q for q in queries if q.reference in row]
        refs = [row[q.reference] for q in queries]
        images, texts = [bench.gallery[q.reference] for q in queries], [q.texts for q in queries]
        kept = _cached_references(encoder, images, texts, cache_root, batch_size) if method == "model" else None
        feats = encoder.queries(images, gallery_feats[refs], texts, batch_size, references=kept)
        # the rows this group ranks: its own gallery (FashionIQ categories) or everything
        rows = ([row[n] for n in bench.group_gallery[group] if n in row] if bench.group_gallery
                else list(range(len(names))))
        local = {r: i for i, r in enumerate(rows)}
        exclude = [local.get(r, -1) if q.exclude_reference else -1 for q, r in zip(queries, refs)]
        top_scores, ranked = top_k(feats, gallery_feats[rows], TOP, exclude)
        ranked_names = {q.qid: [bench.ids(names[rows[i]]) for i in r.tolist()] for q, r in zip(queries, ranked)}
        examples += [(shown[(group, q.qid)], q, [(names[rows[i]], s) for i, s in zip(r[:5].tolist(),
                                                                                      top_s[:5].tolist())],
                      target_rank([names[rows[i]] for i in r.tolist()], q.targets))
                     for q, r, top_s in zip(queries, ranked, top_scores) if (group, q.qid) in shown]
        (predictions.setdefault(group, {}) if group else predictions).update(ranked_names)
        for q, f in zip(queries, feats):
            if q.subset is not None:
                members = [m for m in q.subset if m in row]
                scores = gallery_feats[[row[m] for m in members]] @ f
                subset_predictions[q.qid] = [members[i] for i in scores.argsort(descending=True)[:3].tolist()]
    if examples:
        _write_grid(bench, [e[1:] for e in sorted(examples, key=lambda e: e[0])], out / "examples.png")
    return _write_and_score(benchmark, split, root, out, predictions, subset_predictions, len(missing))


def _grid_sample(bench: Benchmark, n: int) -> dict[tuple[str, str], int]:
    """A fixed sample of n queries for the example grid (by hash: the same queries for every method, so
    grids of two checkpoints compare row by row) -> their order in the grid."""
    keys = sorted(((g, q.qid) for g, qs in bench.queries.items() for q in qs),
                  key=lambda key: hashlib.sha256("/".join(key).encode()).hexdigest())
    return {key: i for i, key in enumerate(keys[:max(0, n)])}


def target_rank(ranked: list[str], targets) -> Optional[int]:
    """1-based rank of the best-ranked known target in `ranked` (the top TOP), None when none is there."""
    wanted = set(targets)
    return next((i + 1 for i, name in enumerate(ranked) if name in wanted), None)


def _write_grid(bench: Benchmark, examples: list, path: Path) -> None:
    """reference | text | top 5 for the sampled queries, the known targets outlined; a target below the top 5 has
    its rank under the text (or 'not in the top 50')."""
    from cir.model import rgb
    from cir.grids import GridRow, render_grid

    def note(q, rank: Optional[int], shown: int) -> str:
        if not q.targets or (rank is not None and rank <= shown):
            return ""
        return f"target at #{rank}" if rank is not None else f"target not in the top {TOP}"

    rows = [GridRow(rgb(bench.gallery[q.reference]), q.texts[0],
                    [(rgb(bench.gallery[name]), name, score) for name, score in top], set(q.targets),
                    note(q, rank, len(top)))
            for q, top, rank in examples]
    render_grid(rows).save(path)


def _gallery_digest(paths: list[Path], out: Path) -> str:
    """sha256 over the gallery images' bytes, in order. Remembered in `out` per listing as it is now (path, size,
    modification time of each image), so each listing's files are read and hashed once: the same images under
    another folder (a benchmark written again with other query texts) have the same digest."""
    stamp = "\n".join(f"{p}\t{st.st_size}\t{st.st_mtime_ns}" for p, st in ((p, p.stat()) for p in paths))
    memo = out / f"images-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.sha256"
    if memo.is_file():
        digest = memo.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    h = hashlib.sha256()
    for path in paths:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    digest = h.hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest + "\n", encoding="ascii")
    tmp.replace(memo)
    return digest


def _cached_gallery(encoder: Encoder, paths: list[Path], out: Path, batch_size: int) -> torch.Tensor:
    """Gallery features, cached on disk and keyed by the image tower's weights and the images' bytes
    (_gallery_digest): a benchmark regenerated at the same path is encoded anew, the same images at another path
    are not. A cache that does not load (truncated, foreign) is rebuilt with a warning."""
    key = hashlib.sha256(f"{encoder.gallery_fingerprint}\n{_gallery_digest(paths, out)}".encode()).hexdigest()[:16]
    cache = out / f"gallery-{key}.npy"
    if cache.is_file():
        try:
            feats = np.load(cache, allow_pickle=False)
            if feats.ndim == 2 and feats.shape[0] == len(paths):
                return torch.from_numpy(feats)
        except (ValueError, OSError, EOFError) as err:
            print(f"eval run: the gallery cache {cache} does not load ({err}); encoding the gallery again",
                  file=sys.stderr)
    feats = encoder.images(paths, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")  # its own name: evaluations in parallel may write it too
    np.save(tmp, feats.numpy(), allow_pickle=False)
    tmp.replace(cache)  # atomic: a killed run leaves no truncated cache behind
    return feats


def _cached_references(encoder: Encoder, images: list[Path], texts: list[list[str]], out: Path,
                       batch_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Method `model`'s reference features (Encoder.reference_features: features and patch tokens), cached
    beside the gallery's and keyed like them by the image tower's weights and the images' bytes, and by what
    shapes them besides (the batches they are computed in, whether the mapping reads patches): the stage I and
    II exports of one CLIP run the image tower over a benchmark's references once, with the same numbers."""
    seq = encoder.query_images(images, texts)
    patches = encoder.cir.mapping.cfg.use_patches
    key = hashlib.sha256(f"references\n{encoder.gallery_fingerprint}\n{batch_size}\n{patches}\n"
                         f"{_gallery_digest(seq, out)}".encode()).hexdigest()[:16]
    cache = out / f"references-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as kept:
                feats, tokens = kept["features"], kept["patches"] if patches else None
            if len(feats) == len(seq) and (tokens is None or len(tokens) == len(seq)):
                return torch.from_numpy(feats), None if tokens is None else torch.from_numpy(tokens)
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
            print(f"eval run: the reference cache {cache} does not load ({err}); encoding the references again",
                  file=sys.stderr)
    feats, tokens = encoder.reference_features(seq, batch_size)
    feats, tokens = feats.cpu(), None if tokens is None else tokens.cpu()
    out.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # its own name: evaluations in parallel may write it too
    np.savez(tmp, features=feats.numpy(), **({} if tokens is None else {"patches": tokens.numpy()}))
    tmp.replace(cache)  # atomic: a killed run leaves no truncated cache behind
    return feats, tokens


def _write_and_score(benchmark: str, split: str, root: Path, out: Path, predictions: dict, subset: dict,
                     missing: int) -> dict:
    if benchmark == "cirr":
        predictions = {"version": "rc2", "metric": "recall", **predictions}
        subset = {"version": "rc2", "metric": "recall_subset", **subset}
        (out / "recall_submission.json").write_text(json.dumps(predictions))
        (out / "recall_subset_submission.json").write_text(json.dumps(subset))
    else:
        (out / "predictions.json").write_text(json.dumps(predictions))
    metrics: dict = {}
    try:
        if benchmark == "cirr":
            per_query = scoring.cirr_per_query(root / "captions" / f"cap.rc2.{split}.json", predictions, subset)
        elif benchmark == "circo":
            per_query = scoring.circo_per_query(root / "annotations" / f"{split}.json", predictions)
        elif benchmark == "fashioniq":
            per_query = scoring.fashioniq_per_query(root, predictions, split=split)
        elif benchmark == "shoes":
            per_query = scoring.shoes_per_query(root, predictions, split)
        else:
            per_query = scoring.fashion200k_per_query(root, predictions)
        # per-query values (claims pair two methods query by query) and a bootstrap interval per metric
        (out / "per_query.json").write_text(json.dumps(per_query))
        metrics = {**scoring.summarize(per_query), "ci95": stats.ci95(per_query)}
    except PredictionError as err:
        if "server" not in str(err):
            raise
        print(f"eval run: {err}; the submission files are in {out}", file=sys.stderr)
    if missing:
        metrics["missing_gallery_images"] = missing
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
