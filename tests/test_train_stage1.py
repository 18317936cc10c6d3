"""Stage I: the mapping learns to put an image's pseudo-prompt next to the image; exports load back."""
from __future__ import annotations

import json

import torch

from cir.mapping import MappingConfig, encode_text_with_pseudo, image_features
from cir.model import load_cir_model, new_mapping
from cir.schema import IMAGE
from train.data import decode_sample
from train.stage1 import main

BASE = ["clip.model=tiny-clip-32", "data.batch_size=16", "data.shuffle_buffer=16", "optim.warmup_steps=5",
        "log_every=5", "save_every=1000", "mapping.num_tokens=2", "mapping.depth=1", "mapping.heads=2"]


def toy_images(toy_captions):
    from cir.dataset import iter_shard, shard_urls

    data, _ = toy_captions
    return [decode_sample(s) for url in shard_urls(str(data)) for s in iter_shard(url)]


def own_image_ranks(backbone, mapping, placeholder, samples) -> torch.Tensor:
    """For each image, the rank (0 = first) of that image when its own pseudo-prompt queries all images."""
    clip = backbone.model
    images = torch.stack([backbone.preprocess(s.get("jpg") or s.get("png")) for s in samples])
    with torch.no_grad():
        v, patches = image_features(clip, images, mapping.cfg.use_patches)
        prompts = backbone.tokenizer(["a photo of $"] * len(samples))
        t = encode_text_with_pseudo(clip, prompts, placeholder, mapping(v, patches))
    sims = t @ v.T  # [N, N]
    own = sims.diagonal()[:, None]
    return (sims > own).sum(dim=1)


def test_stage1_beats_a_random_mapping(toy_captions, tmp_path):
    data, _ = toy_captions
    out = tmp_path / "s1"
    assert main([f"output_dir={out}", f"data.train=['{data}']", "max_steps=60", "optim.lr=1e-3", *BASE]) == 0
    model = load_cir_model(out / "final")
    assert model.stage == 1 and model.prompt == "a photo of $"
    samples = toy_images(toy_captions)
    trained = own_image_ranks(model.backbone, model.mapping, model.placeholder, samples).float()
    torch.manual_seed(0)
    random_mapping, placeholder = new_mapping(model.backbone, model.mapping.cfg)
    baseline = own_image_ranks(model.backbone, random_mapping.eval(), placeholder, samples).float()
    # 48 images of a random (untrained) tiny CLIP look much alike; the trained mapping must still rank an
    # image's own pseudo-prompt far better than a random mapping does.
    print("mean rank trained/random", trained.mean().item(), baseline.mean().item(),
          "R@5", (trained < 5).float().mean().item(), (baseline < 5).float().mean().item())
    assert trained.mean() < 0.5 * baseline.mean()
    assert (trained < 5).float().mean() >= 2 * (baseline < 5).float().mean() > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"contrastive", "soft_text_alignment"} <= set(log[-1])


def test_cached_embeddings_and_pic2word_baseline(toy_world, tiny_clip_dir, tmp_path):
    from pipeline.caption import run as caption

    cap = tmp_path / "cap"
    caption(["--input", str(toy_world / "images"), "--output", str(cap), "--clip", str(tiny_clip_dir),
             "--runner", "DirectRunner"])
    out = tmp_path / "p2w"
    # K=1 without patches is the Pic2Word-style baseline, and the only mapping that can run on emb.npy alone
    args = [f"output_dir={out}", f"data.train=['{cap}']", f"init_from={tiny_clip_dir}", "max_steps=4",
            "mapping.num_tokens=1", "mapping.use_patches=false", "mapping.depth=1", "mapping.heads=2", "sta_weight=0",
            "data.batch_size=16", "log_every=1"]
    assert main(args) == 0
    model = load_cir_model(out / "final")
    assert model.mapping.cfg == MappingConfig(num_tokens=1, depth=1, heads=2, use_patches=False)
    assert model.mapping.patch_proj is None


def test_cached_embeddings_only_from_the_same_clip(toy_world, tiny_clip_dir, tmp_path, caplog):
    """emb.npy replaces the image tower only where the caption job's CLIP is this stage's frozen CLIP: the
    samples record its weights' fingerprint. Another CLIP's embeddings (here: the same architecture, another
    seed; in real use, the open-domain CLIP vs a stage 0 fine-tune) are another space: the tower runs."""
    from pipeline.caption import run as caption
    from train.config import load_config
    from train.stage1 import Stage1, Stage1Config

    cap = tmp_path / "cap"
    caption(["--input", str(toy_world / "images"), "--output", str(cap), "--clip", str(tiny_clip_dir),
             "--runner", "DirectRunner"])
    samples = toy_images((cap, None))[:8]
    overrides = ["mapping.use_patches=false", "mapping.num_tokens=1", f"data.train=['{cap}']"]

    def stage(*extra):
        s = Stage1(load_config(Stage1Config, None, [*overrides, *extra]))
        s.build()
        return s

    same = stage(f"init_from={tiny_clip_dir}")
    batch = same.collate(samples)
    assert "emb" in batch and "image_pixels" not in batch
    assert same.undecoded_images(samples) == [(IMAGE,)] * 8  # the stream leaves these images undecoded
    with torch.no_grad():
        tower = same.backbone.model.encode_image(torch.stack([same.backbone.preprocess(s.get("jpg") or s.get("png"))
                                                              for s in samples]), normalize=True)
    assert torch.allclose(batch["emb"], tower, atol=2e-3)
    with caplog.at_level("WARNING", logger="train.data"):
        other = stage("clip.model=tiny-clip-32", "seed=1").collate(samples)
    assert "image_pixels" in other and "emb" not in other
    assert stage("clip.model=tiny-clip-32", "seed=1").undecoded_images(samples) == [()] * 8
    assert "this stage's frozen CLIP is" in caplog.text
    # a sample that does not say which CLIP made its emb.npy (a dataset from before the field existed)
    unrecorded = [{**s, "json": {k: v for k, v in s["json"].items() if k != "emb_clip"}} for s in samples]
    assert "image_pixels" in same.collate(unrecorded)
    assert "emb" not in stage(f"init_from={tiny_clip_dir}", "data.use_cached_embeddings=false").collate(samples)


def test_stage1_on_two_ranks(toy_captions, tmp_path):
    """The pseudo-prompt runs through the DDP wrapper's forward, so gradients synchronise across gloo ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data, _ = toy_captions
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "train" / "stage1.py"),
           f"output_dir={out}", f"data.train=['{data}']", "max_steps=4", *BASE]
    result = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_cir_model(out / "final").stage == 1
    assert sorted(p.name for p in (out / "data_log").iterdir()) == ["rank0-worker0.txt", "rank1-worker0.txt"]


def test_accumulated_features_make_the_step_of_the_whole_batch(toy_captions, tmp_path):
    """grad_accum=2 x 8 with cached features: the InfoNCE and soft-alignment batch is all 16 samples, so the
    step equals one batch of 16; plain accumulation (two batches of 8) does not."""
    from safetensors.torch import load_file

    data, _ = toy_captions
    step = [f"data.train=['{data}']", *BASE, "max_steps=1", "optim.warmup_steps=1", "optim.lr=1e-3"]
    runs = {"whole": ["data.batch_size=16"], "cached": ["data.batch_size=8", "grad_accum=2"],
            "plain": ["data.batch_size=8", "grad_accum=2", "accum_features=false"]}
    for name, extra in runs.items():
        assert main([f"output_dir={tmp_path / name}", *step, *extra]) == 0
    whole, cached, plain = (load_file(str(tmp_path / name / "final" / "mapping.safetensors")) for name in runs)
    assert all(torch.allclose(whole[k], cached[k], atol=2e-6) for k in whole)
    assert not all(torch.allclose(whole[k], plain[k], atol=2e-6) for k in whole)


def test_clip_settings_beside_init_from_are_refused(tiny_clip_dir, tmp_path, capsys):
    """With init_from the stage uses that export's CLIP: clip.model / clip.pretrained would silently do nothing."""
    import pytest

    from cir.config import ConfigError
    from train.config import load_config
    from train.stage1 import Stage1Config
    from train.stage2 import Stage2Config

    with pytest.raises(ConfigError, match=r"clip.\* and init_from are both set: .*uses that export's CLIP"):
        load_config(Stage1Config, None, [f"init_from={tiny_clip_dir}", "clip.model=ViT-B-32"])
    with pytest.raises(ConfigError, match="remove them"):
        load_config(Stage2Config, None, [f"init_from={tiny_clip_dir}", "clip.pretrained=openai"])
    assert load_config(Stage1Config, None, [f"init_from={tiny_clip_dir}"]).init_from == str(tiny_clip_dir)
    assert main([f"output_dir={tmp_path / 'o'}", f"init_from={tiny_clip_dir}", "clip.model=tiny-clip-32"]) == 2
    assert "remove them" in capsys.readouterr().err


def test_stage1_trains_the_same_with_the_frozen_cache_and_hits_it(toy_captions, tmp_path):
    from tests.test_train_frozen import train_both_ways
    from train.stage1 import Stage1, Stage1Config

    logs, caches, decoded = train_both_ways(Stage1, Stage1Config, [*BASE, f"data.train=['{toy_captions[0]}']",
                                                                   "max_steps=8"], tmp_path)
    assert len(logs[0]) == 8 and all(abs(a - b) < 1e-4 for a, b in zip(logs[0], logs[64])), logs
    cache = caches[64]
    assert cache.hits + cache.misses == 8 * 16 * 2  # every image and caption of 8 batches of 16 asked for
    assert cache.hits > 0 and len(cache.rows) <= cache.misses  # the 48 images come round again within 8 batches
    # nor decoded: the stream decodes exactly the images the tower then encodes (off: all of them)
    assert decoded == {0: 8 * 16, 64: cache.encoded["image"]} and cache.encoded["image"] < 8 * 16
