"""Caption job throughput (issue: Beam caption job, "Performance").

1. Images/s of `beam_runner.py caption --captioner sidecar` (DirectRunner, 2 workers, multi_threading)
   against a plain Python loop doing the same read / decode / validate / write on the same images, printed
   as a ratio (target >= 0.7).
2. Images/s of the job with a tiny BLIP captioner + tiny CLIP embeddings at several RunInference batch
   sizes, to show that batching works.

    python bench/caption_throughput.py [--num-images 2000] [--workers 2] [--batch-sizes 1,8,32]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cir.dataset import TAR_MTIME, content_key, num_shards_for, shard_of  # noqa: E402
from pipeline.images import prepare_image  # noqa: E402


def plain_loop(images: Path, out: Path, shard_size: int) -> int:
    """The same work without Beam: read, decode/validate, key, group by shard, write tars."""
    import webdataset as wds

    samples = {}
    for path in sorted(images.iterdir()):
        if path.suffix not in (".jpg", ".png"):
            continue
        data = path.read_bytes()
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        img = prepare_image(data)
        key = content_key(data)
        samples[key] = {"__key__": key, img.ext: img.data, "txt": caption,
                        "json": {"key": key, "source": str(path), "width": img.width, "height": img.height,
                                 "sha256": hashlib.sha256(data).hexdigest(), "caption": caption,
                                 "captioner": "sidecar"}}
    n_shards = num_shards_for(len(samples), shard_size)
    shards: dict[int, list] = {}
    for key, sample in samples.items():
        shards.setdefault(shard_of(key, n_shards), []).append(sample)
    out.mkdir(parents=True)
    for index, group in shards.items():
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=TAR_MTIME) as sink:
            for sample in sorted(group, key=lambda s: s["__key__"]):
                sink.write(sample)
        (out / f"part-{index:05d}.tar").write_bytes(buf.getvalue())
    return len(samples)


def job(images: Path, out: Path, extra: list[str]) -> float:
    """Seconds of one caption job, run in this process: imports are paid once, as for the loop, and the
    pipeline's construction, runner start-up and finalize step are all counted."""
    from pipeline.caption import run

    start = time.time()
    run(["--input", str(images), "--output", str(out), *extra])
    return time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--model-images", type=int, default=256, help="images for the model part")
    p.add_argument("--image-size", type=int, default=64, help="toy image side: more pixels, more work per image")
    p.add_argument("--running-mode", default="multi_threading",
                   help="DirectRunner running mode (in_memory, multi_threading, multi_processing)")
    p.add_argument("--skip-models", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "beam_runner.py"), "toy", "--output", str(tmp / "toy"),
                        "--num-images", str(args.num_images), "--bench-queries", "2",
                        "--image-size", str(args.image_size)], check=True,
                       stderr=subprocess.DEVNULL)
        images = tmp / "toy" / "images"
        # Imports before either clock: webdataset pulls in torch (~1 s), which the loop, run first, used to pay
        # inside its clock and the job then found loaded; at 2,000 toy images that was most of the loop's time.
        for module in ("webdataset", "pipeline.caption"):
            importlib.import_module(module)
        start = time.time()
        n = plain_loop(images, tmp / "loop", args.shard_size)
        loop_rate = n / (time.time() - start)
        beam_flags = ["--runner", "DirectRunner", "--direct_num_workers", str(args.workers),
                      "--direct_running_mode", args.running_mode]
        seconds = job(images, tmp / "job", ["--shard-size", str(args.shard_size), *beam_flags])
        written = json.loads((tmp / "job" / "stats.json").read_text())["written"]
        assert written == n, f"job wrote {written}, loop {n}"
        job_rate = n / seconds
        results = {"images": n, "image_size": args.image_size, "running_mode": args.running_mode,
                   "workers": args.workers, "loop_images_per_s": round(loop_rate, 1), "job_images_per_s": round(job_rate, 1),
                   "ratio_job_over_loop": round(job_rate / loop_rate, 3), "target_ratio": 0.7}
        print(json.dumps(results), flush=True)
        if args.skip_models:
            return 0

        from cir.tiny_models import make_tiny_blip, make_tiny_clip

        blip, clip = make_tiny_blip(tmp / "blip"), make_tiny_clip(tmp / "clip")
        subset = tmp / "subset"
        subset.mkdir()
        for path in sorted(images.iterdir())[: 3 * args.model_images]:
            (subset / path.name).write_bytes(path.read_bytes())
        rates = {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            out = tmp / f"model-bs{bs}"
            secs = job(subset, out, ["--captioner", str(blip), "--clip", str(clip), "--batch-size", str(bs),
                                     "--max-new-tokens", "8", "--shard-size", str(args.shard_size),
                                     "--runner", "DirectRunner"])
            rates[bs] = round(json.loads((out / "stats.json").read_text())["written"] / secs, 1)
        print(json.dumps({"model_images_per_s_by_batch_size": rates,
                          "ratio_largest_over_batch_1": round(rates[max(rates)] / rates[min(rates)], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
