"""Stage I: image -> K pseudo-word tokens, CLIP frozen (`accelerate launch train/stage1.py`).

For images v_i with captions c_i: S_i = mapping(v_i, P_i); t_i = E_T("a photo of $" with $ := S_i);
L = InfoNCE(t, v) + lambda_sta * KL(q || p), q_i = softmax_j(cos(v_i, E_T(c_j)) / tau_s) (frozen CLIP, the
teacher), p_i = softmax_j(cos(t_i, E_T(c_j)) / tau_s): the pseudo-prompt learns to sit where its image's
captions sit, softly. Features are gathered over ranks so the negatives are the global batch.

With `data.use_cached_embeddings` and `mapping.use_patches: false`, `emb.npy` replaces the image tower where
its json's `emb_clip` names this stage's frozen CLIP (the caption job records it; another CLIP's is not used).
The export `{output_dir}/final/` holds `clip/` (the frozen CLIP, open_clip layout), `mapping.safetensors`
and `cir_config.json`; `cir.model.load_cir_model` loads it (stage II, eval).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from cir import schema
from cir.mapping import MappingConfig
from cir.schema import IMAGE, Role
from cir.config import ranged
from train.config import TrainConfig
from train.data import cached_embeddings, has_cached_embeddings
from train.distributed import gather
from train.frozen import FrozenFeatures, image_inputs, image_tower, pick, pixels_of, row_ids
from train.loop import main as loop_main
from train.stage import Stage


@dataclass
class Stage1Config(TrainConfig):
    mapping: MappingConfig = field(default_factory=MappingConfig)
    prompt: str = "a photo of $"  # the pseudo-prompt; "$" is replaced by the K pseudo tokens
    temperature: float = ranged(0.07, gt=0)  # InfoNCE temperature between pseudo-prompt and image features
    sta_weight: float = ranged(1.0, min=0)  # lambda of the soft text alignment loss (0: off)
    sta_temperature: float = ranged(0.05, gt=0)  # tau_s of the similarity distributions over the batch's captions


class StageOneModel(torch.nn.Module):
    """The trainable mapping beside the frozen CLIP. The pseudo-prompt is computed in `forward`, so that
    under DDP it runs through the wrapper (gradient synchronisation hooks on the wrapper's forward)."""

    def __init__(self, clip: torch.nn.Module, mapping: torch.nn.Module, placeholder: int):
        super().__init__()
        self.clip = clip
        self.mapping = mapping
        self.placeholder = placeholder
        for p in self.clip.parameters():
            p.requires_grad_(False)

    def forward(self, v: torch.Tensor, patches: Optional[torch.Tensor], prompts: torch.Tensor) -> torch.Tensor:
        from cir.mapping import encode_text_with_pseudo

        return encode_text_with_pseudo(self.clip, prompts, self.placeholder, self.mapping(v, patches))  # [B, d]

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: no dropout, no norm statistics updates
        return self


class Stage1(Stage):
    name = "stage1"
    required_fields = schema.CAPTION.required()

    def __init__(self, cfg: Stage1Config):
        super().__init__()
        self.cfg = cfg
        self.cached = cfg.data.use_cached_embeddings and not cfg.mapping.use_patches
        self.frozen = FrozenFeatures(cfg.frozen_cache_mib)  # the frozen towers' outputs, by input

    def build(self) -> torch.nn.Module:
        from cir.backbone import clip_fingerprint, create_backbone
        from cir.model import new_mapping

        source = self.cfg.init_from or self.cfg.clip.model
        self.backbone = create_backbone(source, None if self.cfg.init_from else self.cfg.clip.pretrained,
                                        seed=self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        mapping, self.placeholder = new_mapping(self.backbone, self.cfg.mapping)
        self.prompt_tokens = self.backbone.tokenizer([self.cfg.prompt])  # [1, L]
        # emb.npy is used only where this CLIP made it (train.data.emb_made_by)
        self.clip_id = clip_fingerprint(self.backbone.model) if self.cached else None
        return StageOneModel(self.backbone.model, mapping, self.placeholder)

    @property
    def lazy_roles(self) -> tuple[Role, ...]:
        return (IMAGE,) if self.cached or self.frozen.on else ()

    def undecoded_images(self, samples: list[dict]) -> list[tuple[Role, ...]]:
        """All images when this batch's collate takes emb.npy, else those already kept (train.frozen)."""
        if self.cached and has_cached_embeddings(samples, IMAGE, self.clip_id):
            return [(IMAGE,) for _ in samples]
        return [(IMAGE,) if kept else () for kept in self.frozen.kept_images(samples, IMAGE, "image")]

    def collate(self, samples: list[dict]) -> dict:
        batch = {"captions": self.backbone.tokenizer([s["txt"] for s in samples])}  # [B, L]
        emb = cached_embeddings(samples, IMAGE, self.clip_id)
        if emb is not None:
            batch["emb"] = emb
        else:  # image_pixels, image_rows, image_ids
            batch.update(image_inputs(samples, IMAGE, self.backbone.preprocess, "image", self.frozen))
        if self.frozen.on:  # keys of the text tower's outputs (train.frozen), hashed here in the loader
            batch["caption_ids"] = row_ids(batch["captions"])
        return batch

    cached_keys = ("t", "v", "c")  # per-sample features, cached across micro-batches with grad_accum (loop.py)

    def features(self, model, batch: dict, accelerator) -> dict:
        from cir.mapping import encode_text

        clip = accelerator.unwrap_model(model).clip
        use_patches = self.cfg.mapping.use_patches

        def images(rows):
            return image_tower(clip, pixels_of(batch, "image", rows), use_patches)

        def captions(rows):
            with torch.no_grad():
                return (encode_text(clip, pick(batch["captions"], rows)),)

        if "emb" in batch:
            v, patches = F.normalize(batch["emb"], dim=-1), None
        else:
            out = self.frozen("image", batch.get("image_ids"), images)  # [B, d], [B, n, w]
            v, patches = out[0], out[1] if use_patches else None
        c = self.frozen("caption", batch.get("caption_ids"), captions)[0]  # [B, d] frozen teacher side
        prompts = self.prompt_tokens.to(v.device).expand(v.shape[0], -1)
        return {"t": model(v, patches, prompts), "v": v, "c": c}  # t: [B, d] pseudo-prompt features

    def loss(self, model, batch: dict, accelerator) -> tuple[torch.Tensor, dict]:
        return self.loss_on_features(self.features(model, batch, accelerator), accelerator)

    def loss_on_features(self, features: dict, accelerator) -> tuple[torch.Tensor, dict]:
        t, v, c = features["t"], features["v"], features["c"]
        t_all, v_all, c_all = gather(t, accelerator, True), gather(v, accelerator, False), gather(c, accelerator, False)
        labels = torch.arange(t_all.shape[0], device=t.device)
        logits = t_all @ v_all.T / self.cfg.temperature
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss, scalars = contrastive, {"contrastive": contrastive.detach()}
        if self.cfg.sta_weight > 0:
            teacher = F.softmax(v_all @ c_all.T / self.cfg.sta_temperature, dim=-1)
            student = F.log_softmax(t_all @ c_all.T / self.cfg.sta_temperature, dim=-1)
            sta = F.kl_div(student, teacher, reduction="batchmean")
            loss = loss + self.cfg.sta_weight * sta
            scalars["soft_text_alignment"] = sta.detach()
        return loss, scalars

    def export(self, model, out_dir: Path) -> None:
        from cir.model import save_cir_model

        save_cir_model(out_dir, self.backbone, model.mapping, self.cfg.mapping, self.cfg.prompt, stage=1)


def main(argv: Optional[list[str]] = None) -> int:
    return loop_main(Stage1, Stage1Config, argv)


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
