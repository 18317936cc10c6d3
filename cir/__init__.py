"""Shared code of the toolkit: the CLIP backbone factory, the CIR model and helpers used by pipeline, synth,
train and eval.

    import cir
    model = cir.load("runs/demo/stage2_mix/final")       # or "hf-hub:org/name"
    gallery = model.encode_image(images)                  # [N, d], L2-normalised
    query = model.encode_query([reference], ["make the red circle blue"])   # [1, d]
    best = (query @ gallery.T).topk(5)
"""
from __future__ import annotations


def load(path_or_id, device: str = "cpu", **hub_kwargs):
    """A stage I/II export as a `cir.model.CIRModel`: a local export directory, or "hf-hub:org/name[@rev]"
    fetched through huggingface_hub's cache (`hub_kwargs`: cache_dir, local_files_only, token)."""
    from cir.model import CIRModel

    return CIRModel.from_pretrained(str(path_or_id), device, **hub_kwargs)
