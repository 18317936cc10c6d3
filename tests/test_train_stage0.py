"""The trainer core through stage 0: configs, the stream, loss going down, resume, two ranks, bad input."""
from __future__ import annotations

import hashlib

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cir.schema import IMAGE
from cir.config import ConfigError
from train.config import load_config
from train.stage0 import Stage0Config, main

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.train=['{data}']", "clip.model=tiny-clip-32", "data.batch_size=8",
            "data.shuffle_buffer=16", "optim.warmup_steps=2", "log_every=1", *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return load_file(str(out / "final" / "open_clip_model.safetensors"))


def test_config_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(Stage0Config, str(ROOT / "train/configs/toy_stage0.yaml"),
                      ["max_steps=7", "data.batch_size=3", "optim.betas=[0.8, 0.9]", "init_from=null"])
    assert cfg.max_steps == 7 and cfg.data.batch_size == 3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.clip.model == "toy-clip-64" and cfg.init_from is None
    with pytest.raises(ConfigError, match="unknown key.*max_stepz"):
        load_config(Stage0Config, None, ["max_stepz=3"])
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        load_config(Stage0Config, None, ["data.batch_size=2.5"])


def test_training_forward_equals_open_clips_with_the_text_cut_after_the_last_end_of_text():
    from train.stage0 import Stage0

    stage = Stage0(load_config(Stage0Config, None, ["clip.model=tiny-clip-32"]))
    model = stage.build().eval()
    tokens = stage.backbone.tokenizer(["red", "a large red circle on the left of a small blue square", "two crosses"])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lengths = []
    model.clip.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        ours = model(images, tokens)
        image, text, scale = model.clip(images, tokens)[:3]  # open_clip's own forward, every position
    assert lengths == [int(tokens.argmax(dim=-1).max()) + 1, tokens.shape[1]] and lengths[0] < lengths[1]
    assert torch.allclose(ours["text_features"], text, atol=1e-5)
    assert torch.equal(ours["image_features"], image) and torch.equal(ours["logit_scale"], scale)
    # a checkpoint from before the wrapper (the CLIP's keys bare) still loads, strictly
    bare = {k: v + 1 for k, v in model.clip.state_dict().items()}
    model.load_state_dict(bare)
    assert all(torch.equal(v, bare[k]) for k, v in model.clip.state_dict().items())


def test_loss_decreases_and_export_loads(toy_captions, tmp_path):
    data, _ = toy_captions
    out = tmp_path / "s0"
    assert main(tiny_args(data, out, "max_steps=40", "optim.lr=5e-4", "save_every=100")) == 0
    curve = losses(out)
    assert len(curve) == 40 and sum(curve[-5:]) / 5 < 0.85 * sum(curve[:5]) / 5
    from cir.backbone import create_backbone

    trained = create_backbone(str(out / "final"))  # the next stage loads the export by its path
    assert set(weights(out)) == set(trained.model.state_dict())
    assert json.loads((out / "final" / "train_config.json").read_text())["max_steps"] == 40
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs"


def test_trackers_are_accelerates_with_the_run_name_and_config(toy_captions, tmp_path, capsys):
    """`log_with` goes to Accelerate's trackers (TensorBoard by default), under `run_name`, with the config as
    hparams; a tracker that is unknown or not installed stops the run before training (Accelerate alone would
    drop an uninstalled one silently)."""
    import yaml
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    data, _ = toy_captions
    out = tmp_path / "s0"
    assert main(tiny_args(data, out, "max_steps=2", "save_every=100", "run_name=toy-run")) == 0
    assert list((out / "logs" / "toy-run").glob("events.out.tfevents.*"))
    hparams = yaml.safe_load(next((out / "logs" / "toy-run").rglob("hparams.yml")).read_text())
    assert hparams["run_name"] == "toy-run" and hparams["max_steps"] == 2 and hparams["optim.lr"] > 0
    assert main(tiny_args(data, tmp_path / "none", "max_steps=2", "save_every=100", "log_with=[]")) == 0
    assert not list((tmp_path / "none" / "logs").rglob("events.out.tfevents.*"))
    installed = {str(t) for t in get_available_trackers()}
    missing = next(t for t in LoggerType.list() if t != "all" and t not in installed)
    capsys.readouterr()
    assert main(tiny_args(data, tmp_path / "m", "max_steps=2", f"log_with=[{missing}]")) == 2
    assert f"{missing} is not installed" in capsys.readouterr().err
    assert main(tiny_args(data, tmp_path / "u", "max_steps=2", "log_with=[neptunus]")) == 2
    assert "unknown tracker 'neptunus'" in capsys.readouterr().err
    assert not (tmp_path / "m" / "final").exists() and not (tmp_path / "u" / "final").exists()


def test_the_logit_scale_is_clamped_to_100_after_every_step(toy_captions, tmp_path):
    from train.loop import main as loop_main
    from train.stage0 import Stage0

    class HotStart(Stage0):  # a logit scale of e^6 = 403, above CLIP's cap
        def build(self):
            model = super().build()
            with torch.no_grad():
                model.clip.logit_scale.fill_(6.0)
            return model

    data, _ = toy_captions
    out = tmp_path / "s0"
    assert loop_main(HotStart, Stage0Config, tiny_args(data, out, "max_steps=3", "save_every=100")) == 0
    logged = [json.loads(line)["logit_scale"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged[0] == pytest.approx(403.4, abs=0.1)  # step 1's forward ran before the first clamp
    assert all(99.0 < scale <= 100.0 + 1e-3 for scale in logged[1:])  # clamped to the cap, then moved by AdamW
    assert weights(out)["logit_scale"].item() <= math.log(100) + 1e-6


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted(toy_captions, tmp_path, workers):
    """With 2 loader workers the checkpoint falls after an odd number of batches (3): the resumed loader's worker
    0 must take up the interrupted run's worker 1."""
    data, _ = toy_captions
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["max_steps=6", "save_every=3", f"data.workers={workers}"]
    assert main(tiny_args(data, whole, *args)) == 0
    assert main(tiny_args(data, broken, *args)) == 0
    # What a kill right after the step-3 checkpoint leaves behind: later checkpoints and the export gone.
    shutil.rmtree(broken / "checkpoints" / "checkpoint_1")
    shutil.rmtree(broken / "final")
    log = (broken / "train_log.jsonl").read_text().splitlines()[:3]
    (broken / "train_log.jsonl").write_text("\n".join(log) + "\n")
    assert main(tiny_args(data, broken, *args, "resume=latest")) == 0
    assert losses(broken) == pytest.approx(losses(whole), rel=1e-5)
    a, b = weights(whole), weights(broken)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class _Payload:
    """Unpickled, it creates a file: what a checkpoint from elsewhere could do to a trainer that unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_unpickles_nothing_and_skips_a_save_cut_short(toy_captions, tmp_path, capsys):
    data, _ = toy_captions
    out = tmp_path / "s0"
    args = ["max_steps=4", "save_every=2"]
    assert main(tiny_args(data, out, *args)) == 0
    first, second = out / "checkpoints" / "checkpoint_0", out / "checkpoints" / "checkpoint_1"
    assert json.loads((first / "train_state.json").read_text())["step"] == 2
    assert not list(out.rglob("custom_checkpoint_*"))  # the scheduler and step are JSON, not pickles
    (second / "train_state.json").unlink()  # a kill in the middle of the second save
    shutil.rmtree(out / "final")
    marker = tmp_path / "unpickled"
    planted = first / "custom_checkpoint_0.pkl"
    torch.save(_Payload(marker), planted)  # a pickle planted where Accelerate used to keep its state
    with pytest.raises(RuntimeError, match="custom_checkpoint"):  # refused (by Accelerate), never unpickled
        main(tiny_args(data, out, *args, "resume=latest"))
    assert not marker.exists()
    planted.unlink()
    assert main(tiny_args(data, out, *args, "resume=latest")) == 0
    assert f"resumed from {first} at step 2" in capsys.readouterr().out
    assert json.loads((second / "train_state.json").read_text())["step"] == 4  # saved again, complete
    # steps 3 and 4 were trained again: their first log lines went at the resume (#23: they used to repeat)
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_two_ranks_read_disjoint_shards_without_hanging(toy_captions, tmp_path):
    data, _ = toy_captions  # 5 shards: 3 for one rank, 2 for the other, and more steps than one epoch
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           # grad_accum=2: the feature-cached step under DDP (no_sync on the first micro-batch)
           str(ROOT / "train" / "stage0.py"), *tiny_args(data, out, "max_steps=8", "save_every=4", "grad_accum=2")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reads = {}
    for rank in (0, 1):
        lines = (out / "data_log" / f"rank{rank}-worker0.txt").read_text().split("\n")
        reads[rank] = [line.split() for line in lines if line]
    epoch0 = {rank: {u for e, u in r if e == "0"} for rank, r in reads.items()}
    assert epoch0[0] and epoch0[1] and not epoch0[0] & epoch0[1]
    assert len(epoch0[0] | epoch0[1]) == 5
    assert any(e != "0" for r in reads.values() for e, _ in r), "some rank went past its first epoch"
    assert (out / "final" / "open_clip_model.safetensors").is_file()


def test_bad_data_is_an_error_before_training(toy_captions, tmp_path, capsys):
    data, _ = toy_captions
    assert main(tiny_args(tmp_path / "none-{000..002}.tar", tmp_path / "o", "max_steps=1")) == 2
    assert "missing shard" in capsys.readouterr().err
    assert main([f"output_dir={tmp_path / 'o'}", "max_steps=1"]) == 2
    assert "data.train is empty" in capsys.readouterr().err
    triplets = tmp_path / "t.tar"
    import webdataset as wds

    with wds.TarWriter(str(triplets)) as sink:
        sink.write({"__key__": "k", "mod.txt": "x", "json": {"a": 1}})
    assert main(tiny_args(triplets, tmp_path / "o", "max_steps=1")) == 2
    assert "samples lack jpg or png or webp" in capsys.readouterr().err
    assert main(["no_such_key=1"]) == 2  # a config error is a status in this process, as on the command line
    assert "unknown key(s) no_such_key" in capsys.readouterr().err


def test_mix_manifest_weights_reach_the_stream(toy_captions, tmp_path):
    from train.sources import expand_weighted_sources

    data, _ = toy_captions
    manifest = tmp_path / "mix.yaml"
    manifest.write_text(f"datasets:\n  - {{path: {data}, weight: 3}}\n  - {{path: {data}, weight: 1}}\n")
    weighted = expand_weighted_sources([str(manifest), str(data)])
    assert [w for _, w in weighted] == [0.75, 0.25, 1.0]
    assert all(len(source.urls) == 5 for source, _ in weighted)


def _damage_one_image(data: Path, out: Path) -> str:
    """A copy of the shards where one sample's image bytes are cut short; returns that sample's key."""
    from cir import dataset as ds
    import webdataset as wds

    urls = ds.shard_urls(str(data))
    out.mkdir()
    damaged = None
    for i, url in enumerate(urls):
        with wds.TarWriter(str(out / f"s-{i:03d}.tar")) as sink:
            for sample in ds.iter_shard(url):
                image = IMAGE.image_member(sample)
                if damaged is None:
                    damaged = sample["__key__"]
                    sample = {**sample, image: sample[image][:60]}
                sink.write(sample)
    return damaged


def test_a_corrupt_sample_mid_stream_is_skipped_and_counted(toy_captions, tmp_path, capsys):
    from train.data import POSITION_KEY, ShardSource, TrainStream

    data, _ = toy_captions
    shards = tmp_path / "shards"
    damaged = _damage_one_image(data, shards)
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    stream = iter(TrainStream([ShardSource(urls)], None, 8, 0, 0, lambda batch: {"keys": [s["__key__"] for s in batch]}))
    batches = [next(stream) for _ in range(12)]  # two epochs of 48 samples
    assert all(len(b["keys"]) == 8 for b in batches)  # the corrupt one is replaced: batches keep their size
    seen = [k for b in batches for k in b["keys"]]
    assert damaged not in seen and len(set(seen[:47])) == 47
    # worker 0: skipped once per epoch, and so drew one replacement per epoch
    assert [int(x) for x in batches[-1][POSITION_KEY]] == [0, 2, 2]

    out = tmp_path / "run"
    assert main(tiny_args(shards / "s-{000..004}.tar", out, "max_steps=8")) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["data_errors"] >= 1 and log[0]["data_errors"] <= log[-1]["data_errors"]
    assert "skipped" in capsys.readouterr().out


def test_resume_after_a_replaced_sample_equals_uninterrupted(toy_captions, tmp_path):
    """The replacement drawn for a sample that did not decode moves the stream by one: the checkpoint records
    it, and the resumed stream skips it too (batches are skipped undecoded, so it could not know)."""
    data, _ = toy_captions
    shards = tmp_path / "shards"
    _damage_one_image(data, shards)
    pattern = str(shards / "s-{000..004}.tar")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["max_steps=10", "save_every=6"]  # 6 batches of 8 draw all 48 samples of epoch 0: the damaged one too
    assert main(tiny_args(pattern, whole, *args)) == 0
    assert main(tiny_args(pattern, broken, *args)) == 0
    checkpoint = broken / "checkpoints" / "checkpoint_0"
    state, position = (json.loads((checkpoint / f).read_text()) for f in ("train_state.json", "loader_state_0.json"))
    # rank 0's loader: 6 batches taken; its one slot: one sample skipped, one replacement drawn
    assert (state["step"], position) == (6, {"batches": 6, "workers": [[1, 1]]})
    assert "loader_state_0.json" in state["files"]  # checked for damage like every file of the checkpoint
    shutil.rmtree(broken / "checkpoints" / "checkpoint_1")
    shutil.rmtree(broken / "final")
    (broken / "train_log.jsonl").write_text("\n".join((broken / "train_log.jsonl").read_text().splitlines()[:6]) + "\n")
    assert main(tiny_args(pattern, broken, *args, "resume=latest")) == 0
    assert losses(broken) == pytest.approx(losses(whole), rel=1e-5)
    # the running count of skipped samples goes on from the checkpoint's, as in the uninterrupted run
    errors = [[json.loads(line)["data_errors"] for line in (out / "train_log.jsonl").read_text().splitlines()]
              for out in (whole, broken)]
    assert errors[0] == errors[1] and errors[0][-1] >= 1


def test_images_the_stage_will_not_read_are_not_decoded(toy_captions, tmp_path):
    """Lazy roles stay encoded for the samples the stage says it will not read (their cached embeddings, or
    what its frozen tower kept), so a damaged image nobody looks at costs nothing; the others are decoded, and
    a damaged one is replaced."""
    from PIL import Image

    from train.data import POSITION_KEY, ShardSource, TrainStream

    data, _ = toy_captions
    shards = tmp_path / "shards"
    damaged = _damage_one_image(data, shards)
    urls = sorted(str(p) for p in shards.glob("*.tar"))

    def collate(batch):
        return {"types": {s["__key__"]: type(s.get("jpg", s.get("png"))) for s in batch}}

    def odd(key: str) -> bool:
        return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 == 1

    for skip in ((lambda key: True), (lambda key: False), odd):
        stream = iter(TrainStream([ShardSource(urls)], None, 8, 0, 0, collate, lazy_roles=(IMAGE,),
                                  undecoded=lambda batch: [(IMAGE,) if skip(s["__key__"]) else () for s in batch]))
        batches = [next(stream) for _ in range(6)]  # one epoch
        types = {k: t for b in batches for k, t in b["types"].items()}
        assert all(issubclass(t, bytes if skip(k) else Image.Image) for k, t in types.items())
        errors = int(batches[-1][POSITION_KEY][1])
        assert (damaged in types, errors) == ((True, 0) if skip(damaged) else (False, 1))


def test_accumulated_features_make_the_step_of_the_whole_batch(toy_captions, tmp_path):
    """grad_accum=2 x 4 with cached features takes the step of one batch of 8 (open_clip's accum_freq);
    plain accumulation (each micro-batch its own negatives) does not."""
    data, _ = toy_captions
    step = ["max_steps=1", "optim.warmup_steps=1", "optim.lr=1e-3", "save_every=100"]
    runs = {"whole": ["data.batch_size=8"], "cached": ["data.batch_size=4", "grad_accum=2"],
            "plain": ["data.batch_size=4", "grad_accum=2", "accum_features=false"]}
    for name, extra in runs.items():
        assert main(tiny_args(data, tmp_path / name, *step, *extra)) == 0
    whole, cached, plain = (weights(tmp_path / name) for name in runs)
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    assert all(torch.allclose(whole[k], cached[k], atol=2e-6) for k in whole)
    assert not all(torch.allclose(whole[k], plain[k], atol=2e-6) for k in whole)


def test_a_resumed_run_shows_each_step_once_in_tensorboard(toy_captions, tmp_path):
    """Weak case of #23: after a resume TensorBoard showed the steps between the checkpoint and the crash twice."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, _ = toy_captions
    out = tmp_path / "s0"
    assert main(tiny_args(data, out, "max_steps=4", "save_every=2", "log_every=1")) == 0
    checkpoints = sorted((out / "checkpoints").glob("checkpoint_*"), key=lambda c: int(c.name.split("_")[-1]))
    shutil.rmtree(checkpoints[-1])  # as if killed after step 4 was logged, before it was saved
    shutil.rmtree(out / "final")
    assert main(tiny_args(data, out, "max_steps=4", "save_every=2", "log_every=1")) == 0
    events = EventAccumulator(str(out / "logs" / "stage0"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_dataset_or_subset_that_fits_is_read_from_memory_after_each_shards_first_read(toy_captions, monkeypatch):
    """data.subset_fraction keeps the same keys every epoch; once a shard has been read, its kept samples (all
    of them without a subset) come from memory (a 100-of-3,000 ablation would otherwise read all 3,000 every
    epoch), unless they exceed the budget (data.keep_mib), when shards are read again."""
    import webdataset as wds

    from cir import dataset as ds
    from train import data as td

    data, _ = toy_captions
    urls = ds.shard_urls(str(data))
    opened: list[str] = []
    real = wds.tarfile_to_samples

    def counting(**kwargs):
        def stage(src):
            src = list(src)
            opened.extend(s["url"] for s in src)
            return real(**kwargs)(src)
        return stage

    monkeypatch.setattr(td.wds, "tarfile_to_samples", counting)
    everything = {s["__key__"] for url in urls for s in ds.iter_shard(url)}
    kept = {k for k in everything if td.in_subset(k, 0.5)}
    assert 10 < len(kept) < 38

    def epochs(fraction: float, n: int = 3) -> list[set]:
        opened.clear()
        source, handler = td.ShardSource(urls), td.CountingHandler()
        options = td.ReadOptions(8, fraction, keep_bytes=keep)
        return [{s["__key__"] for s in source.epoch(0, e, td.current_slot(), handler, options)} for e in range(n)]

    keep = 1 << 20
    assert epochs(0.5) == [kept] * 3 and len(opened) == len(urls)  # each shard opened once
    assert epochs(1.0) == [everything] * 3 and len(opened) == len(urls)  # the whole dataset, too
    keep = 0
    assert epochs(0.5) == [kept] * 3 and len(opened) == 3 * len(urls)  # no room: read again every epoch
    assert epochs(1.0, 1) == [everything]


def test_stage0_keeps_preprocessed_images_and_trains_exactly_the_same(toy_captions, tmp_path):
    """Without augment an image's pixels are a function of its bytes: kept (train.frozen), an image met again
    is not decoded again, and the run is the same to the last bit; with augment nothing is kept."""
    from tests.test_train_frozen import train_both_ways
    from train.stage0 import Stage0, Stage0Config

    data, _ = toy_captions  # 48 images: batches of 8 come round again from the seventh on
    base = [f"data.train=['{data}']", "clip.model=tiny-clip-32", "data.batch_size=8", "data.shuffle_buffer=16",
            "optim.warmup_steps=2", "max_steps=10"]
    logs, caches, decoded = train_both_ways(Stage0, Stage0Config, base, tmp_path)
    assert logs[0] == logs[64] and len(logs[0]) == 10
    cache = caches[64]
    assert decoded == {0: 80, 64: cache.encoded["pixels"]} and cache.encoded["pixels"] <= 48 + 8
    assert cache.hits == 80 - cache.encoded["pixels"] > 0
    _, augmented, decoded = train_both_ways(Stage0, Stage0Config, [*base, "augment=true"], tmp_path / "aug")
    assert not augmented[64].on and decoded == {0: 80, 64: 80}
    assert not Stage0(load_config(Stage0Config, None, [*base, "data.workers=2"])).frozen.on  # a copy per worker
