"""Caption job throughput, as a user meets it (issue #24, item 3).

1. The whole `beam_runner.py caption --captioner sidecar` command (default local mode: DirectRunner in_memory),
   start-up included, against a plain single-process loop doing the same work (read, decode and validate,
   sha256, sidecar caption, tar shards, parquet index), each a fresh process, with wall time and peak memory
   (RSS); one line per image set, ratio = loop seconds / job seconds (targets: >= 0.7 at 256-512 px, >= 0.67
   at 64-96 px). The job runs with --no-near-duplicates, as the loop screens nothing; the default job (the
   near-duplicate screen on) is timed beside it (`screened_seconds`, and how many it dropped).
2. Images/s of the job with a tiny BLIP captioner + tiny CLIP embeddings at several RunInference batch
   sizes, to show that batching works.

    python bench/caption_throughput.py [--sets 3000x256-512,12000x64-96] [--batch-sizes 1,8,32]
    python bench/caption_throughput.py --loop IMAGES OUT     # the plain loop alone (what part 1 runs)
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"256-512": 0.7, "64-96": 0.67}  # ratio targets by image sides, from the issue


def plain_loop(images: Path, out: Path, shard_size: int) -> int:
    """The same work without Beam, as a user would write it: read, decode/validate (pipeline.images, which
    needs only PIL and numpy), sha256, sidecar caption, de-duplicate, group by shard, write tars with the
    standard library (the members webdataset's TarWriter writes: key.ext, fixed mtime) and a parquet index.
    No torch and no Beam are imported: that start-up is the job's to pay."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.images import prepare_image

    key_hex, mtime = 32, 946684800  # cir.dataset.KEY_HEX, TAR_MTIME (importing cir.dataset would load Beam)
    samples = {}
    for path in sorted(images.iterdir()):
        if path.suffix not in (".jpg", ".png"):
            continue
        data = path.read_bytes()
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        img = prepare_image(data)
        sha256 = hashlib.sha256(data).hexdigest()
        key = sha256[:key_hex]
        meta = {"key": key, "source": str(path), "width": img.width, "height": img.height, "sha256": sha256,
                "caption": caption, "captioner": "sidecar"}
        samples[key] = (img.ext, img.data, caption, meta)
    n_shards = max(1, -(-len(samples) // shard_size))
    shards: dict[int, list] = {}
    for key in samples:
        shards.setdefault(int(key[:15], 16) % n_shards, []).append(key)
    (out / "shards").mkdir(parents=True)
    rows = []
    for index, keys in sorted(shards.items()):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key in sorted(keys):
                ext, data, caption, meta = samples[key]
                members = {ext: data, "json": json.dumps(meta).encode(), "txt": caption.encode()}
                for name in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size, info.mtime, info.mode = len(members[name]), mtime, 0o444
                    tar.addfile(info, io.BytesIO(members[name]))
                rows.append({**meta, "shard": f"part-{index:05d}"})
        (out / "shards" / f"part-{index:05d}.tar").write_bytes(buf.getvalue())
    pq.write_table(pa.Table.from_pylist(rows), out / "index.parquet")
    return len(samples)


def make_images(out: Path, n: int, lo: int, hi: int, noise: float, seed: int = 0) -> Path:
    """n toy images (with their captions) whose sides are drawn from [lo, hi], as JPEG/PNG as rendered. Toy
    scenes are flat colour: a 384-px JPEG of one is ~5 KB where a photo is ~30-60 KB, and decoding is most
    of the work per image; `noise` (std of seeded Gaussian noise, 0-255 scale) gives photo-like sizes."""
    import numpy as np
    from PIL import Image

    subprocess.run([sys.executable, str(ROOT / "beam_runner.py"), "toy", "--output", str(out), "--num-images", str(n),
                    "--bench-queries", "2", "--image-size", str(hi)], check=True, stderr=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    images = out / "images"
    rng = random.Random(seed)
    pixels_rng = np.random.default_rng(seed)
    for path in sorted(images.iterdir()):
        if path.suffix in (".jpg", ".png"):
            side = rng.randint(lo, hi)
            with Image.open(path) as img:
                img = img.convert("RGB").resize((side, side), Image.BILINEAR)
            if noise > 0:
                grain = pixels_rng.normal(0, noise, (side, side, 3))
                img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
            img.save(path, quality=90)
    return images


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of a command in a fresh process (measured by a wrapper process, whose
    only child it is)."""
    wrapper = ("import json, resource, subprocess, sys, time\n"
               "start = time.time()\n"
               "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
               "print(json.dumps({'seconds': time.time() - start,\n"
               "                  'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout)


def job_against_loop(tmp: Path, n: int, lo: int, hi: int, shard_size: int, noise: float, repeats: int = 3
                     ) -> tuple[dict, Path]:
    """The loop and the job on one image set, `repeats` times each, alternating: medians, their ratio, each run."""
    images = make_images(tmp / f"toy-{n}-{lo}-{hi}", n, lo, hi, noise)
    files = [f for f in images.iterdir() if f.suffix in (".jpg", ".png")]
    mean_kib = sum(f.stat().st_size for f in files) / len(files) / 1024
    loops, jobs, screened = [], [], []
    caption = [sys.executable, str(ROOT / "beam_runner.py"), "caption", "--input", str(images),
               "--shard-size", str(shard_size)]
    for run in range(repeats):  # alternating, each into a fresh folder: this shared machine's speed drifts
        loop_out, job_out = tmp / f"loop-{n}-{lo}-{run}", tmp / f"job-{n}-{lo}-{run}"
        loops.append(timed([sys.executable, str(Path(__file__).resolve()), "--loop", str(images), str(loop_out),
                            "--shard-size", str(shard_size)]))
        # the same work as the loop: no near-duplicate screen (the loop has none); the default job apart
        jobs.append(timed([*caption, "--output", str(job_out), "--no-near-duplicates"]))
        screened.append(timed([*caption, "--output", str(tmp / f"screened-{n}-{lo}-{run}")]))
        written = json.loads((job_out / "stats.json").read_text())["written"]
        looped = len(pq_rows(loop_out / "index.parquet"))
        assert written == looped, f"job wrote {written}, loop {looped}"
    loop_s, job_s, screened_s = (statistics.median(r["seconds"] for r in runs) for runs in (loops, jobs, screened))
    sizes = f"{lo}-{hi}"
    return {"images": written, "sizes": sizes, "noise": noise, "mean_kib": round(mean_kib, 1),
            "loop_seconds": round(loop_s, 2), "job_seconds": round(job_s, 2),
            "loop_runs": [round(r["seconds"], 2) for r in loops], "job_runs": [round(r["seconds"], 2) for r in jobs],
            "loop_peak_mib": round(max(r["peak_mib"] for r in loops)),
            "job_peak_mib": round(max(r["peak_mib"] for r in jobs)), "ratio_job_over_loop": round(loop_s / job_s, 3),
            "target_ratio": TARGETS.get(sizes, 0.7),
            # the default job (near-duplicate screen on): its seconds, and what it dropped
            "screened_seconds": round(screened_s, 2), "screened_runs": [round(r["seconds"], 2) for r in screened],
            "screened_dropped": json.loads((tmp / f"screened-{n}-{lo}-0" / "stats.json").read_text())[
                "failed_by_reason"].get("near_duplicate", 0)}, images


def pq_rows(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["key"]).to_pylist()


def job(images: Path, out: Path, extra: list[str]) -> float:
    """Seconds of one caption job, run in this process: imports are paid once, as for the loop, and the
    pipeline's construction, runner start-up and finalize step are all counted."""
    from pipeline.caption import run

    start = time.time()
    run(["--input", str(images), "--output", str(out), *extra])
    return time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="3000x256-512,12000x64-96", help="image sets: COUNTxMIN-MAX sides, comma-separated")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="loop and job runs per set, alternating (medians)")
    p.add_argument("--noise", type=float, default=12.0, help="photo-like grain on the toy scenes (0: flat colour)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--model-images", type=int, default=256, help="images for the model part")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--loop", nargs=2, metavar=("IMAGES", "OUT"), help="only run the plain loop")
    args = p.parse_args(argv)
    if args.loop:
        plain_loop(Path(args.loop[0]), Path(args.loop[1]), args.shard_size)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for spec in args.sets.split(","):
            count, _, sides = spec.partition("x")
            lo, _, hi = sides.partition("-")
            row, images = job_against_loop(tmp, int(count), int(lo), int(hi or lo), args.shard_size, args.noise,
                                           args.repeats)
            print(json.dumps(row), flush=True)
        if args.skip_models:
            return 0

        from tests.tiny_models import make_tiny_blip, make_tiny_clip

        blip, clip = make_tiny_blip(tmp / "blip"), make_tiny_clip(tmp / "clip")
        subset = tmp / "subset"
        subset.mkdir()
        for path in sorted(images.iterdir())[: 3 * args.model_images]:  # the last set's images
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
