"""Tiny random models built from configs, saved to local directories: offline stand-ins for real ones
(tests, benchmarks and the demo; never a substitute for a model a user named)."""
from __future__ import annotations

from pathlib import Path

TINY_BLIP_WORDS = ("a the of on in and picture photo image small large red green blue yellow purple white "
                   "circle square triangle cross left right middle background gray black brown").split()


def make_tiny_blip(out: Path, seed: int = 0) -> Path:
    """A 1-layer BLIP captioner with a 40-word vocabulary, loadable by transformers' image-text-to-text pipeline."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig

    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    (out / "vocab.txt").write_text("\n".join(specials + list(TINY_BLIP_WORDS)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                          sep_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                    projection_dim=32))
    model.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(out)
    return out


def make_tiny_clip(out: Path, seed: int = 0) -> Path:
    from cir.backbone import create_backbone, save_backbone

    return save_backbone(create_backbone("tiny-clip-32", seed=seed), out)
