"""Training data path and stage I cost (issue: trainer core, "Performance"), printed as ratios.

1. Stage 0 steps/s fed by the streaming loader vs the same steps fed from batches already decoded in
   memory (target >= 0.9: the loader keeps up).
2. Loader samples/s vs a plain webdataset pipeline with open_clip's stage list (shard list ->
   split_by_worker -> tarfile_to_samples -> shuffle -> decode -> preprocess + tokenize -> batched) on the same
   shards with the same workers (target >= 1).
3. Stage I's loader with cached `emb.npy`: samples/s with the images it does not need left encoded vs
   decoded anyway (>= 1: the lazy decode pays).
4. Stage I step time recomputing the image tower vs cached `emb.npy` (target >= 3x at toy sizes), and
   the same with a ViT-B/32 at 224 px for comparison.
5. Stages I and II as their trainers run them (`train.loop.train`, the toy configs, the demo's data) with what
   their frozen CLIP computed kept (`frozen_cache_mib`, train/frozen.py) vs off: seconds per run, alternating.

    python bench/train_throughput.py --captions runs/demo/captions [--clip-captions DIR_WITH_EMB] [--workers 0]
    python bench/train_throughput.py --only frozen      # item 5 alone (needs the demo's stage 0/I exports)
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage0_steps(stage, model, batches, steps: int) -> float:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.loop makes it
    it = iter(batches)
    next(it)  # warm-up: first batch and allocator
    start = time.time()
    for _ in range(steps):
        loss, _ = stage.loss(model, next(it), accelerator)  # the stage's own forward and loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.time() - start)


def loader_rate(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)
    start = time.time()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.time() - start)


def openclip_style(urls, backbone, batch_size: int, workers: int):
    """open_clip_train's webdataset stage list (its data.py itself fails with webdataset 1.0.x)."""
    import webdataset as wds

    def preprocess(sample):
        return backbone.preprocess(sample[0]), backbone.tokenizer([sample[1]])[0]

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(), wds.shuffle(500),
        wds.decode("pilrgb"), wds.to_tuple("jpg;png;webp", "txt"), wds.map(preprocess),
        wds.batched(batch_size, partial=False))
    loader = torch.utils.data.DataLoader(pipeline.repeat(), batch_size=None, num_workers=workers)
    return loader


def stage1_step_times(clip: str, texts: list[str], steps: int) -> tuple[float, float]:
    """Seconds per stage I step (train.stage1's own loss and frozen CLIP `clip`, randomly initialised; one
    pseudo token without patch tokens, the mapping that cached embeddings can feed) from images through the
    image tower, and from their embeddings as `emb.npy` holds them. One batch of len(texts)."""
    from accelerate import Accelerator

    from cir.mapping import MappingConfig, image_features
    from train.config import ClipConfig
    from train.stage1 import Stage1, Stage1Config

    stage = Stage1(Stage1Config(clip=ClipConfig(model=clip, pretrained="random"),  # the cost, not the weights
                                mapping=MappingConfig(num_tokens=1, use_patches=False)))
    model = stage.build()
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    size = model.clip.visual.image_size
    images = torch.randn(len(texts), 3, *(size if isinstance(size, tuple) else (size, size)))
    with torch.no_grad():
        emb = image_features(model.clip, images, False)[0]
    captions = stage.backbone.tokenizer(texts)
    # no ids in the batches: the frozen cache is not asked (train.frozen), the tower runs every step
    inputs = {False: {"image_pixels": images, "image_rows": None, "captions": captions},
              True: {"emb": emb, "captions": captions}}
    times = {}
    for use_cache, b in inputs.items():
        for i in range(steps + 1):  # the first step warms up
            if i == 1:
                start = time.time()
            loss, _ = stage.loss(model, b, accelerator)
            loss.backward()
            opt.step()
            opt.zero_grad()
        times[use_cache] = (time.time() - start) / steps
    return times[False], times[True]


def cached_loader_rates(urls: list[str], batch_size: int, n_batches: int, workers: int, tmp: Path
                        ) -> tuple[float, float]:
    """Stage I's loader (samples/s) on a copy of the shards that carries `emb.npy` made by the stage's own CLIP
    (random unit vectors: the loader does not look at the values): the images whose embeddings the stage takes
    left encoded (train.data's lazy roles) vs decoded anyway, as before."""
    import numpy as np
    import webdataset as wds

    from cir.dataset import iter_shard
    from cir.schema import npy_bytes, parse_json
    from cir.mapping import MappingConfig
    from train.config import ClipConfig
    from train.data import ShardSource, TrainLoader, TrainStream
    from train.stage1 import Stage1, Stage1Config

    stage = Stage1(Stage1Config(clip=ClipConfig(model="toy-clip-64"), mapping=MappingConfig(num_tokens=1, use_patches=False)))
    stage.build()
    rng = np.random.default_rng(0)
    dim = stage.backbone.embed_dim
    copies = []
    for i, url in enumerate(urls):
        copies.append(str(tmp / f"emb-{i:05d}.tar"))
        with wds.TarWriter(copies[-1]) as sink:
            for raw in iter_shard(url):
                v = rng.standard_normal(dim).astype(np.float32)
                meta = {**parse_json(raw), "emb_clip": stage.clip_id}
                sink.write({**raw, "json": json.dumps(meta).encode(), "emb.npy": npy_bytes(v / np.linalg.norm(v))})
    lazy = TrainStream([ShardSource(copies)], None, batch_size, 3, 500, stage.collate,
                       lazy_roles=stage.lazy_roles, undecoded=stage.undecoded_images)
    eager = TrainStream([ShardSource(copies)], None, batch_size, 3, 500, stage.collate)
    return (loader_rate(TrainLoader(lazy, workers), n_batches, batch_size),
            loader_rate(TrainLoader(eager, workers), n_batches, batch_size))


def trainer_seconds(stage: str, overrides: list[str], mib: int, tmp: Path) -> float:
    """Seconds of one run of a stage's trainer (setup, steps, checkpoint and export) with frozen_cache_mib=mib."""
    import importlib

    from train.config import load_config
    from train.loop import train

    module = importlib.import_module(f"train.{stage}")  # train.stage1: Stage1, Stage1Config; the same for II
    stage_cls, cfg_cls = getattr(module, stage.capitalize()), getattr(module, f"{stage.capitalize()}Config")
    out = tmp / f"{stage}-{mib}-{time.time_ns()}"
    cfg = load_config(cfg_cls, str(ROOT / "train" / "configs" / f"toy_{stage}.yaml"),
                      [*overrides, f"output_dir={out}", f"frozen_cache_mib={mib}", "log_with=[]"])
    start = time.time()
    train(stage_cls(cfg), cfg)
    return time.time() - start


def frozen_cache_figures(args) -> None:
    runs = {"stage1": [f"data.train=['{args.captions}']", f"init_from={args.stage0}"],
            "stage2": [f"data.train=['{args.triplets}']", f"init_from={args.stage1}"]}
    for stage, overrides in runs.items():
        overrides.append(f"max_steps={args.frozen_steps}")
        times: dict[int, list[float]] = {1024: [], 0: []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for mib in times:
                    times[mib].append(trainer_seconds(stage, overrides, mib, Path(tmp)))
        kept, off = statistics.median(times[1024]), statistics.median(times[0])
        print(json.dumps({"stage": stage, "steps": args.frozen_steps, "seconds_frozen_kept": round(kept, 2),
                          "seconds_frozen_off": round(off, 2), "speedup": round(off / kept, 3), "target": 1.0,
                          "runs": {str(k): [round(t, 2) for t in v] for k, v in times.items()}}), flush=True)


def main(argv=None) -> int:
    from cir.dataset import iter_shard, shard_urls
    from train.data import ShardSource, TrainLoader, TrainStream
    from train.stage0 import Stage0, Stage0Config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", default="runs/demo/captions")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="stage 0: alternating streamed / in-memory runs")
    p.add_argument("--only", choices=("all", "frozen"), default="all")
    p.add_argument("--stage0", default="runs/demo/stage0/final", help="item 5: stage I starts from this export")
    p.add_argument("--stage1", default="runs/demo/stage1/final", help="item 5: stage II starts from this export")
    p.add_argument("--triplets", default="runs/demo/triplets_high", help="item 5: stage II's triplets")
    p.add_argument("--frozen-steps", type=int, default=150, help="item 5: steps per run")
    args = p.parse_args(argv)
    if args.only == "frozen":
        frozen_cache_figures(args)
        return 0
    cfg = Stage0Config()
    cfg.data.train = [args.captions]
    stage = Stage0(cfg)
    model = stage.build()
    urls = shard_urls(args.captions)
    stream = TrainLoader(TrainStream([ShardSource(urls)], None, args.batch_size, 0, 500, stage.collate), args.workers)
    in_memory = []
    it = iter(stream)
    for _ in range(args.steps + 1):
        in_memory.append(next(it))
    # A fresh model's first steps are slow (allocator, kernel selection, optimizer state): warm it up before
    # either clock starts, then alternate the two feeds (the machine's load drifts) and take medians.
    stage0_steps(stage, model, in_memory, args.steps)
    streamed, memory = [], []
    for _ in range(args.repeats):
        streamed.append(stage0_steps(stage, model, TrainLoader(TrainStream(
            [ShardSource(urls)], None, args.batch_size, 1, 500, stage.collate), args.workers), args.steps))
        memory.append(stage0_steps(stage, model, in_memory, args.steps))
    streamed_s, memory_s = statistics.median(streamed), statistics.median(memory)
    print(json.dumps({"stage0_steps_per_s_streamed": round(streamed_s, 3), "stage0_steps_per_s_in_memory":
                      round(memory_s, 3), "ratio": round(streamed_s / memory_s, 3), "target": 0.9,
                      "ratios_per_repeat": [round(a / b, 3) for a, b in zip(streamed, memory)],
                      "workers": args.workers}), flush=True)

    ours = loader_rate(TrainLoader(TrainStream([ShardSource(urls)], None, args.batch_size, 2, 500, stage.collate),
                                   args.workers),
                       args.steps, args.batch_size)
    theirs = loader_rate(openclip_style(urls, stage.backbone, args.batch_size, args.workers), args.steps,
                         args.batch_size)
    print(json.dumps({"loader_samples_per_s": round(ours, 1), "openclip_stage_list_samples_per_s": round(theirs, 1),
                      "ratio": round(ours / theirs, 3), "target": 1.0}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        lazy, eager = cached_loader_rates(urls, args.batch_size, args.steps, args.workers, Path(tmp))
    print(json.dumps({"stage1_cached_loader_samples_per_s_images_encoded": round(lazy, 1),
                      "stage1_cached_loader_samples_per_s_images_decoded": round(eager, 1),
                      "ratio": round(lazy / eager, 3), "target": 1.0}), flush=True)

    texts = [s["txt"].decode() for s in itertools.islice((s for u in urls for s in iter_shard(u)), args.batch_size)]
    # the target is for the toy CLIP; a ViT-B/32 at 224 px (random weights: the cost is the same) shows how the
    # image tower's share grows with real models
    for clip, n, steps in (("toy-clip-64", args.batch_size, args.steps), ("ViT-B-32", 16, max(2, args.steps // 4))):
        tower, cached = stage1_step_times(clip, texts[:n], steps)
        print(json.dumps({"clip": clip, "batch": n, "stage1_step_s_tower": round(tower, 4),
                          "stage1_step_s_cached": round(cached, 4), "speedup": round(tower / cached, 2),
                          "target": 3.0}), flush=True)
    frozen_cache_figures(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
