"""Stage II: composing adapters + hard negatives on (few) triplets (`accelerate launch train/stage2.py`).

The stage I export (`init_from`) gives the frozen CLIP and mapping; the composing adapters inside the text
encoder (and, with `fusion=adaptive`, the fusion network) are trained. Query q = E_T^A(template with $ :=
S(ref)); target = the frozen image feature of the target (cached `tgt.emb.npy` or computed).

loss=infonce: InfoNCE over the global batch of targets plus each query's own reference as a weighted
    negative (`ref_negative_weight`), which stops the cheap answer "return the reference", plus (with
    `hard_negatives.weight` > 0) the triplet's mined hard negatives, looked up by key in a feature bank of
    the caption dataset they were mined from (train.negatives).
loss=mur: gamma(t) x the coarse term + (1 - gamma(t)) x the fine term, gamma(t) = exp(-gamma_scale t / T):
    the coarse term is the same classification loss against augmented targets f_hat (each feature's own
    fluctuation), scaled by their std sigma (cir.composer.augment_targets / uncertainty_loss), as the
    authors' released code does (METHODS.md). Both terms and their gradient norms w.r.t. the queries are logged.
template without "$" (e.g. "{}"): q = E_T^A(the modification text) alone, and with a fusion the image enters only
    through w * v_ref: the hybrid-modality query of CTI-IR (paper 000), where "text-only" is w = 0.
fusion=adaptive: query = normalize(w * v_ref + (1 - w) * q), w = sigmoid(MLP([v_ref; q])), learned through
    the retrieval loss and, self-supervised, by fusion_aux_weight x BCE(w, w*) towards a target derived from each
    triplet without labels: w* = sigmoid((cos(v_t, v_ref) - cos(v_t, q)) / fusion_aux_temperature), how much
    more the target looks like the reference image than like the text-side query (cir.composer.fusion_target).
    Mean and std of w and w* are logged. fusion=fixed: one constant w = fusion_weight (CTI-IR's baseline).
fusion=combiner: CLIP4Cir's Combiner composes v_ref and the text-side query (an MLP of both plus a learned mix of
    the two; cir.composer.CombinerFusion), trained by the retrieval loss: the supervised papers' compositor.
grad_accum > 1 (with accum_features): every micro-batch's queries meet the targets of the whole accumulated
    batch, as one batch of grad_accum x batch_size would (train.loop.feature_cached_step); only the targets are
    computed ahead, so the text tower runs once per micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from cir import schema
from cir.composer import AdapterConfig, MURConfig
from cir.schema import REF, TGT, Role
from cir.config import ConfigError, ranged
from cir.mapping import PLACEHOLDER
from train.config import TrainConfig
from train.data import DataError, cached_embeddings, has_cached_embeddings
from train.distributed import gather
from train.frozen import FrozenFeatures, image_inputs, image_tower, pixels_of
from train.loop import main as loop_main
from train.negatives import HardNegativeConfig
from train.stage import Stage

LOSSES = ("infonce", "mur")
FUSIONS = ("text", "adaptive", "fixed", "combiner")


@dataclass
class Stage2Config(TrainConfig):
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    template: str = "a photo of $ that {}"  # the composed query; "$" = the reference's pseudo tokens. Without "$"
    # ("{}"), the text side is the modification text alone and the image enters through `fusion`: CTI-IR's query
    temperature: float = ranged(0.07, gt=0)  # InfoNCE temperature
    ref_negative_weight: float = ranged(0.1, min=0)  # w of the reference as an extra negative (0: not a negative); 0.1 measured
    # on the toy val split (docs/reports/CLAIMS.md): at 1 the queries drift from the target's neighbourhood (R@50 falls)
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)  # the triplets' mined ones
    negative_max_similarity: float = 1.0  # a hard negative (reference or mined) whose image feature has cosine
    # above this with the query's target is left out (1.0: never): a negative the image tower cannot tell from
    # the target is a false negative in feature space
    loss: str = ranged("infonce", choices=LOSSES)  # infonce | mur (multi-grained uncertainty regularization)
    mur: MURConfig = field(default_factory=MURConfig)
    # text | adaptive (learned image/text weighting of the query) | fixed (w = fusion_weight) | combiner (CLIP4Cir's
    # Combiner on the image feature and the text-side query: cir.composer.CombinerFusion, its sizes CLIP4Cir's)
    fusion: str = ranged("text", choices=FUSIONS)
    fusion_hidden: int = ranged(128, min=1)  # hidden size of the adaptive fusion MLP
    fusion_aux_weight: float = ranged(1.0, min=0)  # adaptive: weight of the self-supervised BCE(w, w*) (0: retrieval loss only)
    fusion_aux_temperature: float = ranged(0.05, gt=0)  # adaptive: temperature of the target w* (cir.composer.fusion_target)
    fusion_weight: float = ranged(0.5, min=0, max=1)  # fixed: the image weight w of every query
    train_mapping: bool = False  # also fine-tune the stage I mapping


class StageTwoModel(torch.nn.Module):
    def __init__(self, clip, mapping, adapters, fusion, placeholder: int, train_mapping: bool, image_tokens: bool):
        super().__init__()
        self.clip, self.mapping, self.adapters, self.fusion = clip, mapping, adapters, fusion
        self.placeholder, self.image_tokens = placeholder, image_tokens
        for p in self.clip.parameters():
            p.requires_grad_(False)
        for p in self.mapping.parameters():
            p.requires_grad_(train_mapping)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    def forward(self, v_ref, patches, prompts):
        """(query [B, d], w [B] or None, the text-side query before fusion [B, d])."""
        from cir.model import compose

        q_text, _ = compose(self.clip, self.mapping, self.placeholder, v_ref, patches, prompts, self.adapters,
                            image_tokens=self.image_tokens)
        if self.fusion is None:
            return q_text, None, q_text
        query, w = self.fusion(v_ref, q_text)
        return query, w, q_text


class Stage2(Stage):
    name = "stage2"
    required_fields = schema.TRIPLET.required()

    def __init__(self, cfg: Stage2Config):
        if not cfg.init_from:
            raise ConfigError("stage II needs init_from=<stage I export>/final")
        if "{}" not in cfg.template:
            raise ConfigError(f"template needs '{{}}' (the modification text), got {cfg.template!r}")
        if cfg.train_mapping and PLACEHOLDER not in cfg.template:
            raise ConfigError(f"train_mapping: the template {cfg.template!r} has no {PLACEHOLDER!r}, so the mapping "
                              f"takes no part in the query")
        if cfg.hard_negatives.weight < 0 or cfg.hard_negatives.per_query < 0:
            raise ConfigError("hard_negatives.weight and hard_negatives.per_query must be >= 0")
        noise = cfg.mur.noise
        if noise is not None and (len(noise) != 2 or noise[0] > noise[1]):
            raise ConfigError(f"mur.noise: [lo, hi] with 0 < lo <= hi (each target's noise std is drawn from it), "
                              f"got {noise}")
        super().__init__()
        self.cfg = cfg
        self.bank = None  # NegativeBank when hard_negatives.weight > 0 (built in setup)
        self.frozen = FrozenFeatures(cfg.frozen_cache_mib)  # the frozen image tower's outputs, by input

    def build(self) -> torch.nn.Module:
        from cir.backbone import clip_fingerprint
        from cir.composer import AdaptiveFusion, ComposingAdapters, FixedFusion, combiner_for
        from cir.model import load_cir_model, text_encoder_shape

        try:
            self.cir = load_cir_model(self.cfg.init_from)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"init_from: {err}") from err
        if self.cir.stage != 1:  # its adapters and fusion would be dropped without a word, new ones trained
            raise ConfigError(f"init_from: {self.cfg.init_from} is a stage {self.cir.stage} export; stage II "
                              f"starts from a stage I export (its mapping), with new adapters: pass the stage I "
                              f"export it was trained from")
        # tgt.emb.npy and the bank's emb.npy are used only where this CLIP made them (train.data.emb_made_by)
        self.clip_id = clip_fingerprint(self.cir.backbone.model) if self.cfg.data.use_cached_embeddings else None
        torch.manual_seed(self.cfg.seed)
        width, blocks = text_encoder_shape(self.cir.backbone)
        try:
            adapters = ComposingAdapters(self.cfg.adapters, width, blocks)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        fusion = None
        if self.cfg.fusion == "adaptive":
            fusion = AdaptiveFusion(self.cir.backbone.embed_dim, self.cfg.fusion_hidden)
        elif self.cfg.fusion == "fixed":
            fusion = FixedFusion(self.cfg.fusion_weight)
        elif self.cfg.fusion == "combiner":
            fusion = combiner_for(self.cir.backbone.embed_dim)
        return StageTwoModel(self.cir.backbone.model, self.cir.mapping, adapters, fusion, self.cir.placeholder,
                             self.cfg.train_mapping, image_tokens=PLACEHOLDER in self.cfg.template)

    def setup(self, model, accelerator) -> None:
        """Encode the caption datasets the mined hard negatives come from (once; see train.negatives)."""
        from cir.backbone import weights_fingerprint
        from cir.mapping import image_features
        from train.negatives import bank_datasets, encode_datasets, load_or_build

        hn = self.cfg.hard_negatives
        if hn.weight <= 0 or (hn.per_query == 0 and hn.target_neighbours == 0):
            return
        datasets = bank_datasets(hn, self.cfg.data.train)
        if not datasets:
            accelerator.print("warning: no caption dataset is known for the triplets' hard_negatives keys (no "
                              "dataset.json input): training without mined hard negatives; set "
                              "hard_negatives.bank=[DIR], or hard_negatives.weight=0 to silence this")
            return
        clip = accelerator.unwrap_model(model).clip

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return image_features(clip, pixels.to(accelerator.device), False)[0]

        def build():
            return encode_datasets(datasets, encode, self.cir.backbone.preprocess, hn.batch_size,
                                   self.clip_id, accelerator.is_main_process)

        clip_id = weights_fingerprint(str(Path(self.cfg.init_from) / "clip"))
        self.bank = load_or_build(Path(self.cfg.output_dir), datasets, clip_id,
                                  self.cfg.data.use_cached_embeddings, build, accelerator, hn.cache_dir)
        accelerator.print(f"hard negatives: a bank of {len(self.bank)} images from {datasets}")

    @property
    def lazy_roles(self) -> tuple[Role, ...]:
        if self.frozen.on:  # references and targets the frozen tower has encoded are not decoded again
            return (REF, TGT)
        return (TGT,) if self.cfg.data.use_cached_embeddings else ()

    def undecoded_images(self, samples: list[dict]) -> list[tuple[Role, ...]]:
        """Targets whose tgt.emb.npy this batch takes; references and targets already kept (train.frozen)."""
        tgt_cached = TGT in self.lazy_roles and has_cached_embeddings(samples, TGT, self.clip_id)
        refs, tgts = self.frozen.kept_images(samples, REF, "ref"), self.frozen.kept_images(samples, TGT, "tgt")
        return [((REF,) if ref else ()) + ((TGT,) if tgt_cached or tgt else ()) for ref, tgt in zip(refs, tgts)]

    def collate(self, samples: list[dict]) -> dict:
        bb = self.cir.backbone
        batch = {"prompts": bb.tokenizer([self.cfg.template.format(s["mod.txt"].strip()) for s in samples]),
                 **image_inputs(samples, REF, bb.preprocess, "ref", self.frozen)}  # ref_pixels, ref_rows, ref_ids
        tgt_emb = cached_embeddings(samples, TGT, self.clip_id)
        if tgt_emb is not None:
            batch["tgt_emb"] = tgt_emb
        else:
            batch.update(image_inputs(samples, TGT, bb.preprocess, "tgt", self.frozen))
        if self.bank is not None:
            batch["hn_rows"] = self.bank.rows([s.get("json") or {} for s in samples], self.cfg.hard_negatives.per_query)
        return batch

    # With grad_accum (loop.feature_cached_step): the loss is a mean over queries, each reading its own query,
    # reference, hard negatives and fusion weight, and the targets of the whole accumulated batch. Pass 1 needs
    # only those targets; each pass-2 loss covers its micro-batch's rows.
    shared_keys = ("v_tgt",)

    def shared_features(self, model, batch: dict, accelerator) -> dict:
        return {"v_tgt": self._targets(accelerator.unwrap_model(model).clip, batch)}

    def _targets(self, clip, batch: dict) -> torch.Tensor:
        """The targets' frozen features [B, d]: from tgt.emb.npy, kept ones (train.frozen) or the tower."""
        if "tgt_emb" in batch:
            return F.normalize(batch["tgt_emb"], dim=-1)
        return self.frozen("tgt", batch.get("tgt_ids"), lambda rows: image_tower(clip, pixels_of(batch, "tgt", rows),
                                                                                  False))[0]

    def _references(self, clip, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The references' frozen features [B, d] and, when the mapping reads them, patch tokens [B, n, w]."""
        use_patches = self.cir.mapping.cfg.use_patches
        out = self.frozen("ref", batch.get("ref_ids"),
                          lambda rows: image_tower(clip, pixels_of(batch, "ref", rows), use_patches))
        return out[0], out[1] if use_patches else None

    def features(self, model, batch: dict, accelerator) -> dict:
        clip = accelerator.unwrap_model(model).clip
        v_ref, patches = self._references(clip, batch)
        v_tgt = self._targets(clip, batch)
        q, w, q_text = model(v_ref, patches, batch["prompts"])  # [B, d], [B] or None, [B, d]
        features = {"q": q, "v_ref": v_ref, "v_tgt": v_tgt}
        if w is not None:
            features["w"], features["q_text"] = w, q_text
        if "hn_rows" in batch:
            features["negatives"], features["mask"] = self.bank.lookup(batch["hn_rows"], q.device)  # [B, H, d], [B, H]
            k = self.cfg.hard_negatives.target_neighbours
            if k > 0:
                near, near_mask = self.bank.nearest(v_tgt, k, min(self.cfg.negative_max_similarity, 0.999))
                features["negatives"] = torch.cat([features["negatives"], near], dim=1)  # [B, H + k, d]
                features["mask"] = torch.cat([features["mask"], near_mask], dim=1)
        return features

    def loss(self, model, batch: dict, accelerator) -> tuple[torch.Tensor, dict]:
        return self.loss_on_features(self.features(model, batch, accelerator), accelerator)

    def loss_on_features(self, features: dict, accelerator) -> tuple[torch.Tensor, dict]:
        from cir.composer import (augment_targets, fluctuation_stats, fusion_target, hard_negative_infonce, mur_gamma,
                                  uncertainty_loss)

        q, v_ref, v_tgt, mask = features["q"], features["v_ref"], features["v_tgt"], features.get("mask")
        # the queries' rows among the targets (all rows, unless a micro-batch of an accumulated step)
        start, stop = features.get("rows", (0, v_tgt.shape[0]))
        targets = gather(v_tgt, accelerator, False)
        offset = accelerator.process_index * v_tgt.shape[0] + start
        fine = hard_negative_infonce(q, targets, v_ref, self.cfg.temperature, self.cfg.ref_negative_weight, offset,
                                     features.get("negatives"), mask, self.cfg.hard_negatives.weight,
                                     self.cfg.negative_max_similarity)
        scalars = {"fine": fine.detach()}
        if mask is not None:
            scalars["hard_negatives_per_query"] = mask.float().sum(dim=1).mean()
        loss = fine
        if self.cfg.loss == "mur":
            # augmented over all targets (the whole batch's noise, as one big batch draws it), scored on the queries
            f_hat = augment_targets(targets, self.cfg.mur)
            coarse = uncertainty_loss(q, f_hat, self.cfg.temperature, offset, self.cfg.mur.sigma_per_sample)
            gamma = mur_gamma(self.step, self.cfg.max_steps, self.cfg.mur)
            loss = gamma * coarse + (1 - gamma) * fine
            scalars.update(coarse=coarse.detach(), gamma=torch.tensor(gamma),
                           **fluctuation_stats(targets.detach(), f_hat.detach()))  # is the augmenter doing anything?
            if q.requires_grad:  # how hard each term pulls on the queries (they must be of one order)
                for name, term in (("fine", fine), ("coarse", coarse)):
                    grad, = torch.autograd.grad(term, q, retain_graph=True)
                    scalars[f"{name}_grad_norm"] = grad.norm(dim=-1).mean()
        if "w" in features:
            w = features["w"]
            scalars.update(fusion_w_mean=w.detach().mean(), fusion_w_std=w.detach().std())
            if self.cfg.fusion == "adaptive" and self.cfg.fusion_aux_weight > 0:
                rows = v_tgt[start:stop]
                target = fusion_target(v_ref, features["q_text"].detach(), rows, self.cfg.fusion_aux_temperature)
                wf = w.float().clamp(1e-6, 1 - 1e-6)  # BCE by hand: F.binary_cross_entropy refuses CUDA autocast
                aux = -(target * wf.log() + (1 - target) * (1 - wf).log()).mean()
                loss = loss + self.cfg.fusion_aux_weight * aux
                scalars.update(fusion_aux=aux.detach(), fusion_target_mean=target.mean(), fusion_target_std=target.std())
        return loss, scalars

    def export(self, model, out_dir: Path) -> None:
        from cir.model import save_cir_model

        save_cir_model(out_dir, self.cir.backbone, model.mapping, self.cir.mapping.cfg, self.cir.prompt, stage=2,
                       adapters=model.adapters, fusion=model.fusion, template=self.cfg.template)


def main(argv: Optional[list[str]] = None) -> int:
    return loop_main(Stage2, Stage2Config, argv)


if __name__ == "__main__":
    from cir.cli import run_and_exit

    run_and_exit(main)
