"""Training configs: YAML files parsed into dataclasses, with `key=value` overrides from the command line.

Every field has a comment; an unknown key (in the file or an override) is an error that names it, before
anything trains. The resolved config is saved with every checkpoint and export.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses; the message names the key."""


@dataclass
class ClipConfig:
    model: str = "toy-clip-64"  # open_clip name, hf-hub: id, local directory (e.g. a stage export) or tiny name
    pretrained: Optional[str] = None  # open_clip tag or weights file (None: the directory's weights; random
    # init only in stage 0 or for tiny names; "random": random weights on purpose, see cir.backbone.check_weights)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard patterns (brace/glob), dataset dirs or mix manifests
    weights: Optional[list[float]] = None  # one weight per `train` entry (mixing probabilities); None = equal
    batch_size: int = 64  # per process, per micro-batch
    workers: int = 0  # DataLoader workers per process
    shuffle_buffer: int = 500  # samples in the (seeded) shuffle buffer
    use_cached_embeddings: bool = True  # use emb.npy / ref.emb.npy / tgt.emb.npy instead of the image tower
    subset_fraction: float = 1.0  # keep only samples whose key hashes below this fraction (same for every seed)


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.1  # AdamW weight decay (not on norms, biases, embeddings, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0 at max_steps
    grad_clip: float = 1.0  # max gradient norm (0: off)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"  # checkpoints/, logs/, final/
    seed: int = 0  # model init, data order (seed + epoch), everything random
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    accum_features: bool = True  # contrastive stages (0, I, II) with grad_accum > 1: cache features so every
    # micro-batch's negatives are the whole accumulated batch (open_clip's accum_freq); false: plain accumulation
    mixed_precision: str = "no"  # no | fp16 | bf16 (Accelerate)
    log_every: int = 10  # steps between tracker scalars (and train_log.jsonl lines)
    # Accelerate's experiment trackers: tensorboard, wandb, mlflow, comet_ml, aim, ... (each must be installed;
    # "all": every one installed; []: none). They log under {output_dir}/logs/{run_name} or their own service.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""  # the trackers' run (project) name; "" = the stage's name (stage0, stage1, stage2)
    save_every: int = 500  # steps between checkpoints (save_state)
    save_total_limit: int = 2  # checkpoints kept
    resume: Optional[str] = None  # 'latest' or a checkpoint directory: continue that run
    init_from: Optional[str] = None  # the previous stage's export ({output_dir}/final of that stage)
    clip: ClipConfig = field(default_factory=ClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# ------------------------------------------------------------------------------------------ parsing

def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def from_dict(cls, data: dict, where: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, _field_type(cls, name), f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(cls, path: Optional[str], overrides: list[str] = ()):
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML: numbers, lists, null)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not a YAML value ({err.problem}); quote patterns with braces, "
                              f"e.g. data.train=['shards-{{000..009}}.tar']") from None
        _set_path(data, key.strip(), value)
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
