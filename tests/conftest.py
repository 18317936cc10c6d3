"""Shared fixtures. Tests run offline: no hub downloads, tiny models built from configs, the toy world."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: a test must never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def contained_temp_dir(tmp_path_factory):
    """The temp directory of the whole run (TMPDIR, also for subprocesses) is a folder under pytest's base temp,
    which pytest rotates: what libraries leave behind (torch.distributed's elastic agent, Beam pipelines that are
    built and never run) does not pile up in /tmp run after run."""
    temp = tmp_path_factory.mktemp("tmpdir")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(temp), str(temp)
    yield temp
    tempfile.tempdir = saved[1]
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]


@pytest.fixture
def test_pipeline():
    """TestPipeline on the runner the jobs run on (pipeline.jobs.local_runner), not the DirectRunner's Prism
    attempt: `with test_pipeline() as p:`."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipeline.jobs import local_runner

    def make() -> TestPipeline:
        options = PipelineOptions()
        return TestPipeline(runner=local_runner(options), options=options)

    return make


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """A small toy world shared by the tests that only read it."""
    from toyworld.cli import run

    out = tmp_path_factory.mktemp("toy") / "world"
    run(["--output", str(out), "--num-images", "48", "--bench-queries", "12", "--seed", "7"])
    return out


@pytest.fixture(scope="session")
def toy_captions(toy_world, tmp_path_factory):
    """The toy world's images through the caption job (sidecar captions, shards of 10): (dir, stats)."""
    from pipeline.caption import run

    out = tmp_path_factory.mktemp("cap") / "toy"
    stats = run(["--input", str(toy_world / "images"), "--output", str(out), "--shard-size", "10",
                 "--runner", "DirectRunner"])
    return out, stats


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_ip2p(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_instruct_pix2pix

    return make_tiny_instruct_pix2pix(tmp_path_factory.mktemp("models") / "tiny-ip2p")


@pytest.fixture(scope="session")
def tiny_stage1_export(toy_captions, tmp_path_factory) -> Path:
    """A stage I export (tiny CLIP, K=1) trained briefly on the toy captions."""
    from train.stage1 import main

    data, _ = toy_captions
    out = tmp_path_factory.mktemp("stage1") / "run"
    assert main([f"output_dir={out}", f"data.train=['{data}']", "clip.model=tiny-clip-32", "max_steps=20",
                 "data.batch_size=8", "save_every=100", "mapping.num_tokens=1", "mapping.depth=1",
                 "mapping.heads=2", "optim.lr=1e-3"]) == 0
    return out / "final"
