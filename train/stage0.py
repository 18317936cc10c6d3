"""Stage 0: CLIP contrastive image-text training on caption shards (`accelerate launch train/stage0.py`).

With real weights this is the open-domain -> domain step of progressive training; on the toy world it trains
the tiny CLIP from scratch. Symmetric InfoNCE over the global batch (features gathered across ranks with
gradients, open_clip's ClipLoss). The text tower runs only up to the batch's last <end_of_text> (the same
features: its attention is causal and pools there), which makes a toy step about 20% cheaper. Without
`augment`, an image's preprocessed pixels are a fixed function of its bytes: with the loader in the training
process (`data.workers=0`) they are kept (train.frozen, up to `frozen_cache_mib`), so an image met again in a
later epoch is not decoded again. The export
`{output_dir}/final/` is an open_clip local directory that `cir.backbone.create_backbone` (and so every later
stage and eval) loads by its path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cir import schema
from cir.backbone import preprocess_batch
from cir.mapping import encode_text
from train.config import TrainConfig
from train.data import image_digest, image_of
from train.frozen import FrozenFeatures
from train.loop import main as loop_main
from train.stage import Stage


@dataclass
class Stage0Config(TrainConfig):
    augment: bool = False  # open_clip's train transform (random resized crop); off keeps positions intact
    local_loss: bool = False  # ClipLoss local_loss: logits of local features against the global batch only


class ContrastiveClip(torch.nn.Module):
    """The CLIP in training, computing what the loss reads. Its forward is where DDP synchronises gradients,
    so the features are made here, text cut as in cir.mapping.encode_text (open_clip's own forward always
    runs every context position)."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip
        # Checkpoints saved before this wrapper existed hold the CLIP's keys bare: they still resume.
        self.register_load_state_dict_pre_hook(_prefix_bare_keys)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        return {"image_features": self.clip.encode_image(images, normalize=True),
                "text_features": encode_text(self.clip, tokens), "logit_scale": self.clip.logit_scale.exp()}


def _prefix_bare_keys(module, state_dict, prefix, *_) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(f"{prefix}clip.")]:
        state_dict[f"{prefix}clip.{key[len(prefix):]}"] = state_dict.pop(key)


class Stage0(Stage):
    name = "stage0"
    required_fields = schema.CAPTION.required()

    def __init__(self, cfg: Stage0Config):
        super().__init__()
        self.cfg = cfg
        self.backbone = None
        self._loss = None  # open_clip's ClipLoss, made at the first step (it needs the process's rank)
        # preprocessed images by their bytes' digest. Not with augment (a new crop each time), nor with loader
        # workers: each would fill a copy of its own, while decoding already runs beside the step
        self.frozen = FrozenFeatures(0 if cfg.augment or cfg.data.workers > 0 else cfg.frozen_cache_mib)

    def build(self) -> torch.nn.Module:
        from cir.backbone import create_backbone

        source = self.cfg.init_from or self.cfg.clip.model
        self.backbone = create_backbone(source, None if self.cfg.init_from else self.cfg.clip.pretrained,
                                        seed=self.cfg.seed, allow_random=True)  # stage 0 may train from scratch
        return ContrastiveClip(self.backbone.model)

    @property
    def lazy_roles(self) -> tuple[schema.Role, ...]:
        return (schema.IMAGE,) if self.frozen.on else ()

    def undecoded_images(self, samples: list[dict]) -> list[tuple[schema.Role, ...]]:
        """The images whose preprocessed pixels are kept (none with augment)."""
        return [(schema.IMAGE,) if kept else () for kept in self.frozen.kept_images(samples, schema.IMAGE, "pixels")]

    def collate(self, samples: list[dict]) -> dict:
        transform = self.backbone.preprocess_train if self.cfg.augment else self.backbone.preprocess

        def preprocess(rows: Optional[list[int]]) -> tuple[torch.Tensor]:
            chosen = samples if rows is None else [samples[i] for i in rows]
            return (preprocess_batch(transform, [image_of(s) for s in chosen]),)

        ids = [image_digest(s, schema.IMAGE) for s in samples] if self.frozen.on else None
        images = self.frozen("pixels", ids, preprocess)[0]  # [B, 3, H, W]
        tokens = self.backbone.tokenizer([s["txt"] for s in samples])  # [B, L]
        return {"images": images, "tokens": tokens}

    cached_keys = ("image_features", "text_features")  # per-sample: cached across micro-batches (loop.py)

    def features(self, model, batch: dict, accelerator) -> dict:
        return model(batch["images"], batch["tokens"])

    def loss_on_features(self, features: dict, accelerator) -> tuple[torch.Tensor, dict]:
        from open_clip.loss import ClipLoss

        if self._loss is None:
            self._loss = ClipLoss(local_loss=self.cfg.local_loss, gather_with_grad=True, cache_labels=True,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
        scale = features["logit_scale"]
        return (self._loss(features["image_features"], features["text_features"], scale),
                {"logit_scale": scale.detach()})

    def loss(self, model, batch: dict, accelerator) -> tuple[torch.Tensor, dict]:
        return self.loss_on_features(self.features(model, batch, accelerator), accelerator)

    def after_step(self, model: ContrastiveClip) -> None:
        """open_clip_train's clamp after every optimizer step: the logit scale stays in [0, ln 100], CLIP's cap
        of 100 on the inverse temperature (trained from scratch, it would otherwise keep growing)."""
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))

    def export(self, model, out_dir: Path) -> None:
        from cir.backbone import save_backbone

        self.backbone.model = model.clip
        save_backbone(self.backbone, out_dir, extra={"trained_by": "stage0"})


def main(argv: Optional[list[str]] = None) -> int:
    return loop_main(Stage0, Stage0Config, argv)


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
