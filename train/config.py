"""Training configs: YAML files parsed into these dataclasses (cir.config), with `key=value` overrides from the
command line.

Every field has a comment; an unknown key (in the file or an override) is an error that names it, before
anything trains. The resolved config is saved with every checkpoint and export.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cir.config import ConfigError, load_with_data, ranged


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
    keep_mib: int = ranged(512, min=0)  # per loader worker, all sources together: raw samples kept in memory
    # after a shard's first read, so a dataset (or subset) that fits is read from disk once (0: read every epoch)


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
    frozen_cache_mib: int = ranged(1024, min=0)  # stages I and II: what the frozen CLIP computed, kept per
    # distinct input up to this many MiB per process, so an image seen again is neither decoded nor encoded
    # again (train.frozen; 0: off). Stage 0, whose tower trains, keeps preprocessed images (without augment and
    # loader workers)
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


# ------------------------------------------------------------------------------------------ loading

def load_config(cls, path: Optional[str], overrides: list[str] = ()):
    """YAML file (optional) + `a.b=value` overrides (cir.config), and the one rule between sections: clip.*
    beside init_from is an error (the stage uses the export's CLIP)."""
    cfg, data = load_with_data(cls, path, overrides)
    if isinstance(cfg, TrainConfig) and cfg.init_from and "clip" in data:
        raise ConfigError(f"clip.* and init_from are both set: a stage started from init_from uses that export's CLIP "
                          f"({cfg.init_from}), so the clip settings would do nothing; remove them")
    return cfg
