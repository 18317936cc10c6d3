"""What a frozen tower computed is kept by its input (train.frozen): each distinct input is encoded once, the
outputs are those of the tower, and the memory cap holds (stage II with and without it: test_train_stage2)."""
from __future__ import annotations

import json

import torch

from train.frozen import FrozenFeatures, pick, row_ids


def test_row_ids_name_the_rows_bytes():
    a = torch.randn(4, 3, 2, 2)
    b = a.clone()
    b[2, 0, 0, 0] += 1e-6  # one value of one row
    ids_a, ids_b = row_ids(a), row_ids(b)
    assert ids_a[:2] == ids_b[:2] and ids_a[3] == ids_b[3] and ids_a[2] != ids_b[2]
    assert row_ids(a[[1, 1]]) == [ids_a[1]] * 2
    tokens = torch.arange(8).reshape(4, 2)
    assert row_ids(a, tokens) != ids_a and row_ids(a, tokens) == row_ids(a.clone(), tokens.clone())


def tower(pixels: torch.Tensor, calls: list):
    """A stand-in frozen tower with two outputs: (sum of each row [B], the row doubled [B, ...])."""
    def encode(rows):
        x = pick(pixels, rows)
        calls.append(len(x))
        return x.flatten(1).sum(1), 2 * x
    return encode


def test_each_distinct_input_is_encoded_once_and_the_outputs_are_the_towers():
    cache, calls = FrozenFeatures(max_mib=1), []
    first = torch.randn(4, 3)
    second = torch.cat([first[[3, 1]], torch.randn(2, 3), torch.randn(1, 3).repeat(2, 1)])  # 2 seen, 4 new (1 twice)
    for batch in (first, second, second, first):
        got = cache("image", row_ids(batch), tower(batch, calls))
        want = tower(batch, [])(None)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert calls == [4, 4]  # all of the first batch; the second's unseen rows (its repeated row is new twice)
    assert (cache.hits, cache.misses) == (2 + 6 + 4, 4 + 4) and len(cache.rows) == 7
    other = cache("caption", row_ids(first), tower(first, calls))  # another tower's outputs are its own
    assert calls[-1] == 4 and torch.equal(other[1], 2 * first)
    assert cache.encoded == {"image": 8, "caption": 4}
    assert cache.kept("image", row_ids(second)[2]) and not cache.kept("caption", row_ids(second)[2])


def test_past_its_cap_nothing_new_is_kept_and_outputs_stay_right():
    calls: list = []
    off = FrozenFeatures(max_mib=0)
    x = torch.randn(3, 5)
    for _ in range(2):
        got = off("image", row_ids(x), tower(x, calls))
        assert torch.equal(got[1], 2 * x)
    assert calls == [3, 3] and not off.rows and off.used == 0
    small = FrozenFeatures(max_mib=1)
    big = torch.randn(3, 2 ** 16)  # a row: 4 B + 256 KiB of outputs; three fit in 1 MiB, not four
    more = torch.randn(3, 2 ** 16)
    small("image", row_ids(big), tower(big, calls))
    got = small("image", row_ids(more), tower(more, calls))
    assert len(small.rows) == 3 and small.used <= 2 ** 20 and torch.equal(got[1], 2 * more)
    assert FrozenFeatures(max_mib=1)("image", None, tower(x, calls))[0].shape == (3,)  # ids None: the cache is off


def train_both_ways(stage_cls, cfg_cls, overrides: list[str], tmp_path) -> tuple[dict, dict, dict]:
    """A stage trained with the frozen cache off (0) and on (64 MiB), logging every step: ({mib: [loss per
    step]}, {mib: the stage's FrozenFeatures}, {mib: images the stream decoded}). Stages I and II's tests use it."""
    from unittest import mock

    from train import data as train_data
    from train.config import load_config
    from train.loop import train

    logs, caches, decoded = {}, {}, {}
    real = train_data.decode_member

    def counting(key: str, value: bytes):
        decoded[mib] += key.rsplit(".", 1)[-1] in ("jpg", "png", "webp")
        return real(key, value)

    for mib in (0, 64):
        out = tmp_path / f"cache{mib}"
        cfg = load_config(cfg_cls, None, [*overrides, f"output_dir={out}", "log_every=1", "log_with=[]",
                                          f"frozen_cache_mib={mib}"])
        stage = stage_cls(cfg)
        decoded[mib] = 0
        with mock.patch.object(train_data, "decode_member", counting):
            train(stage, cfg)
        logs[mib] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        caches[mib] = stage.frozen
    assert not caches[0].rows and caches[0].hits == 0  # off: nothing kept, nothing asked of it
    return logs, caches, decoded


def test_a_batch_carries_pixels_for_the_images_the_stream_decoded_and_ids_from_their_bytes():
    import hashlib
    import io

    import pytest
    import torchvision.transforms as T
    from PIL import Image

    from cir.schema import REF
    from train.data import decode_images, decode_sample
    from train.frozen import image_inputs, pixels_of

    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    raw = [{"__key__": f"k{i}", "ref.png": png(40 * i), "mod.txt": b"x"} for i in range(3)]
    samples = [decode_sample(s, lazy=(REF,)) for s in raw]
    for i in (0, 2):  # the stream decodes what the stage will read; sample 1's image is kept (left encoded)
        decode_images(samples[i], (REF,))
    out = image_inputs(samples, REF, T.ToTensor(), "ref", FrozenFeatures(max_mib=1))
    assert out["ref_rows"] == [0, 2] and out["ref_pixels"].shape == (2, 3, 4, 4)
    assert out["ref_ids"] == [hashlib.sha256(s["ref.png"]).hexdigest() for s in raw]  # the encoded bytes' sha256
    assert torch.equal(pixels_of(out, "ref", [2]), out["ref_pixels"][[1]])
    assert out["ref_pixels"][1, 0, 0, 0].item() == pytest.approx(80 / 255)
    for rows in ([1], None):  # an undecoded image is never silently replaced
        with pytest.raises(RuntimeError, match="did not decode"):
            pixels_of(out, "ref", rows)
    decode_images(samples[1], (REF,))
    every = image_inputs(samples, REF, T.ToTensor(), "ref", FrozenFeatures(max_mib=0))  # the cache off: no ids
    assert every["ref_rows"] is None and "ref_ids" not in every and pixels_of(every, "ref", None).shape[0] == 3
