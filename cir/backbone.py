"""The one home of the CLIP backbone: build an open_clip model, its transforms and tokenizer.

Every package (pipeline, synth, train, eval) gets its CLIP through :func:`create_backbone`, so a model
name means the same thing everywhere. Three sources are understood:

* an open_clip built-in name with a pretrained tag or weights file (``ViT-B-32`` + ``laion2b_s34b_b79k``),
  or an ``hf-hub:org/repo`` id: needs the network or a warm Hugging Face cache;
* a local directory in open_clip's hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``),
  which is also what :func:`save_backbone` writes, so stage exports load back the same way;
* the tiny architectures shipped as JSON in ``cir/model_configs`` (``toy-clip-64``, ``tiny-clip-32``),
  randomly initialised from a seed, for tests and the toy world where no weights exist.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import open_clip
import torch

from cir.jsonfile import load_json
from cir.errors import CIRError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip's own search order for weights in a local directory (see open_clip.factory._find_checkpoint_in_dir).
WEIGHT_FILE_NAMES = (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                     "model.safetensors", "pytorch_model.bin")

# Registering the folder adds our tiny configs to open_clip's list of built-ins, so `open_clip.create_model`
# and `open_clip.get_tokenizer` treat them like any other architecture name.
open_clip.add_model_config(MODEL_CONFIG_DIR)
TINY_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
RANDOM = "random"  # pretrained= value that asks for random weights on purpose (see check_weights)


class BackboneError(CIRError, RuntimeError):
    """A backbone could not be built; the message says which name or file is at fault."""


@dataclass
class Backbone:
    """An open_clip model with everything needed to feed it."""

    model: torch.nn.Module
    preprocess_train: Callable  # PIL image -> float tensor [3, H, W] (with augmentation)
    preprocess: Callable  # PIL image -> float tensor [3, H, W] (eval transform)
    tokenizer: Callable  # list[str] -> long tensor [B, context_length]
    name: str  # how it was asked for: a model name, hf-hub id or directory
    model_cfg: dict  # the architecture (open_clip's model_cfg), saved with every export
    preprocess_cfg: dict  # mean/std/size/interpolation, saved with every export
    fingerprint: Optional[str] = None  # clip_fingerprint(model), set by those that record it (frozen uses)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])


def preprocess_batch(transform: Callable, images: Sequence) -> torch.Tensor:
    """`torch.stack([transform(im) for im in images])` -> [B, 3, H, W], the same values bit for bit.

    open_clip's transforms end in ToTensor + Normalize, which image by image were most of the transform's
    time on small images (docs/PERFORMANCE.md). So where every image leaves the PIL
    stages as RGB of one size, the conversion and normalisation run once on the stacked batch (the same
    float ops, in the same order). Any other transform, or mixed sizes/modes, goes image by image."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2 or type(steps[-1]) is not T.Normalize or not isinstance(steps[-2], T.ToTensor):
        return torch.stack([transform(im) for im in images])
    pil = []
    for im in images:
        for step in steps[:-2]:
            im = step(im)
        pil.append(im)
    if not all(getattr(im, "mode", None) == "RGB" and im.size == pil[0].size for im in pil):
        return torch.stack([steps[-1](steps[-2](im)) for im in pil])
    import numpy as np

    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in pil]))  # [B, H, W, 3] uint8
    # as torchvision's to_tensor: channels first, contiguous, float, / 255
    return steps[-1](pixels.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255))


def _resolve_local_dir(path: Path) -> tuple[dict, dict]:
    """Check a local model directory before open_clip sees it.

    open_clip only warns when the directory has a config but no weights and then returns a randomly
    initialised model; for a user that is a silent substitute, so it is an error here.
    """
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise BackboneError(f"model directory {path} has no {CONFIG_FILE} (missing file: {config_path})")
    if not any((path / name).is_file() for name in WEIGHT_FILE_NAMES):
        raise BackboneError(f"model directory {path} has no weights (missing file: {path / WEIGHTS_FILE})")
    config = load_json(config_path, "the CLIP folder's config", BackboneError)
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise BackboneError(f"{config_path} has no 'model_cfg' entry")
    return config["model_cfg"], config.get("preprocess_cfg", {})


def resolve_model_name(model: str) -> tuple[str, Optional[dict]]:
    """Map a user's model string to open_clip's name; local directories get the 'local-dir:' schema."""
    if model.startswith("local-dir:"):
        model = model[len("local-dir:"):]
    if model.startswith("hf-hub:"):
        return model, None
    if os.path.isdir(model) or os.sep in model or model.startswith("."):
        path = Path(model)
        if not path.is_dir():
            raise BackboneError(f"model directory not found: {path}")
        model_cfg, _ = _resolve_local_dir(path)
        return f"local-dir:{path}", model_cfg
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise BackboneError(
            f"unknown CLIP model '{model}': not a directory, not an hf-hub: id and not an open_clip "
            f"architecture (tiny ones shipped here: {', '.join(TINY_MODELS)})")
    return model, cfg


def check_weights(model: str, pretrained: Optional[str], allow_random: bool = False) -> Optional[str]:
    """The `pretrained` to give open_clip, or an error (an unknown model, or a CLIP that would silently have
    random weights).

    An open_clip architecture name without pretrained weights is randomly initialised: fine for training from
    scratch (stage 0: `allow_random`) and for the tiny architectures (tests, the toy world), a silent substitute
    anywhere a CLIP is used frozen (embeddings, filters, stage I/II, eval). `pretrained='random'` says it is
    meant (timing a real architecture, say)."""
    return _weights_for(resolve_model_name(model)[0], pretrained, allow_random)


def _weights_for(name: str, pretrained: Optional[str], allow_random: bool) -> Optional[str]:
    """check_weights on a name resolve_model_name already resolved."""
    if pretrained == RANDOM:
        return None
    builtin = not name.startswith(("hf-hub:", "local-dir:"))
    if builtin and not pretrained and not allow_random and name not in TINY_MODELS:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(f"CLIP '{name}' without pretrained weights would be randomly initialised: pass an "
                            f"open_clip tag ({', '.join(tags) or 'none known'}), a weights file, an hf-hub: id or "
                            f"a local directory (or pretrained '{RANDOM}' if random weights are meant)")
    return pretrained


def check_device(device: str | torch.device) -> None:
    """BackboneError for a device torch cannot parse or this machine does not have (a CUDA index past its GPUs,
    CUDA or MPS without them), before any weights load."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackboneError(f"device {device!r} is not a torch device ({err}): use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise BackboneError(f"device {device!r}: this machine has {count} CUDA device(s)"
                                + (f" (cuda:0 to cuda:{count - 1})" if count else "; use cpu"))
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackboneError(f"device {device!r}: MPS is not available on this machine; use cpu")


def create_backbone(model: str, pretrained: Optional[str] = None, *, device: str | torch.device = "cpu",
                    precision: str = "fp32", seed: Optional[int] = None, allow_random: bool = False) -> Backbone:
    """Build model + transforms + tokenizer.

    model: an architecture name (open_clip built-in or tiny), 'hf-hub:org/repo', or a local directory.
    pretrained: with an architecture name, an open_clip tag ('openai', 'laion2b_s34b_b79k') or a weights
        file; None means random initialisation, allowed for the tiny architectures and with `allow_random`
        (see check_weights), seeded by `seed` (tiny ones: 0 by default, so every worker builds the same).
    """
    name, model_cfg = resolve_model_name(model)
    pretrained = _weights_for(name, pretrained, allow_random)
    if seed is None and not pretrained and name in TINY_MODELS:
        seed = 0
    if pretrained and not name.startswith(("local-dir:", "hf-hub:")):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags and not os.path.isfile(pretrained):
            raise BackboneError(f"pretrained weights '{pretrained}' for {name}: no such file, and not one of "
                                f"open_clip's tags for it ({', '.join(tags) or 'none'})")
    check_device(device)
    if seed is not None:
        # Random init must not depend on how much randomness was drawn before this call.
        torch.manual_seed(seed)
    try:
        clip, preprocess_train, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision)
    except Exception as err:  # open_clip raises RuntimeError/OSError/HF errors for missing downloads
        where = f"{name} with pretrained='{pretrained}'" if pretrained else name
        if name.startswith("local-dir:"):  # nothing to download: the folder's files are damaged or not a CLIP's
            raise BackboneError(f"could not load CLIP {where}: {err}. Its {CONFIG_FILE} and {WEIGHTS_FILE} are "
                                f"not a loadable open_clip export (damaged, edited or partly copied?)") from err
        raise BackboneError(
            f"could not load CLIP {where}: {err}. Offline, pass a local directory "
            f"({CONFIG_FILE} + {WEIGHTS_FILE}) or a weights file as pretrained") from err
    tokenizer = open_clip.get_tokenizer(name)
    if model_cfg is None:  # hf-hub: take the resolved config open_clip used
        model_cfg = open_clip.get_model_config(name) or {}
    preprocess_cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    return Backbone(model=clip, preprocess_train=preprocess_train, preprocess=preprocess, tokenizer=tokenizer,
                    name=model, model_cfg=dict(model_cfg), preprocess_cfg=preprocess_cfg)


def save_backbone(backbone: Backbone, out_dir: str | os.PathLike, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the backbone in open_clip's local-dir layout, loadable by `create_backbone(out_dir)`."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": backbone.model_cfg, "preprocess_cfg": backbone.preprocess_cfg}
    if extra:
        config.update(extra)
    save_model(backbone.model, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return out


def clip_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights as loaded (float32, by parameter name), whatever its source: a hub
    name, a directory or a seeded random tiny CLIP. Caption jobs store it beside `emb.npy` (`emb_clip`), so a
    trainer takes cached embeddings only from its own frozen CLIP: another CLIP's are another space."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_fingerprint(checkpoint: str) -> str:
    """A short hash of a checkpoint's weights (a directory's *.safetensors or a weights file, streamed: exports
    can be gigabytes), or of its name for a built-in / hub CLIP or an open_clip pretrained tag."""
    path = Path(checkpoint)
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else []
    digest = hashlib.sha256(checkpoint.encode() if not path.exists() else b"")
    for weights in files:
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
