"""The whole flow at the real models' size, on the CPU, with random weights (issue #42): does every command a user
runs meet a ViT-L/14, a BLIP-base captioner, InstructPix2Pix and a 0.5B LLM without failing, and what does each
step cost? It measures path and cost, not quality.

    python bench/fullsize.py --out fullsize.json   # real architectures (<= 30 minutes on 2 cores)
    python bench/fullsize.py --tiny                # the same commands on tiny models (the test suite runs this)

1. Models: random-weight local checkpoints built from the real architectures' configs, saved as a user's would be
   (`tests/tiny_models.py` builds them; here with real sizes): open_clip ViT-L-14 (a cir.backbone directory),
   BLIP-base (transformers), InstructPix2Pix with Stable Diffusion 1.5's UNet (8 input channels), VAE and CLIP
   text encoder (diffusers), a Qwen2-0.5B-shaped decoder with a chat template. Tokenizers are built offline.
2. Images: photo-like JPEGs of 256-1024 px (smooth colour fields, blobs, grain), no sidecar captions, and a
   CIRR-layout benchmark over them (val split: queries over the same images).
3. The real commands, unchanged, each in its own process (seconds and the process's peak RSS):
   caption (the BLIP captioner + CLIP embeddings) -> synth low (the LLM writes the texts) and high (InstructPix2Pix,
   2 denoising steps) -> stage 0, I, II (recipes/one_gpu/*.yaml, a few steps at a small batch, bf16 autocast) ->
   `eval run` -> `search index` and a query.
   Every step reads the model's captions, as a user's run does (docs/OWN_DATA.md). The random captioner is built
   to hear its image (tests/tiny_models.make_tiny_blip), so its word soups differ from image to image and pairs
   can be mined from them. Random CLIPs score every edit alike, so the mining band's, the keyword swaps' and the
   filters' thresholds are opened (flags, not code): every step then has data to work on.

Disk: ~25 GB while the full size runs (the checkpoints 8.3 GB, each stage's checkpoint with its AdamW state 3-5
GB); a temporary --work is deleted at the end.

JSON: {"size": ..., "models": {name: {"params": N, "seconds": s}}, "steps": {"caption": {"ok": true, "params": N,
"seconds": s, "peak_rss_mib": m, "command": [...]}, ...}}. A failed step records the end of its stderr and the
run goes on (later steps that need its output fail too); the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import TINY_BLIP  # noqa: E402  (configs only: the builders import torch when called)

# The real architectures' configs (the tiny ones are tests/tiny_models.py's defaults).
BLIP_BASE = {  # Salesforce/blip-image-captioning-base
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 384, "patch_size": 16, "initializer_range": 0.02},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "encoder_hidden_size": 768, "max_position_embeddings": 512},
    "projection_dim": 512, "vocab_size": 30524, "image_gain": TINY_BLIP["image_gain"]}
SD15_IP2P = {  # timbrooks/instruct-pix2pix (Stable Diffusion 1.5 with an 8-channel UNet input)
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vae": {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": 512},
    "unet": {"sample_size": 64, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 768,
             "attention_head_dim": 8, "norm_num_groups": 32}}
QWEN2_05B = {  # Qwen/Qwen2.5-0.5B-Instruct
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True}

SIZES = {
    "full": {"clip": "ViT-L-14", "blip": BLIP_BASE, "ip2p": SD15_IP2P, "llm": QWEN2_05B, "images": 24,
             "px": (256, 1024), "queries": 8, "batch": 4, "edits": 2, "denoise_steps": 2, "train_steps": 2,
             "precision": "bf16"},
    # the tiny BLIP with a real-sized vocabulary: over 40 words a random decoder soon draws its end token
    "tiny": {"clip": "tiny-clip-32", "blip": {**TINY_BLIP, "vocab_size": 2000}, "ip2p": None, "llm": None,
             "images": 12, "px": (48, 96),
             "queries": 4, "batch": 4, "edits": 2, "denoise_steps": 2, "train_steps": 2, "precision": "bf16"},
}
# the models each step loads (its "params")
STEP_MODELS = {"caption": ("blip", "clip"), "synth_low": ("llm",),
               "synth_high": ("ip2p", "clip"), "stage0": ("clip",), "stage1": ("clip",), "stage2": ("clip",),
               "eval": ("clip",), "search": ("clip",)}
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
           "purple": (130, 50, 160), "white": (235, 235, 235)}
SHAPES = ("circle", "square")


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_models(out: Path, size: dict) -> dict[str, dict]:
    """Random local checkpoints -> {name: {"path", "params", "seconds"}}."""
    import torch

    from cir.backbone import RANDOM, create_backbone, save_backbone
    from tests import tiny_models as tm

    models = {}

    def built(name: str, make, count) -> None:
        start = time.time()
        path = make(out / name)
        models[name] = {"path": str(path), "params": count(path), "seconds": round(time.time() - start, 1)}

    def clip(path: Path) -> Path:
        tiny = size["clip"].startswith("tiny")
        return save_backbone(create_backbone(size["clip"], None if tiny else RANDOM, seed=0), path)

    def count_clip(path: Path) -> int:
        return params(create_backbone(str(path)).model)

    def count_hf(cls):
        return lambda path: params(cls.from_pretrained(path))

    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import AutoModelForCausalLM, BlipForConditionalGeneration

    def count_ip2p(path: Path) -> int:
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(path, safety_checker=None,
                                                                      requires_safety_checker=False)
        return params(pipe.unet) + params(pipe.vae) + params(pipe.text_encoder)

    with torch.no_grad():
        built("clip", clip, count_clip)
        built("blip", lambda p: tm.make_tiny_blip(p, config=size["blip"]),
              count_hf(BlipForConditionalGeneration))
        built("ip2p", lambda p: tm.make_tiny_instruct_pix2pix(p, config=size["ip2p"] or tm.TINY_IP2P), count_ip2p)
        built("llm", lambda p: tm.make_qwen2_lm(p, config=size["llm"] or tm.TINY_QWEN2),
              count_hf(AutoModelForCausalLM))
    return models


def photo(rng: random.Random, width: int, height: int):
    """A photo-like picture: a smooth two-colour background, a shape of a named colour, grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    colour, shape, ground = rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(("gray", "brown", "dark"))
    base = {"gray": (120, 120, 120), "brown": (110, 80, 50), "dark": (40, 40, 50)}[ground]
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    angle = rng.uniform(0, 6.28)
    field = 0.5 + 0.5 * np.sin(3 * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 6.28))
    pixels = np.stack([c * (0.7 + 0.5 * field) for c in base], axis=-1)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.15, 0.3) * min(width, height)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    (draw.ellipse if shape == "circle" else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    grain = np.random.default_rng(rng.randrange(2**31)).normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
    return img


def write_images(out: Path, bench: Path, size: dict, seed: int = 0) -> None:
    """size["images"] JPEGs in `out` (no captions: the captioner writes them); the same pictures as PNGs in a
    CIRR-layout benchmark (val; its images in dev/ as in the official layout), each query's target another image,
    its members a few others."""
    rng = random.Random(seed)
    (bench / "dev").mkdir(parents=True)
    (bench / "captions").mkdir()
    (bench / "image_splits").mkdir()
    out.mkdir(parents=True)
    names = []
    for i in range(size["images"]):
        img = photo(rng, rng.randint(*size["px"]), rng.randint(*size["px"]))
        img.save(out / f"img{i:03d}.jpg", quality=90)
        names.append(f"dev-{i}-0-img{i}")
        img.save(bench / "dev" / f"{names[-1]}.png")
    (bench / "image_splits" / "split.rc2.val.json").write_text(
        json.dumps({n: f"./dev/{n}.png" for n in names}), encoding="utf-8")
    queries = []
    for q in range(size["queries"]):
        ref, tgt, *others = rng.sample(names, 6)
        queries.append({"pairid": q, "reference": ref, "target_hard": tgt, "caption": "make the shape blue",
                        "target_soft": {tgt: 1.0}, "img_set": {"id": q, "members": [ref, tgt, *others[:4]]}})
    (bench / "captions" / "cap.rc2.val.json").write_text(json.dumps(queries), encoding="utf-8")


def commands(work: Path, models: dict, size: dict, device: str = "cpu") -> dict[str, list[str]]:
    """Each step's command line, as a user types it (with the dry run's paths, steps, batch and device; the
    trainers take Accelerate's device, a GPU when there is one)."""
    py, m = sys.executable, {name: info["path"] for name, info in models.items()}
    images, captions = work / "images", work / "captions"
    batch = [str(size["batch"]), "--device", device]  # after --batch-size: every other command's batch and device
    train = [f"max_steps={size['train_steps']}", f"data.batch_size={size['batch']}", "data.workers=0", "log_with=[]",
             "save_every=1000", f"mixed_precision={size['precision']}", "grad_accum=1"]
    recipe = ROOT / "recipes" / "one_gpu"
    return {
        "caption": [py, "beam_runner.py", "caption", "--input", str(images), "--output", str(captions),
                    "--captioner", m["blip"], "--clip", m["clip"], "--batch-size", *batch, "--max-size", "1024"],
        "synth_low": [py, "beam_runner.py", "synth", "--input", str(captions), "--output", str(work / "low"),
                      "--quality", "low", "--llm", m["llm"], "--batch-size", *batch, "--band-low", "-1",
                      "--band-high", "1"],
        "synth_high": [py, "beam_runner.py", "synth", "--input", str(captions), "--output", str(work / "high"),
                       # one source's edits share their guidance scales: one batched call edits them all
                       "--quality", "high", "--editor", m["ip2p"], "--clip", m["clip"], "--num-triplets", "1",
                       "--samples-per-source", str(size["edits"]), "--keep-per-source", str(size["edits"]),
                       "--text-guidance", "7.5", "--image-guidance", "1.5", "--steps", str(size["denoise_steps"]),
                       "--batch-size", *batch, "--swap-low", "-1", "--swap-high", "1", "--min-image-image", "-1",
                       "--min-caption-image", "-1", "--min-directional", "-1"],
        "stage0": [py, "train/stage0.py", "--config", str(recipe / "stage0.yaml"), f"output_dir={work / 'stage0'}",
                   f"clip.model={m['clip']}", "clip.pretrained=null", f"data.train=['{captions}']", *train],
        "stage1": [py, "train/stage1.py", "--config", str(recipe / "stage1.yaml"), f"output_dir={work / 'stage1'}",
                   f"init_from={work / 'stage0' / 'final'}", f"data.train=['{captions}']", *train],
        "stage2": [py, "train/stage2.py", "--config", str(recipe / "stage2.yaml"), f"output_dir={work / 'stage2'}",
                   f"init_from={work / 'stage1' / 'final'}", f"data.train=['{work / 'low'}','{work / 'high'}']",
                   *train],
        "eval": [py, "-m", "eval", "run", "--benchmark", "cirr", "--data", str(work / "bench"), "--checkpoint",
                 str(work / "stage2" / "final"), "--output", str(work / "eval"), "--batch-size", *batch],
        "search": [py, "-m", "search", "index", "--checkpoint", str(work / "stage2" / "final"), "--images",
                   str(images), "--output", str(work / "index"), "--batch-size", *batch],
        "search_query": [py, "-m", "search", "search", "--index", str(work / "index"), "--reference", "img000.jpg",
                         "--text", "make the shape blue", "--k", "5", "--json", "--device", device],
    }


def default_device() -> str:
    import torch  # only torch: this process stays small (run_step)

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_step(cmd: list[str], log: Path) -> dict:
    """Run one command in its own process -> ok, seconds, peak RSS (that process's, from wait4). Linux counts
    in a child's peak the memory of the process it was spawned from, so this process never loads a model."""
    start = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=err, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"ok": proc.returncode == 0, "seconds": round(time.time() - start, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024)}  # Linux: kilobytes
    if proc.returncode != 0:
        result["error"] = f"exit {proc.returncode}: " + log.read_text(errors="replace")[-3000:]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="the same as --size tiny")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here, after every step")
    p.add_argument("--device", default=None, help="the data jobs', eval's and search's device (default: cuda when "
                                                  "there is one, else cpu); GPU memory is not measured (RSS only)")
    p.add_argument("--work", type=Path, default=None, help="keep the models, data and outputs here (default: a "
                                                           "temporary folder, deleted)")
    p.add_argument("--steps", default=None, help="comma-separated subset of the steps (their inputs must be in "
                                                 "--work from an earlier run)")
    p.add_argument("--build-models", type=Path, default=None, help=argparse.SUPPRESS)  # the models' own process
    args = p.parse_args(argv)
    size = SIZES[args.size]
    if args.build_models:
        models = build_models(args.build_models, size)
        (args.build_models / "models.json").write_text(json.dumps(models), encoding="utf-8")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="fullsize-"))
    device = args.device or default_device()
    result = {"size": args.size, "device": device, "models": {}, "steps": {}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    try:
        work.mkdir(parents=True, exist_ok=True)
        models_json = work / "models" / "models.json"
        if not models_json.exists():  # in a process of its own: this one stays small (see run_step)
            built = run_step([sys.executable, __file__, "--size", args.size, "--build-models", str(work / "models")],
                             work / "models.log")
            if not built["ok"]:
                raise RuntimeError(f"building the models failed: {built['error']}")
        result["models"] = json.loads(models_json.read_text())
        if not (work / "images").exists():
            write_images(work / "images", work / "bench", size)
        todo = commands(work, result["models"], size, device)
        wanted = args.steps.split(",") if args.steps else list(todo)
        for name in wanted:
            step = run_step(todo[name], work / f"{name}.log")
            models = STEP_MODELS.get(name, STEP_MODELS.get(name.split("_")[0], ()))
            step["params"] = sum(result["models"][m]["params"] for m in models)
            step["command"] = [Path(c).name if i < 2 else c for i, c in enumerate(todo[name])]
            result["steps"][name] = step
            print(f"[fullsize] {name}: {'ok' if step['ok'] else 'FAILED'} {step['seconds']} s, "
                  f"{step['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
            save()
    except Exception:  # the models or the data could not be made: say so in the JSON too
        result["error"] = traceback.format_exc()[-3000:]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    save()
    print(json.dumps(result))
    return 0 if "error" not in result and all(s["ok"] for s in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
