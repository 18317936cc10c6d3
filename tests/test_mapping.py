"""Pseudo-word tokens inside the CLIP text encoder: exact against open_clip's own encode_text."""
from __future__ import annotations

import torch

from cir.backbone import create_backbone
from cir.mapping import MappingConfig, MappingNetwork, encode_text, encode_text_with_pseudo, placeholder_id


def test_placeholder_filled_with_its_own_embedding_equals_encode_text():
    bb = create_backbone("tiny-clip-32", seed=0)
    clip = bb.model.eval()
    ph = placeholder_id(bb.tokenizer)
    tokens = bb.tokenizer(["a photo of $", "a photo of $ that is a large red circle on the left"])
    own = clip.token_embedding(torch.tensor([[ph]])).expand(2, 1, -1)  # K = 1: "$" itself
    with torch.no_grad():
        assert torch.allclose(encode_text_with_pseudo(clip, tokens, ph, own), clip.encode_text(tokens, normalize=True),
                              atol=1e-5)


def test_more_pseudo_tokens_shift_the_pooling_position():
    bb = create_backbone("tiny-clip-32", seed=0)
    clip = bb.model.eval()
    ph = placeholder_id(bb.tokenizer)
    # the placeholder at different positions in one batch, and two different pseudo words per row
    tokens = bb.tokenizer(["a photo of $", "$ on the left", "big $"])
    words = torch.stack([clip.token_embedding(bb.tokenizer([w])[0, 1:3]) for w in ("red circle", "blue square",
                                                                                   "green cross")])  # [3, 2, w]
    with torch.no_grad():
        got = encode_text_with_pseudo(clip, tokens, ph, words)
        expected = clip.encode_text(bb.tokenizer(["a photo of red circle", "blue square on the left",
                                                  "big green cross"]), normalize=True)
    assert torch.allclose(got, expected, atol=1e-5)


def test_encode_text_cut_after_the_last_end_of_text_equals_open_clip():
    bb = create_backbone("tiny-clip-32", seed=0)
    clip = bb.model.eval()
    texts = ["red", "a large red circle on the left of a small blue square", "two green crosses"]
    tokens = bb.tokenizer(texts)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # there is padding to cut
    with torch.no_grad():
        for normalize in (True, False):
            assert torch.allclose(encode_text(clip, tokens, normalize), clip.encode_text(tokens, normalize=normalize),
                                  atol=1e-5)


def test_mapping_shapes_with_and_without_patches():
    v, patches = torch.randn(3, 32), torch.randn(3, 16, 64)
    with_patches = MappingNetwork(MappingConfig(num_tokens=4, depth=2, heads=2), 32, 64, 48)
    assert with_patches(v, patches).shape == (3, 4, 48)
    pic2word = MappingNetwork(MappingConfig(num_tokens=1, use_patches=False), 32, 64, 48)
    assert pic2word(v).shape == (3, 1, 48) and pic2word.patch_proj is None


def test_token_norm_words_puts_every_pseudo_token_at_the_word_embeddings_norm():
    from cir.model import new_mapping

    bb = create_backbone("tiny-clip-32", seed=0)
    words = float(bb.model.token_embedding.weight.norm(dim=-1).mean())
    v, patches = torch.randn(3, bb.embed_dim), torch.randn(3, 5, int(bb.model_cfg["vision_cfg"]["width"]))
    free, _ = new_mapping(bb, MappingConfig(num_tokens=2, depth=1, heads=2))
    scaled, _ = new_mapping(bb, MappingConfig(num_tokens=2, depth=1, heads=2, token_norm="words"))
    scaled.load_state_dict(free.state_dict())  # the same weights: only the output's length differs
    s_free, s_words = free(v, patches), scaled(v, patches)
    assert torch.allclose(s_words.norm(dim=-1), torch.full((3, 2), words), atol=1e-5)
    assert not torch.allclose(s_free.norm(dim=-1), torch.full((3, 2), words), atol=1e-2)
    assert torch.allclose(torch.nn.functional.normalize(s_free, dim=-1), s_words / words, atol=1e-5)


def test_token_norm_refuses_an_unknown_value():
    import pytest

    with pytest.raises(ValueError, match="token_norm"):
        MappingNetwork(MappingConfig(token_norm="unit"), 32, 64, 48)
