"""Stage I's mapping network and the text encoder with pseudo-word tokens (METHODS.md, "Stage I").

Shared by the trainers and eval: an image becomes K pseudo-word token embeddings S that replace the
placeholder "$" of a prompt inside the CLIP text encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ranged

PLACEHOLDER = "$"
TOKEN_NORMS = ("free", "words")


@dataclass
class MappingConfig:
    num_tokens: int = 4  # K pseudo-word tokens per image
    depth: int = 2  # L blocks of (cross-attention to the patch tokens, MLP)
    heads: int = 4  # attention heads of the cross-attention
    mlp_ratio: float = 4.0  # MLP hidden size / token width
    use_patches: bool = True  # visual semantic injection; False: queries see only the global feature
    dropout: float = 0.0  # on the MLP hidden layer
    # "free": S as the output layer gives it; "words": each pseudo token rescaled to the mean L2 norm of the
    # text encoder's word embeddings, so that S sits where real words do in the token-embedding space
    token_norm: str = ranged("free", choices=TOKEN_NORMS)


class MappingBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, cross: bool, dropout: float):
        super().__init__()
        self.cross = cross
        if cross:
            self.ln_q = nn.LayerNorm(width)
            self.ln_kv = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor | None) -> torch.Tensor:
        # q: [B, K, w], kv: [B, n, w] projected patch tokens
        if self.cross and kv is not None:
            kv = self.ln_kv(kv)
            q = q + self.attn(self.ln_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.ln_mlp(q))


class MappingNetwork(nn.Module):
    """(global feature v [B, d], patch tokens P [B, n, w_img] or None) -> S [B, K, w_tok].

    Queries = learnable embeddings + a projection of v; each block cross-attends to the projected patches
    ("visual semantic injection") then applies an MLP. K=1 with use_patches=False is a Pic2Word-style
    mapping of the global feature alone, kept for ablations.
    """

    def __init__(self, cfg: MappingConfig, embed_dim: int, patch_dim: int, token_dim: int, word_norm: float = 1.0):
        super().__init__()
        if cfg.token_norm not in TOKEN_NORMS:
            raise ValueError(f"mapping.token_norm must be one of {TOKEN_NORMS}, not {cfg.token_norm!r}")
        self.cfg = cfg
        self.word_norm = word_norm  # mean |e| of the CLIP's word embeddings (used when token_norm="words")
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, token_dim) * 0.02)
        self.global_proj = nn.Linear(embed_dim, token_dim)
        self.patch_proj = nn.Linear(patch_dim, token_dim) if cfg.use_patches else None
        self.blocks = nn.ModuleList(MappingBlock(token_dim, cfg.heads, cfg.mlp_ratio, cfg.use_patches, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.ln_out = nn.LayerNorm(token_dim)
        self.proj_out = nn.Linear(token_dim, token_dim)

    def forward(self, v: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries[None] + self.global_proj(v)[:, None]  # [B, K, w_tok]
        kv = self.patch_proj(patches) if self.patch_proj is not None and patches is not None else None
        for block in self.blocks:
            q = block(q, kv)
        s = self.proj_out(self.ln_out(q))  # [B, K, w_tok]
        if self.cfg.token_norm == "words":
            s = F.normalize(s, dim=-1) * self.word_norm
        return s


def placeholder_id(tokenizer) -> int:
    ids = tokenizer([PLACEHOLDER])[0]
    inner = [int(i) for i in ids[1:] if int(i) not in (0, int(ids[0]))]
    if len(inner) < 2 or len(inner) > 2:  # "$" + <end_of_text>
        raise ValueError(f"the tokenizer splits {PLACEHOLDER!r} into several tokens: {inner}")
    return inner[0]


def encode_text_with_pseudo(clip, tokens: torch.Tensor, placeholder: int, pseudo: torch.Tensor,
                            normalize: bool = True) -> torch.Tensor:
    """CLIP text features of prompts whose placeholder token is replaced by K pseudo tokens.

    tokens: [B, L] ids with exactly one placeholder each; pseudo: [B, K, w]. The sequence grows by K - 1
    (truncated to L), so the end-of-text position, which pools the features, moves by K - 1 too.
    """
    length = tokens.shape[1]
    k = pseudo.shape[1]
    cast = clip.transformer.get_cast_dtype()
    where = (tokens == placeholder).int().argmax(dim=1)  # [B]
    if not bool((tokens == placeholder).any(dim=1).all()):
        raise ValueError("every prompt needs the placeholder token")
    eot = (tokens.argmax(dim=-1) + (k - 1)).clamp(max=length - 1)  # <end_of_text> has the largest id
    # Only positions up to the batch's last <end_of_text> reach the features (see _pooled_text), and each of
    # them reads a token at or before itself: the sequence is built for those n positions only.
    n = int(eot.max()) + 1
    x = clip.token_embedding(tokens[:, :n]).to(cast)  # [B, n, w]
    # Output position j takes token j before the placeholder p, pseudo token j - p for p <= j < p + K, and
    # token j - K + 1 after (the sequence shifted right by K - 1, truncated to L): one gather per source.
    pos = torch.arange(n, device=tokens.device)[None]  # [1, n]
    p = where[:, None]  # [B, 1]
    width = x.shape[-1]
    from_tokens = x.gather(1, torch.where(pos < p, pos, pos - (k - 1)).clamp(0, n - 1)[..., None]
                           .expand(-1, -1, width))
    from_pseudo = pseudo.to(cast).gather(1, (pos - p).clamp(0, k - 1)[..., None].expand(-1, -1, width))
    x = torch.where(((pos >= p) & (pos < p + k))[..., None], from_pseudo, from_tokens)  # [B, n, w]
    return _pooled_text(clip, x, eot, normalize)


def encode_text(clip, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """`clip.encode_text` (same features), computed only up to the batch's last <end_of_text>: a toy caption
    needs ~15 of 48 positions, "a photo of $ that ..." ~15 of 77. Text towers other than open_clip's own
    argmax-pooled causal transformer go through their own encode_text."""
    if getattr(clip, "text_pool_type", None) != "argmax" or getattr(clip, "attn_mask", None) is None:
        return clip.encode_text(tokens, normalize=normalize)
    x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
    return _pooled_text(clip, x, tokens.argmax(dim=-1), normalize)


def _pooled_text(clip, x: torch.Tensor, eot: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The text transformer on token embeddings x [B, L, w], pooled at positions eot [B]."""
    # The attention is causal and features are pooled at <end_of_text>: positions after the last one in the
    # batch cannot change the result, so they are cut ("a photo of $" needs ~7 of 77 positions).
    n = int(eot.max()) + 1
    x = x[:, :n] + clip.positional_embedding[:n].to(x.dtype)
    mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def image_features(clip, images: torch.Tensor, with_patches: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised global features [B, d] and (optionally) patch tokens [B, n, w] from the image tower."""
    visual = clip.visual
    if not with_patches:
        return F.normalize(clip.encode_image(images), dim=-1), None
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = previous
    return F.normalize(pooled, dim=-1), tokens
