"""The training loop driven by a stage of our own: `train.stage.Stage` supplies every optional hook, so a stage
with only build / collate / loss / export trains, and the hooks it overrides are called when they should be."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from train.config import TrainConfig
from train.loop import train
from train.stage import Stage


class CaptionLength(Stage):
    """Predicts a caption's length from its first bytes: the smallest stage that learns something."""

    name = "caption-length"
    required_fields = ("txt",)

    def __init__(self):
        super().__init__()
        self.calls = {"setup": 0, "after_step": 0}
        self.steps_seen = []

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)

    def collate(self, samples: list[dict]) -> dict:
        first = [[float(b) / 255 for b in s["txt"].encode()[:4]] for s in samples]  # [B, 4]
        return {"x": torch.tensor(first), "y": torch.tensor([[len(s["txt"]) / 100] for s in samples])}

    def loss(self, model, batch: dict, accelerator) -> tuple[torch.Tensor, dict]:
        self.steps_seen.append(self.step)
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}

    def export(self, model, out_dir: Path) -> None:
        torch.save(model.state_dict(), out_dir / "weights.pt")


class WithHooks(CaptionLength):
    def setup(self, model, accelerator) -> None:
        self.calls["setup"] += 1

    def after_step(self, model) -> None:
        self.calls["after_step"] += 1


def _config(out: Path, captions: Path, **extra) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(out), max_steps=4, log_every=1, save_every=2, **extra)
    cfg.data.train = [str(captions)]
    cfg.data.batch_size = 4
    cfg.optim.warmup_steps = 0
    return cfg


def test_a_stage_with_only_the_required_hooks_trains_and_exports(toy_captions, tmp_path):
    stage = CaptionLength()
    final = train(stage, _config(tmp_path / "run", toy_captions[0]))
    assert (final / "weights.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert stage.steps_seen == [0, 1, 2, 3]  # the loop tells the stage its step before each batch
    assert not stage.caches_features and stage.lazy_roles == () and stage.undecoded_images([{}]) == [()]


def test_overridden_hooks_are_called_and_feature_caching_needs_its_keys(toy_captions, tmp_path):
    stage = WithHooks()
    # grad_accum with accum_features: a stage without cached or shared keys accumulates plain losses
    train(stage, _config(tmp_path / "run", toy_captions[0], grad_accum=2))
    assert stage.calls == {"setup": 1, "after_step": 4}
    assert len(stage.steps_seen) == 8  # two micro-batches per optimizer step


def test_the_loader_resumes_from_its_own_state_on_each_of_two_ranks_with_two_workers(toy_captions, monkeypatch):
    """TrainLoader owns the stream's position: after k batches its state_dict() is all a new loader needs to
    go on exactly where the first would have, on every rank, with the batches coming from two loader workers
    in turn (and the same resume from a JSON round trip, as a checkpoint keeps it)."""
    from cir import dataset as ds
    from train.data import ShardSource, TrainLoader, TrainStream

    data, _ = toy_captions
    urls = ds.shard_urls(str(data))

    def loader(state=None) -> TrainLoader:
        stream = TrainStream([ShardSource(urls)], None, 4, 7, 8, lambda batch: {"keys": [s["__key__"] for s in batch]})
        out = TrainLoader(stream, workers=2)
        if state is not None:
            out.load_state_dict(json.loads(json.dumps(state)))
        return out

    seen: dict[int, list] = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        whole = [next(b)["keys"] for b in [loader()] for _ in range(9)]
        first = loader()
        head = [next(first)["keys"] for _ in range(5)]
        state = first.state_dict()
        assert state == {"batches": 5, "workers": [[0, 0], [0, 0]]}
        resumed = loader(state)
        assert head + [next(resumed)["keys"] for _ in range(4)] == whole
        assert resumed.state_dict()["batches"] == 9
        seen[rank] = whole
    assert seen[0] != seen[1]  # each rank reads its own split
