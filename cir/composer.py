"""Stage II's modules (METHODS.md): composing adapters inside the CLIP text encoder, the adaptive
image/text fusion of the query, and the uncertainty augmenter of target features.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cir.config import ranged


@dataclass
class AdapterConfig:
    blocks: Optional[list[int]] = None  # text-encoder blocks followed by an adapter (None: every block)
    bottleneck: int = 64  # hidden size of each residual bottleneck MLP


class Adapter(nn.Module):
    """h <- h + W_up gelu(W_down LN(h)); W_up starts at zero, so training starts from stage I exactly."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(self.ln(h))))


class ComposingAdapters(nn.Module):
    """Adapters keyed by text-encoder block; `active(clip)` puts them after their blocks with forward hooks,
    so the CLIP module itself is unchanged (and plain `encode_text` outside the context is stage I's)."""

    def __init__(self, cfg: AdapterConfig, width: int, num_blocks: int):
        super().__init__()
        self.cfg = cfg
        self.block_ids = list(cfg.blocks) if cfg.blocks is not None else list(range(num_blocks))
        bad = [b for b in self.block_ids if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"adapter blocks {bad} do not exist: the text encoder has {num_blocks} blocks")
        self.adapters = nn.ModuleDict({str(b): Adapter(width, cfg.bottleneck) for b in self.block_ids})

    @contextmanager
    def active(self, clip) -> Iterator[None]:
        handles = [clip.transformer.resblocks[b].register_forward_hook(self._hook(str(b))) for b in self.block_ids]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, key: str):
        def hook(module, inputs, output):  # output: [B, L, w]
            return self.adapters[key](output)
        return hook


class Fusion(nn.Module):
    """query = normalize(w * v_ref + (1 - w) * q): the image/text weighting of a composed query (CTI-IR).
    Subclasses say how w [B] is chosen (`weight`) and how cir_config.json records them (`describe`); a
    compositor that does more than weigh (CombinerFusion) overrides `forward` too."""

    def weight(self, v_ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def forward(self, v_ref: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight(v_ref, q)  # [B]
        return F.normalize(w[:, None] * v_ref + (1 - w[:, None]) * q, dim=-1), w


class AdaptiveFusion(Fusion):
    """w = sigmoid(MLP([v_ref ; q])) in (0, 1). The last layer starts at zero with a bias of `init_logit`
    (w = sigmoid(init_logit) for every query at the start). Stage II learns w through the retrieval loss and,
    self-supervised, towards a target derived from each triplet (`fusion_target`)."""

    def __init__(self, dim: int, hidden: int = 128, init_logit: float = -1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, init_logit)

    def weight(self, v_ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(torch.cat([v_ref, q], dim=-1))).squeeze(-1)

    def describe(self) -> dict:
        return {"kind": "adaptive", "hidden": self.mlp[0].out_features}


class FixedFusion(Fusion):
    """One constant w for every query: the fixed-weight baseline of CTI-IR."""

    def __init__(self, weight: float):
        super().__init__()
        if not 0 <= weight <= 1:
            raise ValueError(f"a fixed fusion weight lies in [0, 1], got {weight}")
        self.fixed = float(weight)

    def weight(self, v_ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.full(q.shape[:1], self.fixed, device=q.device, dtype=q.dtype)

    def describe(self) -> dict:
        return {"kind": "fixed", "weight": self.fixed}


class CombinerFusion(Fusion):
    """CLIP4Cir's Combiner (Baldrati et al., 2022), the compositor of the supervised CIR papers' kind: the image
    feature v_ref [B, d] and the text-side query q [B, d] are each projected (Linear, ReLU, dropout) to
    `projection`, concatenated, and
        query = normalize(Linear(dropout(ReLU(Linear(concat)))) + λ q + (1 − λ) v_ref),
    λ = sigmoid(MLP(concat)) [B] a learned per-query scalar. CLIP4Cir's sizes relative to the feature:
    projection 4d, hidden 8d, dropout 0.5. w = 1 − λ is reported as the image's share."""

    def __init__(self, dim: int, projection: int, hidden: int, dropout: float = 0.5):
        super().__init__()
        self.sizes = {"projection": projection, "hidden": hidden, "dropout": dropout}
        self.text_projection = nn.Sequential(nn.Linear(dim, projection), nn.ReLU(), nn.Dropout(dropout))
        self.image_projection = nn.Sequential(nn.Linear(dim, projection), nn.ReLU(), nn.Dropout(dropout))
        self.combiner = nn.Sequential(nn.Linear(2 * projection, hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, dim))
        self.dynamic_scalar = nn.Sequential(nn.Linear(2 * projection, hidden), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(hidden, 1), nn.Sigmoid())

    def _joint(self, v_ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text_projection(q), self.image_projection(v_ref)], dim=-1)  # [B, 2 * projection]

    def weight(self, v_ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return 1 - self.dynamic_scalar(self._joint(v_ref, q)).squeeze(-1)

    def describe(self) -> dict:
        return {"kind": "combiner", **self.sizes}

    def forward(self, v_ref: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joint = self._joint(v_ref, q)
        lam = self.dynamic_scalar(joint)  # [B, 1]
        return F.normalize(self.combiner(joint) + lam * q + (1 - lam) * v_ref, dim=-1), 1 - lam.squeeze(-1)


def combiner_for(dim: int) -> CombinerFusion:
    """A Combiner with CLIP4Cir's sizes for features of width `dim` (640 -> 2,560 and 5,120 there)."""
    return CombinerFusion(dim, projection=4 * dim, hidden=8 * dim)


def fusion_from_config(dim: int, cfg: dict) -> Fusion:
    kind = cfg.get("kind", "adaptive")
    if kind == "fixed":
        return FixedFusion(cfg["weight"])
    if kind == "combiner":
        return CombinerFusion(dim, cfg["projection"], cfg["hidden"], cfg["dropout"])
    return AdaptiveFusion(dim, hidden=cfg["hidden"])


def fusion_target(v_ref: torch.Tensor, q: torch.Tensor, v_tgt: torch.Tensor, temperature: float) -> torch.Tensor:
    """The self-supervised target of w [B], from each triplet without labels: sigmoid((cos(v_t, v_ref) -
    cos(v_t, q)) / temperature). A target that looks more like the reference image than like the text-side
    query asks for more image weight; one that the text describes better, for less."""
    return torch.sigmoid(((v_tgt * v_ref).sum(-1) - (v_tgt * q).sum(-1)) / temperature)


@dataclass
class MURConfig:
    alpha_scale: float = 1.0  # alpha_j ~ N(1, alpha_scale * s): multiplicative noise, s = the feature's own std
    beta_scale: float = 1.0  # beta_j ~ N(m, beta_scale * s): additive noise around the feature's own mean m
    gamma_scale: float = 2.0  # gamma(t) = exp(-gamma_scale * t / max_steps) weighs the coarse term (ours: the
    # released code's epochs become steps; 2.0 puts the crossover gamma = 0.5 at 35% of training)
    sigma_per_sample: bool = False  # sigma of each sample's augmented feature (False: one sigma per batch, as released)
    # [lo, hi]: each target's noise std drawn uniformly from this range, in units of its instance-normalised
    # feature, instead of its own std s (null: the released code's s). Our targets are unit-norm: s = 1/sqrt(d)
    # (0.088 at d = 128) leaves cos(f_hat, f) ~ 0.99 and sigma ~ 1.0 for every sample, a near no-op; cos(f_hat, f)
    # ~ 1/sqrt(1 + 2 noise^2), so [0.23, 0.72] spans cos 0.95 -> 0.7 (docs/METHODS.md)
    noise: Optional[list[float]] = ranged(None, item_gt=0)


def augment_targets(f: torch.Tensor, cfg: MURConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MUR's augmenter: each target feature f [B, d] is instance-normalised with its own mean m and std s over
    its d dimensions, then f_hat = alpha * (f - m) / s + beta with alpha_j ~ N(1, n) and beta_j ~ N(m, n) drawn
    per dimension, n = s (as released: fluctuations that follow the feature's own distribution) or, with
    `cfg.noise = [lo, hi]`, n ~ U(lo, hi) per feature. Returns f_hat [B, d]."""
    m = f.mean(dim=-1, keepdim=True)  # [B, 1]
    s = f.std(dim=-1, keepdim=True).clamp_min(1e-6)  # [B, 1]
    n = s
    if cfg.noise is not None:
        lo, hi = cfg.noise
        n = lo + (hi - lo) * torch.rand((f.shape[0], 1), generator=generator, device=f.device)  # [B, 1]
    alpha = 1 + cfg.alpha_scale * n * torch.randn(f.shape, generator=generator, device=f.device)
    beta = m + cfg.beta_scale * n * torch.randn(f.shape, generator=generator, device=f.device)
    return alpha * (f - m) / s + beta


def fluctuation_stats(f: torch.Tensor, f_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """What makes MUR work, to log: how far the augmented targets moved (cos(f_hat, f) over the batch: mean and
    min) and how much sigma, the std of each augmented feature, varies across samples (its mean and spread)."""
    cos = F.cosine_similarity(f_hat, f, dim=-1)  # [B]
    sigma = f_hat.std(dim=-1)  # [B]
    return {"target_cos": cos.mean(), "target_cos_min": cos.min(), "sigma": sigma.mean(), "sigma_spread": sigma.std()}


def uncertainty_loss(q: torch.Tensor, f_hat: torch.Tensor, temperature: float, offset: int = 0,
                     per_sample: bool = False) -> torch.Tensor:
    """MUR's coarse term: L_u = 1/2 (exp(-sigma) CE(q, f_hat) + sigma), where CE is the batch classification
    loss of the queries q [B, d] against the augmented targets f_hat [N, d] (query i's target is row offset + i)
    and sigma the std of the augmented features (one per batch, or per sample: [B]). A large fluctuation
    lowers the weight of the match, so a coarse query is not pushed away from near-miss candidates."""
    logits = q @ F.normalize(f_hat, dim=-1).T / temperature  # [B, N]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    rows = f_hat[offset:offset + q.shape[0]]
    sigma = rows.std(dim=-1) if per_sample else f_hat.std()  # [B] or []
    ce = F.cross_entropy(logits, labels, reduction="none")  # [B]
    return (0.5 * (torch.exp(-sigma) * ce + sigma)).mean()


def mur_gamma(step: int, max_steps: int, cfg: MURConfig) -> float:
    """The coarse term's weight: 1 at the start, exp(-gamma_scale) at the end (coarse first, then fine)."""
    return math.exp(-cfg.gamma_scale * min(1.0, step / max(1, max_steps)))


def hard_negative_infonce(q: torch.Tensor, targets: torch.Tensor, refs: torch.Tensor, temperature: float,
                          ref_weight: float, offset: int = 0, negatives: Optional[torch.Tensor] = None,
                          negative_mask: Optional[torch.Tensor] = None, negative_weight: float = 0.0,
                          max_similarity: float = 1.0) -> torch.Tensor:
    """-log exp(q.v_t/tau) / (exp(q.v_t/tau) + sum_{n in batch targets} exp(q.v_n/tau) + w_ref exp(q.v_ref/tau)
    + w_hn sum_{h in the triplet's mined hard negatives} exp(q.v_h/tau)).

    q: [B, d] local queries; targets: [N, d] the global batch of targets (row offset + i is query i's);
    refs: [B, d] each query's own reference, the negative that stops "return the reference"; negatives:
    [B, H, d] each query's own mined hard negatives, negative_mask [B, H] which of them exist. A weight w
    enters as log(w) added to the logit. A hard negative (the reference or a mined one) whose image feature
    has cosine > max_similarity with the query's own target is left out: the frozen image tower cannot tell
    it from the target, so as a negative it would only push the query along the tower's noise.
    """
    logits = q @ targets.T / temperature  # [B, N]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    own = targets[offset:offset + q.shape[0]]  # [B, d] each query's target
    if ref_weight > 0:
        ref_logit = (q * refs).sum(dim=-1, keepdim=True) / temperature + math.log(ref_weight)  # [B, 1]
        if max_similarity < 1:
            ref_logit = ref_logit.masked_fill((own * refs).sum(-1, keepdim=True) > max_similarity, float("-inf"))
        logits = torch.cat([logits, ref_logit], dim=1)
    if negatives is not None and negative_weight > 0 and negatives.shape[1] > 0:
        hn_logits = torch.einsum("bd,bhd->bh", q, negatives) / temperature + math.log(negative_weight)  # [B, H]
        keep = negative_mask if negative_mask is not None else torch.ones_like(hn_logits, dtype=torch.bool)
        if max_similarity < 1:
            keep = keep & (torch.einsum("bd,bhd->bh", own, negatives) <= max_similarity)
        hn_logits = hn_logits.masked_fill(~keep, float("-inf"))
        logits = torch.cat([logits, hn_logits], dim=1)
    return F.cross_entropy(logits, labels)
