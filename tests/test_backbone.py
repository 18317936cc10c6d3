"""The CLIP backbone factory: tiny architectures offline, local directories, clear errors for missing weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cir.backbone import (CONFIG_FILE, RANDOM, TINY_MODELS, WEIGHTS_FILE, BackboneError, check_weights, create_backbone,
                          preprocess_batch, save_backbone)


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("tiny-clip-32", seed=0)


def test_tiny_architectures_are_registered():
    assert {"tiny-clip-32", "toy-clip-64"} <= set(TINY_MODELS)


def test_tiny_model_encodes_images_and_text(tiny):
    images = torch.stack([tiny.preprocess(Image.new("RGB", (50, 70), c)) for c in ("red", "blue")])
    assert images.shape == (2, 3, 32, 32)  # the eval transform resizes to the architecture's size
    tokens = tiny.tokenizer(["a red circle", "a blue square on a gray background"])
    assert tokens.shape == (2, tiny.context_length) == (2, 48)
    assert tokens[0, 0].item() == 49406  # <start_of_text> from open_clip's bundled BPE vocabulary
    with torch.no_grad():
        img = tiny.model.encode_image(images, normalize=True)
        txt = tiny.model.encode_text(tokens, normalize=True)
    assert img.shape == txt.shape == (2, tiny.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(img[0], img[1])  # different images, different features


def _varied_images() -> list[Image.Image]:
    """Sizes and modes the transforms must bring to one RGB size: noise, so rounding shows."""
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 40), (70, 50), (31, 90))]
    return rgb + [Image.fromarray(rng.integers(0, 256, (45, 45), dtype=np.uint8)).convert("L")]


def test_preprocess_batch_equals_the_transform_image_by_image(tiny):
    images = _varied_images()
    expected = torch.stack([tiny.preprocess(im) for im in images])
    assert torch.equal(preprocess_batch(tiny.preprocess, images), expected)  # bit for bit, not approximately
    # the training transform is random (random resized crop): the same seed draws the same crops either way
    torch.manual_seed(3)
    expected = torch.stack([tiny.preprocess_train(im) for im in images])
    torch.manual_seed(3)
    assert torch.equal(preprocess_batch(tiny.preprocess_train, images), expected)


def test_preprocess_batch_takes_other_transforms_image_by_image():
    from torchvision import transforms as T

    grey = [im.convert("L") for im in _varied_images()]
    for transform in (lambda im: T.functional.to_tensor(im.resize((8, 8))),  # not a Compose
                      T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Normalize((0.5,), (0.25,))])):  # not RGB
        assert torch.equal(preprocess_batch(transform, grey), torch.stack([transform(im) for im in grey]))


def test_seed_fixes_random_init():
    a = create_backbone("tiny-clip-32", seed=3).model.state_dict()
    b = create_backbone("tiny-clip-32", seed=3).model.state_dict()
    c = create_backbone("tiny-clip-32", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_frozen_real_architecture_without_weights_is_an_error():
    """open_clip builds a random ViT-B-32 when no pretrained is given: embeddings, filters, stage I/II or eval
    on it would be a silent substitute. Stage 0 (training from scratch) and 'random' on purpose may; the tiny
    architectures are random by design, seeded 0 unless told, so every worker and rerun builds the same."""
    with pytest.raises(BackboneError, match="ViT-B-32.*randomly initialised.*openai"):
        create_backbone("ViT-B-32")
    assert check_weights("ViT-B-32", RANDOM) is None and check_weights("ViT-B-32", None, allow_random=True) is None
    assert check_weights("ViT-B-32", "openai") == "openai" and check_weights("tiny-clip-32", None) is None
    a, b = create_backbone("tiny-clip-32").model.state_dict(), create_backbone("tiny-clip-32", seed=0).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_toy_architecture_is_64px():
    bb = create_backbone("toy-clip-64", seed=0)
    assert bb.image_size == 64 and bb.embed_dim == 128


def test_save_and_load_directory_round_trip(tiny, tmp_path):
    out = save_backbone(tiny, tmp_path / "clip", extra={"note": "test"})
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    assert json.loads((out / CONFIG_FILE).read_text())["model_cfg"] == tiny.model_cfg
    loaded = create_backbone(str(out))
    assert loaded.model_cfg == tiny.model_cfg
    tokens = tiny.tokenizer(["a small white cross"])
    assert torch.equal(loaded.tokenizer(["a small white cross"]), tokens)
    image = tiny.preprocess(Image.new("RGB", (32, 32), "green")).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(image), tiny.model.encode_image(image))
        assert torch.allclose(loaded.model.encode_text(tokens), tiny.model.encode_text(tokens))


def test_directory_without_weights_names_the_missing_file(tiny, tmp_path):
    out = save_backbone(tiny, tmp_path / "clip")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(BackboneError, match=WEIGHTS_FILE):
        create_backbone(str(out))


def test_directory_without_config_names_the_missing_file(tmp_path):
    (tmp_path / "clip").mkdir()
    with pytest.raises(BackboneError, match=CONFIG_FILE):
        create_backbone(str(tmp_path / "clip"))


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(str(tmp_path / "nope"))


def test_pretrained_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(BackboneError, match="weights.safetensors"):
        create_backbone("tiny-clip-32", pretrained=str(missing))


def test_pretrained_file_loads(tiny, tmp_path):
    from safetensors.torch import save_model

    path = tmp_path / "w.safetensors"
    save_model(tiny.model, str(path))
    loaded = create_backbone("tiny-clip-32", pretrained=str(path))
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())


def test_hub_weights_offline_give_a_clear_error():
    # HF_HUB_OFFLINE=1 (conftest): the download cannot happen, and the message says what to do instead.
    with pytest.raises(BackboneError, match="ViT-B-32.*openai.*local directory"):
        create_backbone("ViT-B-32", pretrained="openai")


def test_unknown_model_name_lists_the_tiny_ones():
    with pytest.raises(BackboneError, match="tiny-clip-32"):
        create_backbone("no-such-clip")


def test_the_docs_example_runs(capsys):
    """docs/BACKBONES.md's code block builds a tiny CLIP and encodes an image and a text with it."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "BACKBONES.md").read_text()
    block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    exec(compile(block, "docs/BACKBONES.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 32]) torch.Size([1, 32]) 32"
