"""The shared training loop (stages 0, I, II) on Accelerate.

A stage supplies: `build()` -> trainable module, `collate(samples)` -> batch of tensors, `loss(model, batch)`
-> (loss, scalars), `export(model, dir)`, and `required_fields` for the schema check. The loop owns the
rest: data stream, AdamW with warmup + cosine, gradient accumulation and clipping, mixed precision,
trackers, tqdm, `save_state` checkpoints (automatic naming, total limit) and restarts (`plan_start`: a rerun
resumes a run cut short, says a finished one is finished, refuses another config in the same output_dir).

The hooks a stage may supply beyond these are listed, with their defaults, in `train/stage.py`.

Steps, logging and checkpoints happen under `sync_gradients`. The LR scheduler is stepped by hand once per
optimizer step (Accelerate's prepared scheduler steps once per process); its state and the step go into the
checkpoint's `train_state.json`, written last, so a checkpoint without it (a kill mid-save) is not resumed.
Not `register_for_checkpointing`: Accelerate loads such objects with torch.load(weights_only=False), so a
checkpoint directory from elsewhere could run code on resume. The data loader is not prepared: each rank
reads its own split.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from cir.config import ConfigError, save_config, to_dict
from cir.errors import CIRError
from train.config import TrainConfig, load_config
from train.data import DataError, TrainLoader, TrainStream, check_schema
from train.sources import expand_weighted_sources
from train.stage import Stage


@dataclass
class TrainState:
    """What `save_state` does not know about: the optimizer step (the data position is the loader's)."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases, embeddings and the logit scale (open_clip's exclusion rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


TRAIN_STATE_FILE = "train_state.json"  # in each checkpoint: the step and the LR scheduler's state
LOADER_STATE_FILE = "loader_state_{rank}.json"  # in each checkpoint, one per rank: TrainLoader.state_dict()


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete and intact checkpoint (its train state written, the last file of a save, and every
    file it lists there of the size it had); a damaged one is passed over with a warning."""
    found = sorted((output_dir / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    complete = [p for p in found if (p / TRAIN_STATE_FILE).is_file()]
    for checkpoint in reversed(complete):
        problem = _damage(checkpoint)
        if problem is None:
            return checkpoint
        print(f"warning: {checkpoint} is damaged ({problem}); falling back to the checkpoint before it",
              file=sys.stderr)
    return None


def _damage(checkpoint: Path) -> Optional[str]:
    """What is wrong with a checkpoint, by the file list its train state keeps."""
    path = checkpoint / TRAIN_STATE_FILE
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except ValueError:
        return f"{TRAIN_STATE_FILE} is not valid JSON"
    for name, size in files.items():
        f = checkpoint / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when saved"
    return None


def _remove_incomplete_after(checkpoint: Path, accelerator) -> None:
    """Checkpoint folders newer than the one resumed from were cut short by a kill mid-save, or damaged; the next
    save would reuse their names (Accelerate refuses an existing folder), so they go."""
    number = int(checkpoint.name.split("_")[-1])
    if accelerator.is_main_process:
        for path in checkpoint.parent.glob("checkpoint_*"):
            if int(path.name.split("_")[-1]) > number:
                accelerator.print(f"removing {path}: an incomplete or damaged checkpoint")
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def save_train_state(checkpoint: Path, scheduler, state: TrainState) -> None:
    """The step and the scheduler, with the size of every file of the checkpoint (a resume
    checks them: a truncated weights or RNG file is found, not loaded or silently skipped)."""
    files = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*"))
             if f.is_file() and not f.name.startswith(TRAIN_STATE_FILE)}
    tmp = checkpoint / f"{TRAIN_STATE_FILE}.tmp"
    tmp.write_text(json.dumps({**state.state_dict(), "scheduler": scheduler.state_dict(), "files": files}),
                   encoding="utf-8")
    tmp.replace(checkpoint / TRAIN_STATE_FILE)


def load_train_state(checkpoint: Path, scheduler, state: TrainState) -> None:
    path = checkpoint / TRAIN_STATE_FILE
    if not path.is_file():
        raise DataError(f"{checkpoint} is not a complete checkpoint: no {TRAIN_STATE_FILE}")
    saved = json.loads(path.read_text(encoding="utf-8"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    state.load_state_dict(saved)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped
        return math.inf


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the checkpoint resumed from: they are trained again (and logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _logged_step(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def parse_args(cls, argv: Optional[list[str]]):
    """`--config FILE [key=value ...]` -> config dataclass (ConfigError for a bad file, key or value)."""
    import argparse

    # every key a config file or an override may set, with its default (comments: train/config.py and the
    # stage's own module), so --help answers "what can I set?"
    def keys(d: dict, prefix: str = "") -> list[str]:  # "key = default" lines, nested sections dotted
        return [line for k, v in d.items() for line in (
            keys(v, f"{prefix}{k}.") if isinstance(v, dict) else
            [f"  {prefix}{k} = {v if isinstance(v, str) and v else json.dumps(v)}"])]

    epilog = "config keys (key=value) and their defaults, before --config's file is applied:\n" + "\n".join(
        keys(json.loads(json.dumps(asdict(cls())))))
    parser = argparse.ArgumentParser(description="Train a stage (see train/configs/*.yaml).", epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 data.batch_size=32")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)  # ConfigError: main says so and returns 2


# Settings that do not define a run: changing them between a run and its restart is not "another config".
RUN_CONTROL = ("resume", "overwrite", "max_steps", "log_every", "save_every", "save_total_limit", "log_with",
               "run_name", "data.workers", "data.keep_mib", "frozen_cache_mib", "hard_negatives.cache_dir")
RUN_FILES = ("checkpoints", "final", "logs", "data_log", "train_log.jsonl", "config.json")  # what a run writes


def _defining(config: dict) -> dict:
    """The config without RUN_CONTROL settings, flattened."""
    return {k: v for k, v in _flat(config).items() if k not in RUN_CONTROL}


def plan_start(cfg: TrainConfig, out: Path) -> tuple[str, Optional[Path]]:
    """What this command does in `out`: ("fresh", None), ("resume", checkpoint), ("finished", export) or
    ("overwrite", None): start fresh after deleting the old run's files. ConfigError when `out` holds a run of
    another config (or resume=never meets a run) and overwrite is off."""
    saved = out / "config.json"
    old = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    if old is not None:
        before, now = _defining(old), _defining(to_dict(cfg))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed or cfg.resume == "never":
            if cfg.overwrite:
                return "overwrite", None
            why = (f"another config ({', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed[:4])})"
                   if changed else "a run, and resume=never")
            raise ConfigError(f"{out} holds {why}; use another output_dir, or overwrite=true to replace that run")
    if cfg.resume in ("auto", "latest"):
        final = out / "final" / "train_config.json"
        if cfg.resume == "auto" and final.is_file() and json.loads(final.read_text())["max_steps"] == cfg.max_steps:
            return "finished", out / "final"
        checkpoint = latest_checkpoint(out)
        if checkpoint is None and cfg.resume == "latest":
            raise DataError(f"resume=latest: no checkpoint under {out / 'checkpoints'}")
        return ("resume", checkpoint) if checkpoint else ("fresh", None)
    if cfg.resume in ("never", None):
        return "fresh", None
    return "resume", Path(cfg.resume)


def check_trackers(names: list[str]) -> list[str]:
    """`log_with` as Accelerate takes it; a tracker Accelerate does not know, or whose package is not installed,
    is a ConfigError (Accelerate itself would drop an uninstalled one without a word)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known, available = set(LoggerType.list()), {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"log_with: unknown tracker {name!r}; Accelerate has {sorted(known)}")
        if name != "all" and name not in available:
            raise ConfigError(f"log_with: {name} is not installed here (pip install {name}), or leave it out")
    return list(names)


def train(stage: Stage, cfg: TrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    weighted = expand_weighted_sources(cfg.data.train)
    sources = [source for source, _ in weighted]
    weights = cfg.data.weights or [w for _, w in weighted]  # data.weights overrides the manifests' weights
    for source in sources:
        check_schema(source, stage.required_fields)
    cached = cfg.grad_accum > 1 and cfg.accum_features and stage.caches_features
    accelerator = Accelerator(
        # Without a GPU, ask for CPU explicitly: only then do several launched processes form gloo ranks
        # (MULTI_CPU) instead of each training alone. The feature-cached step accumulates by itself.
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=1 if cached else cfg.grad_accum, log_with=check_trackers(cfg.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"),
                                            automatic_checkpoint_naming=True, total_limit=cfg.save_total_limit))
    start, path = plan_start(cfg, out)
    accelerator.wait_for_everyone()  # every rank has decided before rank 0 deletes anything
    if start == "finished":
        accelerator.print(f"{out} holds this run, finished: its export is {path} (max_steps={cfg.max_steps}); "
                          f"nothing to do")
        return path
    if start == "overwrite" and accelerator.is_main_process:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if start == "fresh" and accelerator.is_main_process:  # folders of a first save cut short: Accelerate
        for stale in (out / "checkpoints").glob("checkpoint_*"):  # would refuse to save over them
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    model = stage.build()
    # fused: torch's one-kernel AdamW where it has one (CPU, CUDA). The default on CPU loops over the tensors
    # in Python: 50-68 ms of a 160 ms toy CLIP step on 2 cores (7.6M parameters in 86 tensors), fused 10-12.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=accelerator.device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.optim.warmup_steps, cfg.max_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    stage.setup(model, accelerator)  # once the model is on its device (stage II's negative bank)
    state = TrainState()
    if start == "resume":
        if cfg.resume in ("auto", "latest"):
            _remove_incomplete_after(path, accelerator)
        accelerator.load_state(str(path))
        load_train_state(path, scheduler, state)
        accelerator.project_configuration.iteration = int(path.name.split("_")[-1]) + 1
        accelerator.print(f"resumed from {path} at step {state.step}")
        if accelerator.is_main_process:
            _truncate_log(out / "train_log.jsonl", state.step)
    stream = TrainStream(sources, weights, cfg.data.batch_size, cfg.seed, cfg.data.shuffle_buffer,
                         stage.collate, log_dir=str(out / "data_log"), subset_fraction=cfg.data.subset_fraction,
                         keep_mib=cfg.data.keep_mib,
                         lazy_roles=stage.lazy_roles, undecoded=stage.undecoded_images,
                         required=stage.required_fields)
    batches = TrainLoader(stream, cfg.data.workers, pin_memory=accelerator.device.type == "cuda")
    loader_state = LOADER_STATE_FILE.format(rank=accelerator.process_index)
    if start == "resume":
        batches.load_state_dict(_loader_state(path / loader_state, state.step * cfg.grad_accum))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
    # a resumed run logs again the steps after its checkpoint: TensorBoard hides the old events from there on
    accelerator.init_trackers(cfg.run_name or stage.name, config=_flat(to_dict(cfg)),
                              init_kwargs={"tensorboard": {"purge_step": state.step + 1}} if state.step else None)
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=stage.name, disable=not accelerator.is_main_process)
    model.train()
    while state.step < cfg.max_steps:
        stage.step = state.step  # for schedules inside a loss (stage II's lambda_fine), restored by resume
        if cached:
            micro = [_to_device(next(batches), accelerator.device) for _ in range(cfg.grad_accum)]
            loss, scalars = feature_cached_step(stage, model, micro, accelerator)
            _clip_and_step(model, optimizer, accelerator, cfg.optim.grad_clip)
        else:
            batch = _to_device(next(batches), accelerator.device)
            with accelerator.accumulate(model):
                loss, scalars = stage.loss(model, batch, accelerator)
                accelerator.backward(loss)
                _clip_and_step(model, optimizer, accelerator, cfg.optim.grad_clip)
            if not accelerator.sync_gradients:
                continue
        stage.after_step(accelerator.unwrap_model(model))  # constraints on the weights (stage 0)
        scheduler.step()
        state.step += 1
        progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            logs = {"loss": accelerator.reduce(loss.detach(), "mean").item(), "lr": scheduler.get_last_lr()[0],
                    "data_errors": _total(batches, accelerator), **{k: float(v) for k, v in scalars.items()}}
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if accelerator.is_main_process:
                with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.step, **logs}) + "\n")
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps:
            saved = Path(accelerator.save_state())
            (saved / loader_state).write_text(json.dumps(batches.state_dict()), encoding="utf-8")  # every rank
            accelerator.wait_for_everyone()  # every rank's files are written before their sizes are recorded
            if accelerator.is_main_process:
                save_config(cfg, saved / "config.json")
                save_train_state(saved, scheduler, state)  # last: it marks the checkpoint complete
    progress.close()
    total = _total(batches, accelerator)
    if total:
        accelerator.print(f"warning: skipped {total} corrupt tar member(s) or sample(s) (see data_errors in the logs)")
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        final.mkdir(parents=True, exist_ok=True)
        stage.export(accelerator.unwrap_model(model), final)
        save_config(cfg, final / "train_config.json")
    accelerator.end_training()
    return final


def feature_cached_step(stage: Stage, model, micro: list[dict], accelerator) -> tuple[torch.Tensor, dict]:
    """open_clip's accum_freq: the gradient of the contrastive loss over all micro-batches at once.

    Pass 1 computes every micro-batch's features without gradients. Pass 2 recomputes micro-batch j with
    gradients and takes the loss over the cached features with j's replaced by the fresh ones: its backward
    gives exactly j's share of the full-batch gradient, so the sum over j (no division by grad_accum) is the
    gradient of one batch of grad_accum x batch_size, at the memory of one micro-batch plus cached features.
    DDP syncs once, on the last backward.

    Row-wise stages (`shared_keys`, see train/stage.py) cache only the shared features in pass 1 (no
    queries: stage II's text tower runs once per micro-batch, not twice), and micro-batch j's loss covers its
    own rows, weighted by its share of the accumulated batch so that the sum is the mean over all rows.
    """
    import contextlib

    row_wise = bool(stage.shared_keys)
    keys = stage.shared_keys if row_wise else stage.cached_keys
    with torch.no_grad():
        cache = [(stage.shared_features if row_wise else stage.features)(model, b, accelerator) for b in micro]
    sizes = [len(c[keys[0]]) for c in cache]
    total = torch.zeros((), device=accelerator.device)
    # Randomness inside the loss (stage II's MUR augmenter) must draw the same numbers in every pass-2 call,
    # as one big batch draws them once: each call starts from the same RNG state.
    rng = _rng_state(accelerator.device)
    for j, batch in enumerate(micro):
        sync = j == len(micro) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            fresh = stage.features(model, batch, accelerator)
            features = dict(fresh)
            for key in keys:
                features[key] = torch.cat([c[key] for c in cache[:j]] + [fresh[key]] + [c[key] for c in cache[j + 1:]])
            if row_wise:
                features["rows"] = (sum(sizes[:j]), sum(sizes[:j + 1]))
            _set_rng_state(rng, accelerator.device)
            loss, scalars = stage.loss_on_features(features, accelerator)
            if row_wise:
                loss = loss * (sizes[j] / sum(sizes))
            accelerator.backward(loss)
        total += loss.detach()
    return (total if row_wise else total / len(micro)), scalars


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _clip_and_step(model, optimizer, accelerator, grad_clip: float) -> None:
    if accelerator.sync_gradients and grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad()


def _loader_state(path: Path, batches: int) -> dict:
    """This rank's loader position in a checkpoint; a checkpoint without one (saved by fewer ranks) resumes
    after its `batches` with no samples known to be skipped."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"batches": batches, "workers": []}


def _total(batches: TrainLoader, accelerator) -> int:
    """Corrupt members/samples skipped so far, summed over ranks (a collective: every rank calls)."""
    return int(accelerator.reduce(torch.tensor(batches.errors, device=accelerator.device), "sum").item())


def _to_device(batch: dict, device) -> dict:
    # non_blocking: from pinned memory (loader) the copy overlaps; kernels on the stream still wait for it
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _flat(d: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars only."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def main(stage_factory: Callable[[TrainConfig], Stage], config_cls, argv: Optional[list[str]] = None) -> int:
    """Train a stage from the command line; 2 (with the error on stderr) when the config or data is wrong, so
    callers in this process (eval ablate, eval claims) get a status, not a SystemExit."""
    try:
        cfg = parse_args(config_cls, argv)
        stage = stage_factory(cfg)
        final = train(stage, cfg)
    except CIRError as err:  # config, data, init_from, the backbone: what the user can fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"export: {final}")
    return 0
