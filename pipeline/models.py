"""Beam `ModelHandler`s for the caption job, run through `RunInference` (batched, one model per worker).

Beam's own huggingface handlers import tensorflow and `TFAutoModel`, gone in transformers 5, so these
subclass `ModelHandler` directly. `load_model` returns one object (RunInference keeps a weak reference to
it, which a tuple cannot take). Examples are the job's sample dicts; each handler reads the stored image
bytes (`sample["data"]`) and returns one prediction per sample, so no join is needed afterwards.
"""
from __future__ import annotations

import io
from typing import Any, Iterable, Optional, Sequence


import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from PIL import Image

# Importing apache_beam.ml costs seconds (it pulls in ML frameworks): jobs import this module only where a
# model runs, so the sidecar path does not pay for it.


def _images(batch: Sequence[dict]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(s["data"])).convert("RGB") for s in batch]


def _padded(items: list, size: int) -> list:
    """Fill a batch up to a fixed size by repeating its last item.

    RunInference's batches depend on bundle timing, and a kernel may round a row differently when the batch
    shape changes; at one fixed shape every row is computed the same way whatever its neighbours, so the
    same image gives the same caption and embedding bytes on every run.
    """
    return items + [items[-1]] * (size - len(items)) if items and len(items) < size else items


def _num_bytes(batch: Sequence[dict]) -> int:
    return sum(len(s["data"]) for s in batch)


class HFCaptionerHandler(ModelHandler[dict, list, Any]):
    """Any Hugging Face image-to-text model (BLIP, BLIP-2, GIT, ...) through transformers' pipeline.

    Inference per sample: a list of candidate captions (`num_return_sequences` of them).
    """

    def __init__(self, model: str, *, prompt: str = "", max_new_tokens: int = 30, num_beams: int = 1,
                 num_return_sequences: int = 1, do_sample: bool = False, device: str = "cpu",
                 batch_size: int = 16):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.batch_size = batch_size
        self.model = model
        self.prompt = prompt
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": max(num_beams, num_return_sequences),
                                "num_return_sequences": num_return_sequences, "do_sample": do_sample}
        self.device = device

    def load_model(self):
        from transformers import pipeline

        return pipeline("image-text-to-text", model=self.model, device=self.device)

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        images = _padded(_images(batch), self.batch_size)
        outputs = model(images=images, text=[self.prompt] * len(images), generate_kwargs=self.generate_kwargs)
        for sample, candidates in zip(batch, self._per_image(outputs, len(images))):
            texts = [self._strip_prompt(c.get("generated_text", "")) for c in candidates]
            yield PredictionResult(sample, texts, self.model)

    def _per_image(self, outputs: list, n_images: int) -> list[list[dict]]:
        """The pipeline returns one list per image, or (with num_return_sequences > 1) one flat list of
        n_images * num_return_sequences dicts in image order; regroup the latter."""
        if outputs and all(isinstance(o, list) for o in outputs):
            return outputs
        per = self.generate_kwargs["num_return_sequences"]
        if len(outputs) != n_images * per:
            raise RuntimeError(f"captioner returned {len(outputs)} outputs for {n_images} images x {per}")
        return [outputs[i * per:(i + 1) * per] for i in range(n_images)]

    def _strip_prompt(self, text: str) -> str:
        text = text.strip()
        if self.prompt and text.startswith(self.prompt):
            text = text[len(self.prompt):].strip()
        return text

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return _num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return "captioner"


class ClipImageEmbedHandler(ModelHandler[dict, np.ndarray, Any]):
    """L2-normalised CLIP image embeddings (float16) from any backbone `cir.backbone` can build."""

    def __init__(self, model: str, pretrained: Optional[str] = None, *, device: str = "cpu", batch_size: int = 64):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.batch_size = batch_size
        self.model = model
        self.pretrained = pretrained
        self.device = device

    def load_model(self):
        from cir.backbone import clip_fingerprint, create_backbone

        backbone = create_backbone(self.model, self.pretrained, device=self.device)
        backbone.model.eval()
        # The weights' fingerprint is each result's model_id: samples record which CLIP made their emb.npy.
        backbone.fingerprint = clip_fingerprint(backbone.model)
        return backbone

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        import torch

        from cir.backbone import preprocess_batch

        pixels = preprocess_batch(model.preprocess, _padded(_images(batch), self.batch_size))
        pixels = pixels.to(self.device)  # [batch_size, 3, H, W]; rows past len(batch) are padding
        with torch.no_grad():
            feats = model.model.encode_image(pixels, normalize=True)  # [B, embed_dim]
        feats = feats.float().cpu().numpy().astype(np.float16)
        for sample, vec in zip(batch, feats):
            yield PredictionResult(sample, vec, model.fingerprint)

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return _num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return "clip_embed"
