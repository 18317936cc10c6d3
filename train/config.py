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


def ranged(default: Any, *, min: Any = None, gt: Any = None, max: Any = None, choices: tuple = (),
           item_gt: Any = None) -> Any:
    """A field whose value `from_dict` checks before anything runs: `min <= v`, `v > gt`, `v <= max`,
    `v in choices`, and for a list every item `> item_gt` (None values are not checked)."""
    rules = {"min": min, "gt": gt, "max": max, "choices": choices, "item_gt": item_gt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


def _check_range(value: Any, rules: dict, where: str) -> None:
    if value is None or not rules:
        return
    if rules["min"] is not None and value < rules["min"]:
        raise ConfigError(f"{where}: must be at least {rules['min']}, got {value!r}")
    if rules["gt"] is not None and value <= rules["gt"]:
        raise ConfigError(f"{where}: must be greater than {rules['gt']}, got {value!r}")
    if rules["max"] is not None and value > rules["max"]:
        raise ConfigError(f"{where}: must be at most {rules['max']}, got {value!r}")
    if rules["choices"] and value not in rules["choices"]:
        raise ConfigError(f"{where}: one of {', '.join(map(str, rules['choices']))}, got {value!r}")
    if rules["item_gt"] is not None:
        bad = [v for v in value if v <= rules["item_gt"]]
        if bad:
            raise ConfigError(f"{where}: every item must be greater than {rules['item_gt']}, got {value!r}")


@dataclass
class ClipConfig:
    model: str = "toy-clip-64"  # open_clip name, hf-hub: id, local directory (e.g. a stage export) or tiny name
    pretrained: Optional[str] = None  # open_clip tag or weights file (None: the directory's weights; random
    # init only in stage 0 or for tiny names; "random": random weights on purpose, see cir.backbone.check_weights)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard patterns (brace/glob), dataset dirs or mix manifests
    weights: Optional[list[float]] = ranged(None, item_gt=0)  # one weight per `train` entry (mixing
    # probabilities, normalised); None = equal
    batch_size: int = ranged(64, min=1)  # per process, per micro-batch
    workers: int = ranged(0, min=0)  # DataLoader workers per process
    shuffle_buffer: int = ranged(500, min=0)  # samples in the (seeded) shuffle buffer
    use_cached_embeddings: bool = True  # use emb.npy / ref.emb.npy / tgt.emb.npy instead of the image tower
    subset_fraction: float = ranged(1.0, gt=0, max=1)  # keep only samples whose key hashes below this fraction
    # (the same samples for every seed)


@dataclass
class OptimConfig:
    lr: float = ranged(5e-4, gt=0)  # peak learning rate
    weight_decay: float = ranged(0.1, min=0)  # AdamW weight decay (not on norms, biases, embeddings, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    eps: float = ranged(1e-6, gt=0)  # AdamW epsilon
    warmup_steps: int = ranged(50, min=0)  # linear warmup, then cosine decay to 0 at max_steps
    grad_clip: float = ranged(1.0, min=0)  # max gradient norm (0: off)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"  # checkpoints/, logs/, final/
    seed: int = 0  # model init, data order (seed + epoch), everything random
    max_steps: int = ranged(1000, min=1)  # optimizer steps
    grad_accum: int = ranged(1, min=1)  # micro-batches per optimizer step
    accum_features: bool = True  # contrastive stages (0, I, II) with grad_accum > 1: cache features so every
    # micro-batch's negatives are the whole accumulated batch (open_clip's accum_freq); false: plain accumulation
    mixed_precision: str = ranged("no", choices=("no", "fp16", "bf16"))  # Accelerate's mixed precision
    log_every: int = ranged(10, min=1)  # steps between tracker scalars (and train_log.jsonl lines)
    # Accelerate's experiment trackers: tensorboard, wandb, mlflow, comet_ml, aim, ... (each must be installed;
    # "all": every one installed; []: none). They log under {output_dir}/logs/{run_name} or their own service.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""  # the trackers' run (project) name; "" = the stage's name (stage0, stage1, stage2)
    save_every: int = ranged(500, min=1)  # steps between checkpoints (save_state)
    save_total_limit: int = ranged(2, min=1)  # checkpoints kept
    # auto: a finished run (same config) says so and exits 0, a run cut short resumes from its newest complete
    # checkpoint, an empty output_dir starts fresh; latest: resume or fail; never: start fresh; or a checkpoint dir
    resume: Optional[str] = "auto"
    overwrite: bool = False  # start afresh in an output_dir that holds a run with another config (its
    # checkpoints, export and logs are deleted; other files stay)
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
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            _check_range(kwargs[f.name], dict(f.metadata), f"{where}.{f.name}")
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
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
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
    cfg = from_dict(cls, data)
    if isinstance(cfg, TrainConfig) and cfg.init_from and "clip" in data:
        raise ConfigError(f"clip.* and init_from are both set: a stage started from init_from uses that export's CLIP "
                          f"({cfg.init_from}), so the clip settings would do nothing; remove them")
    return cfg


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
