"""A trained CIR model on disk: stage exports that later stages and eval load.

    {export}/clip/              the (frozen) CLIP in open_clip's local-dir layout
    {export}/mapping.safetensors
    {export}/cir_config.json    stage, prompt, mapping config and sizes (what is needed to rebuild)
    {export}/adapters.safetensors, fusion.safetensors   stage II only (config in cir_config.json)
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cir.jsonfile import load_json
from cir.backbone import Backbone, create_backbone, preprocess_batch, save_backbone
from cir.composer import AdapterConfig, ComposingAdapters, Fusion, fusion_from_config
from cir.errors import CIRError
from cir.mapping import (PLACEHOLDER, MappingConfig, MappingNetwork, encode_text, encode_text_with_pseudo,
                         image_features, placeholder_id)

CONFIG_FILE = "cir_config.json"
MAPPING_FILE = "mapping.safetensors"
DEFAULT_TEMPLATE = "a photo of $ that {}"  # the composed query's prompt; $ is where the pseudo tokens go (a
# template without it, "{}", with a fusion: the hybrid query of CTI-IR, the image weighed against the text alone)
HUB_PREFIX = "hf-hub:"
ImageLike = Union[str, Path, Image.Image]
Images = Union[Sequence[ImageLike], torch.Tensor]  # PIL images / paths, or preprocessed pixels [N, 3, H, W]


class ExportError(CIRError, ValueError):
    """A path or hub id that is not a loadable stage I/II export; the message names it."""


def mapping_sizes(backbone: Backbone) -> dict:
    return {"embed_dim": backbone.embed_dim, "patch_dim": int(backbone.model_cfg["vision_cfg"]["width"]),
            "token_dim": int(backbone.model.token_embedding.embedding_dim)}


def new_mapping(backbone: Backbone, cfg: MappingConfig) -> tuple[MappingNetwork, int]:
    # the word embeddings' mean norm: stage I and II never train them, so an export recomputes the same value
    word_norm = float(backbone.model.token_embedding.weight.detach().float().norm(dim=-1).mean())
    return MappingNetwork(cfg, **mapping_sizes(backbone), word_norm=word_norm), placeholder_id(backbone.tokenizer)


def _save_module(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def text_encoder_shape(backbone: Backbone) -> tuple[int, int]:
    """(width, number of blocks) of the CLIP text transformer."""
    clip = backbone.model
    return int(clip.token_embedding.embedding_dim), len(clip.transformer.resblocks)


def save_cir_model(out_dir: str | Path, backbone: Backbone, mapping: MappingNetwork, mapping_cfg: MappingConfig,
                   prompt: str, stage: int, adapters: Optional[ComposingAdapters] = None,
                   fusion: Optional[Fusion] = None, template: Optional[str] = None) -> Path:
    out = Path(out_dir)
    save_backbone(backbone, out / "clip")
    _save_module(mapping, out / MAPPING_FILE)
    config = {"stage": stage, "prompt": prompt, "mapping": asdict(mapping_cfg), "sizes": mapping_sizes(backbone)}
    if adapters is not None:
        _save_module(adapters, out / "adapters.safetensors")
        config["adapters"] = asdict(adapters.cfg)
    if fusion is not None:
        _save_module(fusion, out / "fusion.safetensors")
        config["fusion"] = fusion.describe()
    if template is not None:
        config["template"] = template
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


class CIRModel(torch.nn.Module):
    """A stage I/II export ready to use: `cir.load(path)`, then `encode_image` for gallery features and
    `encode_query` for composed queries ("a photo of $ that {text}", $ := the reference's pseudo tokens), as
    open_clip's `model.encode_image` / `encode_text`. All features are L2-normalised float32 on the model's
    device; images are PIL images, paths, or tensors already through `preprocess` ([N, 3, H, W])."""

    def __init__(self, backbone: Backbone, mapping: MappingNetwork, placeholder: int, prompt: str, stage: int,
                 adapters: Optional[ComposingAdapters] = None, fusion: Optional[Fusion] = None,
                 template: str = DEFAULT_TEMPLATE):
        super().__init__()
        self.backbone = backbone  # a plain dataclass: its CLIP is registered below, so .to() moves it
        self.clip = backbone.model
        self.mapping, self.adapters, self.fusion = mapping, adapters, fusion
        self.placeholder, self.prompt, self.stage, self.template = placeholder, prompt, stage, template
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.mapping.parameters()).device

    @property
    def preprocess(self):
        """PIL image -> [3, H, W], the CLIP's eval transform."""
        return self.backbone.preprocess

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def pixels(self, images: Images) -> torch.Tensor:
        return pixels(self.backbone, images).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: Images, batch_size: int = 64) -> torch.Tensor:
        """[N, d] image features (gallery and reference side)."""
        return encode_image(self.backbone, images, batch_size, self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[N, d] plain CLIP text features (the text-only baseline)."""
        return encode_text_batched(self.backbone, texts, batch_size, self.device)

    @torch.no_grad()
    def encode_references(self, images: Images, batch_size: int = 64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What encode_query reads of its images, batch by batch as it reads them: the features [N, d] and,
        when the mapping uses them, patch tokens [N, n, w] (else None). A cache of these (eval run keeps one
        per benchmark and image tower) lets encode_query skip the image tower."""
        feats, patches = [], []
        for start in starts(len(images), batch_size):
            pixels = self.pixels(images[start:start + batch_size])
            v, p = image_features(self.clip, pixels, self.mapping.cfg.use_patches)
            feats.append(v)
            patches.append(p)
        if not feats:
            return torch.empty(0, self.embed_dim, device=self.device), None
        return torch.cat(feats), (torch.cat(patches) if patches[0] is not None else None)

    @torch.no_grad()
    def encode_query(self, images: Images, texts: Sequence[str], batch_size: int = 64,
                     return_weights: bool = False,
                     references: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None):
        """[N, d] composed query features of images[i] modified by texts[i]; with `return_weights`, also the
        image weight w [N] of adaptive or fixed fusion (None without fusion). `references`: encode_references'
        output for these images and batch size, used instead of reading the images (the same numbers)."""
        if isinstance(texts, str) or len(texts) != len(images):
            raise ValueError(f"encode_query takes one text per image: got {len(images)} images and "
                             f"{1 if isinstance(texts, str) else len(texts)} texts")
        check_texts(texts)
        if references is not None and len(references[0]) != len(texts):
            raise ValueError(f"references hold {len(references[0])} images, not the {len(texts)} queried")
        feats, weights = [], []
        for start in starts(len(texts), batch_size):
            stop = start + batch_size
            if references is None:
                v, patches = image_features(self.clip, self.pixels(images[start:stop]), self.mapping.cfg.use_patches)
            else:
                v = references[0][start:stop].to(self.device)
                patches = references[1][start:stop].to(self.device) if references[1] is not None else None
            prompts = self.tokenizer([self.template.format(t) for t in texts[start:stop]])
            q, w = compose(self.clip, self.mapping, self.placeholder, v, patches, prompts.to(self.device),
                           self.adapters, self.fusion, image_tokens=PLACEHOLDER in self.template)
            feats.append(q.float())
            weights.append(w)
        q = torch.cat(feats) if feats else torch.empty(0, self.embed_dim, device=self.device)
        if not return_weights:
            return q
        return q, (torch.cat(weights).float() if weights and weights[0] is not None else None)

    def save(self, out_dir: str | Path) -> Path:
        """Write the export layout (what `cir.load` reads)."""
        return save_cir_model(out_dir, self.backbone, self.mapping, self.mapping.cfg, self.prompt, self.stage,
                              self.adapters, self.fusion, self.template)

    def push_to_hub(self, repo_id: str, private: bool = True, token: Optional[str] = None,
                    commit_message: str = "Upload CIR model") -> str:
        """Upload the export to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder); load it
        back with `cir.load("hf-hub:" + repo_id)`. Returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message))

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: str = "cpu", **hub_kwargs) -> "CIRModel":
        """A local export directory, or "hf-hub:org/name[@revision]" resolved through huggingface_hub's cache
        (`hub_kwargs` go to snapshot_download: cache_dir, local_files_only, token)."""
        return load_cir_model(resolve_export(path_or_id, **hub_kwargs), device)


def resolve_export(path_or_id: str | Path, **hub_kwargs) -> Path:
    """The local directory of an export: the path itself, or an hf-hub: id's snapshot."""
    text = str(path_or_id)
    if not text.startswith(HUB_PREFIX):
        return Path(path_or_id)
    from huggingface_hub import snapshot_download

    repo_id, _, revision = text[len(HUB_PREFIX):].partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, **hub_kwargs))
    except Exception as err:  # offline without a cached copy, unknown repo, no access
        raise ExportError(f"could not fetch {text} from the Hugging Face Hub: {err}. Offline, pass the "
                          f"export's local directory, or download it once with network") from err


def _export_config(path: Path) -> dict:
    """cir_config.json as a dict with the keys every export has (ExportError naming the file otherwise)."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{path} is not a stage I/II export (missing file: {config_path})")
    config = load_json(config_path, "the export's config", ExportError)
    missing = [k for k in ("stage", "prompt", "mapping", "sizes") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ExportError(f"{config_path}: missing {', '.join(missing)}: not a stage I/II export's config")
    return config


def _section(config_path: Path, name: str, cls, values):
    """A dataclass section of cir_config.json (mapping, adapters), ExportError naming an unknown or bad field."""
    try:
        return cls(**values)
    except TypeError as err:
        raise ExportError(f"{config_path}: field {name!r} does not fit this version's {cls.__name__} ({err})") from err


def _load_weights(module: torch.nn.Module, file: Path, config_field: str) -> None:
    """load_state_dict from a safetensors file, ExportError naming the file for a missing, truncated or
    mismatched one (a config field edited after export changes the shapes it expects)."""
    try:
        state = load_file(str(file))
    except FileNotFoundError as err:
        raise ExportError(f"{file} is missing: the export is incomplete; export it again") from err
    except Exception as err:  # safetensors raises its own error type for truncated or empty files
        raise ExportError(f"{file} does not load ({err}): damaged or partly copied; export it again") from err
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ExportError(f"{file} does not match cir_config.json's {config_field!r} "
                          f"({first[1].strip() if len(first) > 1 else first[0]}): was the config edited?") from err


def load_cir_model(path: str | Path, device: str = "cpu") -> CIRModel:
    path = Path(path)
    config = _export_config(path)
    config_path = path / CONFIG_FILE
    backbone = create_backbone(str(path / "clip"), device=device)
    mapping_cfg = _section(config_path, "mapping", MappingConfig, config["mapping"])
    try:
        mapping, placeholder = new_mapping(backbone, mapping_cfg)
    except ValueError as err:
        raise ExportError(f"{config_path}: field 'mapping': {err}") from err
    if mapping_sizes(backbone) != config["sizes"]:
        raise ExportError(f"{path}: the CLIP does not match the mapping's sizes {config['sizes']}")
    _load_weights(mapping, path / MAPPING_FILE, "mapping")
    adapters = fusion = None
    if "adapters" in config:
        width, blocks = text_encoder_shape(backbone)
        adapters = ComposingAdapters(_section(config_path, "adapters", AdapterConfig, config["adapters"]), width,
                                     blocks)
        _load_weights(adapters, path / "adapters.safetensors", "adapters")
    if "fusion" in config:
        try:
            fusion = fusion_from_config(backbone.embed_dim, config["fusion"])
        except (TypeError, ValueError, KeyError) as err:
            raise ExportError(f"{config_path}: field 'fusion' is not a fusion config ({err!r})") from err
        _load_weights(fusion, path / "fusion.safetensors", "fusion")
    model = CIRModel(backbone, mapping, placeholder, config["prompt"], int(config["stage"]), adapters, fusion,
                     config.get("template", DEFAULT_TEMPLATE))
    return model.to(device)


# ------------------------------------------------------------------------------------------------ a CLIP alone
# The same image and text features for a bare CLIP (the baselines of `eval run`, an index built from any CLIP).

def rgb(image: ImageLike) -> Image.Image:
    """A decoded RGB image from a path or an already opened image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as img:
        return img.convert("RGB")


def pixels(backbone: Backbone, images: Images) -> torch.Tensor:
    """[N, 3, H, W] model input: preprocessed tensors pass through, PIL images and paths are transformed."""
    if isinstance(images, torch.Tensor):
        return images
    return preprocess_batch(backbone.preprocess, [rgb(x) for x in images])


def starts(n: int, batch_size: int) -> range:
    """The first index of each batch of n items (ValueError for a batch size below 1, which range() would
    reject with a message about its step)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    return range(0, n, batch_size)


def check_texts(texts: Sequence[str]) -> None:
    """TypeError naming the first item that is not a string (None would be encoded as the word "None")."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__} {text!r}, not a string")


@torch.no_grad()
def encode_image(backbone: Backbone, images: Images, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """[N, d] normalised image features of a CLIP, in batches."""
    feats = [backbone.model.encode_image(pixels(backbone, images[start:start + batch_size]).to(device),
                                         normalize=True).float()
             for start in starts(len(images), batch_size)]
    return torch.cat(feats) if feats else torch.empty(0, backbone.embed_dim, device=device)


@torch.no_grad()
def encode_text_batched(backbone: Backbone, texts: Sequence[str], batch_size: int = 256,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """[N, d] normalised text features of a CLIP, in batches."""
    check_texts(texts)
    feats = [encode_text(backbone.model, backbone.tokenizer(list(texts[start:start + batch_size])).to(device)).float()
             for start in starts(len(texts), batch_size)]
    return torch.cat(feats) if feats else torch.empty(0, backbone.embed_dim, device=device)


def compose(clip, mapping: MappingNetwork, placeholder: int, v: torch.Tensor, patches: Optional[torch.Tensor],
            prompts: torch.Tensor, adapters: Optional[ComposingAdapters] = None,
            fusion: Optional[Fusion] = None, image_tokens: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Composed query features [B, d] (and the fusion weight w [B] when adaptive) from reference features
    v [B, d] / patches and prompt tokens [B, L] with the placeholder: stage I without adapters/fusion.
    `image_tokens=False` (a template without "$"): the prompts are plain text, encoded as such (with the
    adapters); the reference enters through `fusion` alone (CTI-IR's hybrid query w·v_ref + (1 − w)·E_T(text)),
    or not at all without one."""
    with adapters.active(clip) if adapters is not None else contextlib.nullcontext():
        q = (encode_text_with_pseudo(clip, prompts, placeholder, mapping(v, patches)) if image_tokens
             else encode_text(clip, prompts))
    if fusion is not None:
        return fusion(v, q)
    return q, None
