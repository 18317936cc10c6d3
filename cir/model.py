"""A trained CIR model on disk: stage exports that later stages and eval load.

    {export}/clip/              the (frozen) CLIP in open_clip's local-dir layout
    {export}/mapping.safetensors
    {export}/cir_config.json    stage, prompt, mapping config and sizes (what is needed to rebuild)
    {export}/adapters.safetensors, fusion.safetensors   stage II only (config in cir_config.json)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from cir.backbone import Backbone, create_backbone, save_backbone
from cir.composer import AdapterConfig, ComposingAdapters, Fusion, fusion_from_config
from cir.mapping import MappingConfig, MappingNetwork, encode_text_with_pseudo, placeholder_id

CONFIG_FILE = "cir_config.json"
MAPPING_FILE = "mapping.safetensors"


def mapping_sizes(backbone: Backbone) -> dict:
    return {"embed_dim": backbone.embed_dim, "patch_dim": int(backbone.model_cfg["vision_cfg"]["width"]),
            "token_dim": int(backbone.model.token_embedding.embedding_dim)}


def new_mapping(backbone: Backbone, cfg: MappingConfig) -> tuple[MappingNetwork, int]:
    return MappingNetwork(cfg, **mapping_sizes(backbone)), placeholder_id(backbone.tokenizer)


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


@dataclass
class CIRModel:
    backbone: Backbone
    mapping: MappingNetwork
    placeholder: int
    prompt: str
    stage: int
    adapters: Optional[ComposingAdapters] = None
    fusion: Optional[Fusion] = None
    template: str = "a photo of $ that {}"


def load_cir_model(path: str | Path, device: str = "cpu") -> CIRModel:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a stage I/II export (missing file: {config_path})")
    config = json.loads(config_path.read_text())
    backbone = create_backbone(str(path / "clip"), device=device)
    mapping_cfg = MappingConfig(**config["mapping"])
    mapping, placeholder = new_mapping(backbone, mapping_cfg)
    if mapping_sizes(backbone) != config["sizes"]:
        raise ValueError(f"{path}: the CLIP does not match the mapping's sizes {config['sizes']}")
    mapping.load_state_dict(load_file(str(path / MAPPING_FILE)))
    mapping.to(device).eval()
    backbone.model.eval()
    adapters = fusion = None
    if "adapters" in config:
        width, blocks = text_encoder_shape(backbone)
        adapters = ComposingAdapters(AdapterConfig(**config["adapters"]), width, blocks)
        adapters.load_state_dict(load_file(str(path / "adapters.safetensors")))
        adapters.to(device).eval()
    if "fusion" in config:
        fusion = fusion_from_config(backbone.embed_dim, config["fusion"])
        fusion.load_state_dict(load_file(str(path / "fusion.safetensors")))
        fusion.to(device).eval()
    return CIRModel(backbone, mapping, placeholder, config["prompt"], int(config["stage"]), adapters, fusion,
                    config.get("template", "a photo of $ that {}"))


def compose(clip, mapping: MappingNetwork, placeholder: int, v: torch.Tensor, patches: Optional[torch.Tensor],
            prompts: torch.Tensor, adapters: Optional[ComposingAdapters] = None,
            fusion: Optional[Fusion] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Composed query features [B, d] (and the fusion weight w [B] when adaptive) from reference features
    v [B, d] / patches and prompt tokens [B, L] with the placeholder: stage I without adapters/fusion."""
    pseudo = mapping(v, patches)
    if adapters is not None:
        with adapters.active(clip):
            q = encode_text_with_pseudo(clip, prompts, placeholder, pseudo)
    else:
        q = encode_text_with_pseudo(clip, prompts, placeholder, pseudo)
    if fusion is not None:
        return fusion(v, q)
    return q, None


def pseudo_prompt_features(model: CIRModel, images: torch.Tensor, prompt: Optional[str] = None) -> torch.Tensor:
    """Normalised text features of the pseudo-prompt of each image: [B, d]."""
    from cir.mapping import encode_text_with_pseudo, image_features

    clip = model.backbone.model
    v, patches = image_features(clip, images, model.mapping.cfg.use_patches)
    tokens = model.backbone.tokenizer([prompt or model.prompt] * images.shape[0]).to(images.device)
    return encode_text_with_pseudo(clip, tokens, model.placeholder, model.mapping(v, patches))
