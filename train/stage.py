"""What the training loop calls on a stage: `Stage`, every hook with its default, so the loop never asks
whether a stage has one.

A stage supplies `build()` -> trainable module, `collate(samples)` -> batch of tensors, `loss(model, batch,
accelerator)` -> (loss, scalars), `export(model, dir)`, and `required_fields` for the schema check. The
optional hooks below default to doing nothing:

- `setup(model, accelerator)`: work once the model is on its device (stage II's negative bank).
- `after_step(model)`: constraints on the weights after each optimizer step (stage 0's logit scale).
- Images the stage may not read: `lazy_roles` (cir.schema image roles: IMAGE for `jpg`, TGT for `tgt.jpg`) and
  `undecoded_images(samples)`: the stream leaves the images of those roles encoded and decodes, per sample, those
  the stage will read (not those whose cached embedding it takes, nor those its frozen tower has already
  encoded: train.frozen).
- Feature-cached accumulation (open_clip's accum_freq, loop.feature_cached_step): a contrastive stage lists its
  per-sample feature keys in `cached_keys` and supplies `features(model, batch, accelerator)` -> dict of
  tensors and `loss_on_features(features, accelerator)`; with `grad_accum > 1` and `accum_features` the
  negatives of every micro-batch are then the whole accumulated batch. A stage whose loss is a mean over
  queries, each reading only its own features besides some shared ones (stage II: every query against all
  targets), lists those in `shared_keys` and supplies `shared_features(model, batch, accelerator)`: pass 1 then
  computes only those, and each pass-2 loss covers only its micro-batch's rows (`features["rows"]`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cir.schema import Role


class Stage:
    name: str = "stage"
    required_fields: tuple[str, ...] = ()  # members every sample needs: cir.schema.Kind.required()
    cached_keys: tuple[str, ...] = ()  # per-sample feature keys: feature-cached accumulation (see above)
    shared_keys: tuple[str, ...] = ()  # row-wise stages: the features every query reads (see above)

    def __init__(self):
        self.step = 0  # set by the loop before each micro-batch: optimizer steps done so far (resumes included)

    # -------------------------------------------------------------------------------------- every stage

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict, accelerator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- optional

    def setup(self, model: torch.nn.Module, accelerator) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    @property
    def lazy_roles(self) -> tuple[Role, ...]:
        return ()

    def undecoded_images(self, samples: list[dict]) -> list[tuple[Role, ...]]:
        """Per sample of a batch (images of lazy roles still encoded), the lazy roles whose image collate
        will not read: the stream leaves those encoded."""
        return [() for _ in samples]

    @property
    def caches_features(self) -> bool:
        """Whether the stage supports feature-cached accumulation (it lists cached or shared keys)."""
        return bool(self.cached_keys or self.shared_keys)

    def features(self, model: torch.nn.Module, batch: dict, accelerator) -> dict:
        raise NotImplementedError(f"{self.name} has no feature-cached step")

    def shared_features(self, model: torch.nn.Module, batch: dict, accelerator) -> dict:
        raise NotImplementedError(f"{self.name} is not row-wise")

    def loss_on_features(self, features: dict, accelerator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{self.name} has no feature-cached step")
