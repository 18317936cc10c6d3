"""Tiny random models built from configs, saved to local directories: offline stand-ins for real ones
(tests and benchmarks; never a substitute for a model a user named). Not part of the library."""
from __future__ import annotations

import re
from pathlib import Path

TINY_BLIP_WORDS = ("a the of on in and picture photo image small large red green blue yellow purple white "
                   "circle square triangle cross left right middle background gray black brown").split()


def _letters(i: int) -> str:
    """0 -> 'qaaaa', 1 -> 'qaaab', ...: distinct filler words of letters only."""
    word = ""
    for _ in range(4):
        i, r = divmod(i, 26)
        word = chr(97 + r) + word
    return "q" + word


def _word_tokenizer(out: Path, size: int = 0, **kwargs):
    """A BERT word-piece tokenizer over the tiny words (+ specials), its vocab.txt written to `out`: random
    models built on it generate readable word soup, which keeps tests' outputs legible. `size`: filler words
    (qaaaa, qaaab, ...: letters, as words are) pad the vocabulary to a real model's embedding size."""
    from transformers import BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    words = specials + list(TINY_BLIP_WORDS)
    words += [_letters(i) for i in range(size - len(words))]
    (out / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizer(str(out / "vocab.txt"), **kwargs)


# Model configs as data: the tiny defaults below; bench/fullsize.py passes the real architectures' (BLIP-base,
# Stable Diffusion 1.5's UNet/VAE/text encoder, Qwen2-0.5B) to the same builders.
TINY_BLIP = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "image_size": 32, "patch_size": 8, "projection_dim": 32, "initializer_range": 0.02},
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "encoder_hidden_size": 32, "max_position_embeddings": 64},
             "projection_dim": 32, "vocab_size": 0,  # 0: the tiny words only
             # BLIP's vision initializer_range (1e-10) makes a random tower's output the same for every image;
             # image_gain scales the decoder's cross-attention, so that a random captioner's words depend on the image
             "image_gain": 5.0}


def make_tiny_blip(out: Path, seed: int = 0, config: dict = TINY_BLIP) -> Path:
    """A random BLIP captioner (1 layer, 40 words by default) whose captions differ with the image (config's
    comments), loadable by transformers' image-text-to-text pipeline."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig

    tokenizer = _word_tokenizer(out, config["vocab_size"], bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    vision = BlipVisionConfig(**config["vision"])
    text = BlipTextConfig(vocab_size=len(tokenizer), **config["text"], bos_token_id=tokenizer.bos_token_id,
                          pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                    projection_dim=config["projection_dim"]))
    with torch.no_grad():  # a random decoder hardly hears its cross-attention: amplified, captions follow the image
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight.mul_(config.get("image_gain", 1.0))
            layer.crossattention.output.dense.weight.mul_(config.get("image_gain", 1.0))
    model.save_pretrained(out)
    side = vision.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                  tokenizer=tokenizer).save_pretrained(out)
    return out


def make_tiny_clip(out: Path, seed: int = 0) -> Path:
    from cir.backbone import create_backbone, save_backbone

    return save_backbone(create_backbone("tiny-clip-32", seed=seed), out)


def clip_tokenizer_files(out: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, made from open_clip's bundled BPE (offline)."""
    import gzip
    import json

    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    out.mkdir(parents=True, exist_ok=True)
    encoder = dict(SimpleTokenizer().encoder)
    # open_clip and transformers name the two special tokens differently; the ids are the same.
    encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
    encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
    (out / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    merges = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


TINY_IP2P = {
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "vae": {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32},
    "unet": {"sample_size": 16, "layers_per_block": 1, "block_out_channels": (16, 32),
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 4, "norm_num_groups": 8}}


def make_tiny_instruct_pix2pix(out: Path, seed: int = 0, config: dict = TINY_IP2P) -> Path:
    """A random StableDiffusionInstructPix2PixPipeline (its UNet with 8 input channels: the noisy latents and the
    source image's), saved locally; CLIP's BPE tokenizer (offline, from open_clip's vocabulary)."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = clip_tokenizer_files(out.parent / f"{out.name}-tokenizer")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                **config["text_encoder"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **config["vae"])
    unet = UNet2DConditionModel(in_channels=8, out_channels=4, **config["unet"])
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def _words_only(model, tokenizer):
    """A random LM at the usual init emits special tokens (an empty text); forbid them in its generation
    config and insist on a few words, so the tiny model writes something to test with."""
    model.generation_config.suppress_tokens = [i for i in tokenizer.all_special_ids if i != tokenizer.sep_token_id]
    model.generation_config.min_new_tokens = 3
    return model


def make_tiny_causal_lm(out: Path, seed: int = 0) -> Path:
    """A 2-layer random GPT-2 on the tiny word vocabulary, loadable by transformers' text-generation pipeline."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _word_tokenizer(out, model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.5,
                                       tie_word_embeddings=False))
    _words_only(model, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_seq2seq_lm(out: Path, seed: int = 0) -> Path:
    """A 1-layer random T5 (encoder-decoder, as Flan-T5) on the tiny word vocabulary."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _word_tokenizer(out, model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=20.0, tie_word_embeddings=False))
    _words_only(model, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TINY_QWEN2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 0}  # 0: the tokenizer's own size
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's ChatML


def make_qwen2_lm(out: Path, seed: int = 0, config: dict = TINY_QWEN2) -> Path:
    """A random Qwen2-style decoder with a ChatML chat template, as instruct LLMs ship, and a byte-level BPE
    tokenizer trained here on the tiny words (offline). A real model's `vocab_size` is larger than that
    tokenizer: the ids it cannot decode are suppressed in the generation config, so the text is words."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(TINY_BLIP_WORDS[i:] + TINY_BLIP_WORDS[:i]) for i in range(len(TINY_BLIP_WORDS))]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    n = len(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**config, "vocab_size": config["vocab_size"] or n},
                                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    # Words only (no stray bytes, no specials but the end of the answer), and no id the tokenizer lacks.
    words = {i for i in range(n) if re.fullmatch(r" ?[a-z]+", tokenizer.decode([i]))} | {tokenizer.eos_token_id}
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i not in words]
    model.generation_config.min_new_tokens = 3
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
