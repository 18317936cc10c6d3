"""Speed figures on a GPU (issue #24, item 4), printed as one JSON object. Random weights: it measures speed.

    python bench/gpu.py --out gpu.json  # one GPU: ViT-B/32, 224 px, bf16, batch 256 (<= 8 minutes with the data)
    python bench/gpu.py --size smoke    # the same model and precision at batch 4 on the CPU: checks the path
    python bench/gpu.py --tiny          # the same code on the CPU at toy sizes (the test suite runs this)
    bash bench/gpu_device.sh fetch|run  # on a lent device machine, whose image lacks Beam etc. (docs/PERFORMANCE.md)

Each part (stage0, stage1, stage2, caption, topk; `--parts` picks) is measured on its own: one that fails is
recorded as {"error": ...}, the others go on, and the exit status is 1. `--out` is rewritten after each part.

1. Stage 0, I and II steps/s (each stage's own collate and loss, AdamW, Accelerate's mixed precision) fed three
   ways: our streaming loader from shards (train.data.TrainStream), the same steps on batches decoded and moved
   to the device beforehand (target: streamed / pre-decoded >= 0.9), and open_clip's webdataset stage list
   feeding the same collate (target: ours / theirs >= 1.0).
2. The caption job with a tiny BLIP captioner and a tiny CLIP embedder on the device: images/s.
3. Exact top-50 for 1,000 queries over 1M x 512 features on the device (eval's chunked top-k): seconds.

The data is made first on the CPU: a toy world at the model's image size, its caption shards and high-quality
triplets from the toy editor (stage II).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SIZES = {
    # model and batch: what the issue asks; the data: enough distinct samples for every feed to stream
    "full": {"clip": "ViT-B-32", "pretrained": "random", "image_size": 224, "batch": 256, "steps": 20,
             "warmup": 3, "images": 3000, "workers": 8, "precision": "bf16", "caption_images": 2000,
             "caption_batch": 64, "gallery": 1_000_000, "queries": 1000, "dim": 512, "k": 50},
    # full's model, precision and code path at sizes a CPU runs in a minute or two (random weights, no download)
    "smoke": {"clip": "ViT-B-32", "pretrained": "random", "image_size": 224, "batch": 4, "steps": 1,
              "warmup": 1, "images": 48, "workers": 2, "precision": "bf16", "caption_images": 16,
              "caption_batch": 4, "gallery": 5000, "queries": 20, "dim": 512, "k": 50},
    "tiny": {"clip": "tiny-clip-32", "pretrained": None, "image_size": 32, "batch": 8, "steps": 2,
             "warmup": 1, "images": 48, "workers": 0, "precision": "no", "caption_images": 16,
             "caption_batch": 4, "gallery": 5000, "queries": 20, "dim": 32, "k": 50},
}
TARGETS = {"streamed_over_predecoded": 0.9, "ours_over_openclip_stage_list": 1.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cmd: list[str]) -> None:
    done = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {done.stderr[-2000:]}")


def make_data(tmp: Path, size: dict) -> dict[str, Path]:
    """Toy images at the model's size -> caption shards -> toy-edited triplets."""
    paths = {"toy": tmp / "toy", "captions": tmp / "captions", "triplets": tmp / "triplets"}
    run(["beam_runner.py", "toy", "--output", str(paths["toy"]), "--num-images", str(size["images"]),
         "--image-size", str(size["image_size"]), "--bench-queries", "2"])
    run(["beam_runner.py", "caption", "--input", str(paths["toy"] / "images"), "--output", str(paths["captions"])])
    run(["beam_runner.py", "synth", "--input", str(paths["captions"]), "--output", str(paths["triplets"]),
         "--quality", "high", "--editor", "toy", "--image-weight", "0"])
    return paths


def make_stage(n: int, size: dict, data: dict[str, Path], tmp: Path):
    """Stage n with the bench's CLIP, reading the caption (0, I) or triplet (II) shards. Stage II starts from a
    stage I export of the same CLIP (its mapping untrained: the cost is the same). The frozen CLIP's outputs are not
    kept (`frozen_cache_mib=0`): the pre-decoded feed repeats 4 batches and would skip the frozen tower, so every
    feed computes the same steps."""
    from train.config import ClipConfig

    clip = ClipConfig(model=size["clip"], pretrained=size["pretrained"])
    if n == 0:
        from train.stage0 import Stage0, Stage0Config

        cfg = Stage0Config(clip=clip, mixed_precision=size["precision"], frozen_cache_mib=0)
        return Stage0(cfg), data["captions"]
    from train.stage1 import Stage1, Stage1Config

    cfg1 = Stage1Config(clip=clip, mixed_precision=size["precision"], frozen_cache_mib=0)
    if n == 1:
        return Stage1(cfg1), data["captions"]
    export = tmp / "stage1_export"
    if not export.exists():
        stage1 = Stage1(cfg1)
        stage1.export(stage1.build(), export)
    from train.stage2 import Stage2, Stage2Config

    cfg2 = Stage2Config(init_from=str(export), mixed_precision=size["precision"], frozen_cache_mib=0)
    return Stage2(cfg2), data["triplets"]


def steps_per_s(stage, model, optimizer, accelerator, batches, size: dict) -> float:
    """Optimizer steps/s of the stage's own loss on `batches` (an iterator of collated CPU or device batches),
    after `warmup` steps that are not timed."""
    from train.loop import _to_device

    device = accelerator.device
    model.train()
    for i in range(size["warmup"] + size["steps"]):
        if i == size["warmup"]:
            sync(device)
            start = time.time()
        batch = _to_device(next(batches), device)
        loss, _ = stage.loss(model, batch, accelerator)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return size["steps"] / (time.time() - start)


def openclip_stage_list(urls: list[str], collate, batch: int, workers: int, pin: bool):
    """open_clip_train's webdataset stage list (shard list -> split_by_worker -> tarfile_to_samples -> shuffle
    -> decode -> batched), feeding the stage's own collate (which keys images by their bytes' digests)."""
    import webdataset as wds

    from train.data import with_digests

    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                                wds.shuffle(500), wds.map(with_digests), wds.decode("pilrgb"),
                                wds.batched(batch, collation_fn=collate, partial=False))
    return iter(torch.utils.data.DataLoader(pipeline.repeat(), batch_size=None, num_workers=workers,
                                            pin_memory=pin))


def stage_figures(n: int, size: dict, data: dict[str, Path], tmp: Path, device: torch.device) -> dict:
    from accelerate import Accelerator

    from cir.dataset import shard_urls
    from train.data import ShardSource, TrainLoader, TrainStream
    from train.loop import _to_device

    stage, dataset = make_stage(n, size, data, tmp)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=stage.cfg.mixed_precision)
    model = stage.build()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)  # as train.loop
    model, optimizer = accelerator.prepare(model, optimizer)
    stage.setup(model, accelerator)
    urls = shard_urls(str(dataset))
    pin = device.type == "cuda"

    def streamed():
        stream = TrainStream([ShardSource(urls)], None, size["batch"], 0, 500, stage.collate,
                             lazy_roles=stage.lazy_roles, undecoded=stage.undecoded_images,
                             required=stage.required_fields)
        return TrainLoader(stream, size["workers"], pin_memory=pin)

    first = streamed()
    predecoded = [_to_device(next(first), device) for _ in range(min(4, size["warmup"] + size["steps"]))]
    feeds = {"streamed": streamed, "predecoded": lambda: itertools.cycle(predecoded),
             "openclip_stage_list": lambda: openclip_stage_list(urls, stage.collate, size["batch"], size["workers"],
                                                                 pin)}
    rates = {name: round(steps_per_s(stage, model, optimizer, accelerator, make(), size), 3)
             for name, make in feeds.items()}
    return {"steps_per_s": rates,
            "streamed_over_predecoded": round(rates["streamed"] / rates["predecoded"], 3),
            "ours_over_openclip_stage_list": round(rates["streamed"] / rates["openclip_stage_list"], 3)}


def caption_images_per_s(size: dict, data: dict[str, Path], tmp: Path, device: torch.device) -> float:
    from tests.tiny_models import make_tiny_blip, make_tiny_clip

    images = tmp / "caption_input"
    images.mkdir()
    for path in sorted((data["toy"] / "images").iterdir())[: 3 * size["caption_images"]]:  # image + sidecars
        (images / path.name).write_bytes(path.read_bytes())
    blip, clip = make_tiny_blip(tmp / "blip"), make_tiny_clip(tmp / "clip")
    start = time.time()
    run(["beam_runner.py", "caption", "--input", str(images), "--output", str(tmp / "captioned"),
         "--captioner", str(blip), "--clip", str(clip), "--device", device.type, "--batch-size",
         str(size["caption_batch"]), "--max-new-tokens", "8"])
    seconds = time.time() - start  # the whole command, start-up included
    written = json.loads((tmp / "captioned" / "stats.json").read_text())["written"]
    return round(written / seconds, 1)


def topk_seconds(size: dict, device: torch.device) -> float:
    from cir.encoder import top_k

    generator = torch.Generator(device="cpu").manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(size["gallery"], size["dim"], generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(size["queries"], size["dim"], generator=generator), dim=-1)
    gallery, queries = gallery.to(device), queries.to(device)
    top_k(queries[:2], gallery[:1000], size["k"], [-1, -1], use_faiss=False)  # warm-up (kernels, allocator)
    sync(device)
    start = time.time()
    scores, rows = top_k(queries, gallery, size["k"], [-1] * size["queries"], chunk=262_144, use_faiss=False)
    sync(device)
    assert rows.shape == (size["queries"], min(size["k"], size["gallery"]))
    return round(time.time() - start, 3)


PARTS = ("stage0", "stage1", "stage2", "caption", "topk")


class Report:
    """The JSON being built: written to `out` (when given) after every part, so that a run stopped at its time
    limit still leaves what it measured. A part that raises is recorded as {"error": ...} and the others go on."""

    def __init__(self, result: dict, out: Path | None):
        self.result, self.out, self.failed = result, out, []

    def part(self, name: str, measure) -> None:
        started = time.time()
        try:
            self.result[name] = measure()
        except Exception as err:  # one broken part must not cost the others' device time
            traceback.print_exc()
            self.result[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            self.failed.append(name)
        self.result.setdefault("part_seconds", {})[name] = round(time.time() - started, 1)
        print(json.dumps({name: self.result[name]}), file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps(self.result, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="full: the figures; smoke: full's model and precision at a tiny batch, to check the path on "
                        "a CPU before spending GPU time; tiny: toy model on the CPU (the test suite)")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="the same as --size tiny")
    p.add_argument("--device", default=None, help="default: cuda when there is one (full size), else cpu")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here, after every part")
    args = p.parse_args(argv)
    parts = [name for name in args.parts.split(",") if name]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    size = SIZES[args.size]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and args.size == "full" else "cpu"))
    started = time.time()
    report = Report({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "sizes": {k: size[k] for k in ("clip", "image_size", "batch", "precision", "steps")},
                     "targets": TARGETS}, args.out)
    if "topk" in parts:  # first: it needs no data, so a failure in making the data cannot cost it
        report.part(f"top{size['k']}_seconds", lambda: topk_seconds(size, device))
        report.result["topk_shape"] = [size["queries"], size["gallery"], size["dim"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if set(parts) - {"topk"}:  # every other part reads the toy data
            data_started = time.time()
            data = make_data(tmp, size)
            report.result["data_seconds"] = round(time.time() - data_started, 1)
            report.save()
        for n in (0, 1, 2):
            if f"stage{n}" in parts:
                report.part(f"stage{n}", lambda n=n: stage_figures(n, size, data, tmp, device))
        if "caption" in parts:
            report.part("caption_job_images_per_s", lambda: caption_images_per_s(size, data, tmp, device))
    report.result["seconds"] = round(time.time() - started, 1)
    report.save()
    print(json.dumps(report.result), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
