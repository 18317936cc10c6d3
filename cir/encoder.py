"""Image and query features of a checkpoint, and exact top-k over a gallery: shared by `eval run` and
`search` (index, search, serve).

Methods: `model` (a stage I/II export: "a photo of $ that {text}" with $ := the reference's pseudo tokens),
`image_only` (v_ref), `text_only` (E_T(text)) and `sum` (normalize(v_ref + E_T(text))); the baselines need only
a CLIP (a stage export or any CLIP directory / name).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cir.backbone import weights_fingerprint
from cir.model import (CONFIG_FILE, CIRModel, ExportError, ImageLike, encode_image, encode_text_batched,
                       load_cir_model, starts)


def image_tower(checkpoint: str) -> str:
    """The CLIP that makes gallery features: a stage export's `clip/` (stage I and II exports of one run
    share it, so one gallery index serves both), else the checkpoint itself."""
    path = Path(checkpoint)
    return str(path / "clip") if (path / CONFIG_FILE).is_file() else checkpoint


class Encoder:
    """Gallery and query features of one method, through the model's own API (`cir.model.CIRModel`: what a
    user's code gets from `cir.load`), or a bare CLIP's features for the baselines."""

    def __init__(self, checkpoint: str, method: str, template: Optional[str], device: str,
                 pretrained: Optional[str] = None):
        from cir.backbone import create_backbone

        self.method, self.device = method, device
        path = Path(checkpoint)
        if (path / CONFIG_FILE).is_file() and pretrained:
            raise ExportError(f"{checkpoint} is a stage export with its own CLIP: --pretrained is for a CLIP "
                              f"given by architecture name")
        self.cir: Optional[CIRModel] = None
        if (path / CONFIG_FILE).is_file():
            self.cir = load_cir_model(path, device)
            if template:  # an evaluation-time prompt (eval run --template) replaces the export's own
                self.cir.template = template
            self.backbone = self.cir.backbone
        else:
            if method == "model":
                raise ExportError(f"{checkpoint} is not a stage I/II export: method 'model' needs one "
                                  f"(baselines image_only, text_only, sum take any CLIP)")
            # a bare architecture name needs its pretrained tag or weights file (cir.backbone.check_weights)
            self.backbone = create_backbone(checkpoint, pretrained, device=device)
            self.backbone.model.eval()
        # gallery features depend only on the CLIP: caches and indexes are keyed by its weights alone
        self.gallery_fingerprint = weights_fingerprint(image_tower(checkpoint))
        if pretrained:  # an architecture name's weights are its pretrained tag or file
            weights = weights_fingerprint(pretrained)
            self.gallery_fingerprint = weights_fingerprint(f"{self.gallery_fingerprint}:{weights}")

    def images(self, images: Sequence[ImageLike], batch_size: int, progress: bool = True) -> torch.Tensor:
        """[N, d] normalised image features on the CPU, in batches."""
        feats = []
        for start in tqdm(starts(len(images), batch_size), desc="gallery", unit="batch", file=sys.stderr,
                          disable=not progress):
            # CIRModel.encode_image is this same function on the export's CLIP: one path for exports and baselines
            feats.append(encode_image(self.backbone, images[start:start + batch_size], batch_size, self.device).cpu())
        return torch.cat(feats) if feats else torch.empty(0, self.backbone.embed_dim)

    @staticmethod
    def query_images(refs: Sequence[ImageLike], texts: list[list[str]]) -> list[ImageLike]:
        """The reference of each text variant, in the order `queries` reads them (its reference features)."""
        return [refs[i] for i, variants in enumerate(texts) for _ in variants]

    def reference_features(self, images: Sequence[ImageLike], batch_size: int
                           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What method `model` reads of `query_images` (CIRModel.encode_references in `queries`' batches): give
        it back to `queries` (a cache of it) and the image tower does not run again."""
        if self.cir is None:
            raise ExportError("reference features are those of a stage I/II export's mapping")
        return self.cir.encode_references(list(images), batch_size)

    @torch.no_grad()
    def queries(self, refs: Sequence[ImageLike], ref_feats: torch.Tensor, texts: list[list[str]],
                batch_size: int, method: Optional[str] = None,
                references: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """[Q, d] normalised query features, in batches of text variants (FashionIQ has two per query, whose
        features are averaged); ref_feats [Q, d] are the references' image features. `references`: method
        `model`'s reference_features of query_images(refs, texts), when kept from an earlier run."""
        method = method or self.method
        if method == "image_only":
            return ref_feats
        if method == "model" and self.cir is None:
            raise ExportError("method 'model' needs a stage I/II export")
        owner = [i for i, variants in enumerate(texts) for _ in variants]  # query of each text variant
        flat = [t for variants in texts for t in variants]
        out = torch.zeros(len(texts), ref_feats.shape[1])
        for start in starts(len(flat), batch_size):
            idx = owner[start:start + batch_size]
            chunk = flat[start:start + batch_size]
            if method == "model":  # the pseudo tokens need the references' patch tokens: the image tower, unless kept
                kept = None if references is None else tuple(
                    None if r is None else r[start:start + batch_size] for r in references)
                f = self.cir.encode_query([refs[i] for i in idx], chunk, batch_size, references=kept)
            else:
                f = encode_text_batched(self.backbone, chunk, batch_size, self.device)
                if method == "sum":
                    f = F.normalize(f + ref_feats[idx].to(f.device), dim=-1)
            out.index_add_(0, torch.tensor(idx), f.float().cpu())
        return F.normalize(out, dim=-1)  # the mean of a query's variants, normalised


def top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: list[int], chunk: int = 16384,
          use_faiss: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (scores, indices) [Q, k] of the best gallery rows per query; `exclude[q]` (>= 0) is a row query q
    must not return. With faiss installed, its brute-force kNN on the features as they are (no index, no copy:
    BLAS blocks plus heaps, the fastest exact search on CPU); otherwise a chunked scan in torch. Either way
    memory is the features plus fixed-size blocks, whatever the gallery size. k is capped to what can be
    returned (capped_k)."""
    k = capped_k(k, gallery.shape[0], exclude)
    if use_faiss and queries.shape[0]:
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            return _top_k_faiss(faiss, queries, gallery, k, exclude)
    return _top_k_chunked(queries, gallery, k, exclude, chunk)


def capped_k(k: int, rows: int, exclude: list[int]) -> int:
    """k, or the number of rows a query can get back (an excluded row is never returned) if that is fewer."""
    return min(k, rows - (1 if any(e >= 0 for e in exclude) else 0))


def _top_k_faiss(faiss, queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    extra = 1 if any(e >= 0 for e in exclude) else 0  # one more, in case the excluded row is among them
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    g = np.ascontiguousarray(gallery.numpy(), dtype=np.float32)
    scores, idx = faiss.knn(q, g, min(k + extra, g.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
    if extra:
        keep = idx != np.asarray(exclude, dtype=idx.dtype)[:, None]
        keep &= np.cumsum(keep, axis=1) <= k  # the first k that are not excluded
        scores = scores[keep].reshape(len(q), -1)
        idx = idx[keep].reshape(len(q), -1)
    return torch.from_numpy(scores[:, :k]), torch.from_numpy(idx[:, :k].astype(np.int64))


def _top_k_chunked(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: list[int], chunk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    device = queries.device  # CPU tensors here; cuda ones work the same (bench/gpu.py)
    best_s = torch.full((queries.shape[0], 0), -float("inf"), dtype=queries.dtype, device=device)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=device)
    excl = torch.tensor(exclude, dtype=torch.long, device=device)
    block = torch.empty(queries.shape[0], min(chunk, gallery.shape[0]), dtype=queries.dtype, device=device)  # reused
    for start in range(0, gallery.shape[0], chunk):
        rows_g = gallery[start:start + chunk]
        s = block.view(-1)[:block.shape[0] * rows_g.shape[0]].view(block.shape[0], -1)  # contiguous
        torch.mm(queries, rows_g.T, out=s)
        rows = (excl >= start) & (excl < start + s.shape[1])
        s[rows.nonzero().squeeze(1), excl[rows] - start] = -float("inf")
        # the chunk's own top-k first: merging k-wide candidates, not copying the [Q, chunk] block
        chunk_s, chunk_i = s.topk(min(k, s.shape[1]), dim=1)
        cand_s = torch.cat([best_s, chunk_s], dim=1)
        cand_i = torch.cat([best_i, chunk_i + start], dim=1)
        best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i = torch.gather(cand_i, 1, pos)
    return best_s, best_i
