"""The synth job's settings: one dataclass, whose fields are also its command-line flags (cir.config.add_arguments:
`pairs_per_image` is `--pairs-per-image`, with the help and range written here). The dataset card records it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cir.config import ranged
from pipeline.neardup import ExcludeConfig
from synth.modtext import SPANS

KNN_MODES = ("auto", "global", "sharded")  # auto: resolved by synth.job.resolve_knn before the job
CHAT_MODES = ("auto", "on", "off")
DEFAULT_PROMPT = ("Two images are described below. Write a short instruction that turns the first image into "
                  "the second.\nFirst image: {ref}\nSecond image: {tgt}\nInstruction:")
DEFAULT_EDIT_PROMPT = ("Write an edit for the image described below, as: instruction | caption after the "
                       "edit.\nImage: {caption}\nEdit:")

MODTEXT_FIELDS = {"ref": "reference caption", "tgt": "target caption"}
EDIT_FIELDS = {"caption": "the source caption"}


def check_prompt(prompt: str, fields: dict[str, str], flag: str = "--llm-prompt") -> None:
    """The prompt must use every field (name -> what it is) and no other: a clear error, not a KeyError later."""
    try:
        prompt.format(**{name: name for name in fields})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{flag} may only use the fields {', '.join('{' + f + '}' for f in fields)} ({err!r}); "
                         "write literal braces as {{ and }}") from None
    missing = [f"{{{name}}} ({what})" for name, what in fields.items() if f"{{{name}}}" not in prompt]
    if missing:
        raise ValueError(f"{flag} must contain {' and '.join(missing)}")


@dataclass
class SynthConfig(ExcludeConfig):
    """--exclude and the near-duplicate thresholds (pipeline.neardup.ExcludeConfig): caption samples whose image
    duplicates an excluded one are dropped before anything is mined or edited."""
    input: str = ranged("", help="caption dataset directory")
    output: str = ranged("", help="triplet dataset directory")
    quality: str = ranged("low", choices=("low", "high"),
                          help="low: mined pairs of real images; high: edited images, filtered")
    num_triplets: Optional[int] = ranged(None, min=1, help="keep at most this many (chosen by seed); default: all "
                                                           "candidates")
    seed: int = ranged(0, help="drives selection, phrasings and edits")
    shard_size: int = ranged(1000, min=1, help="target triplets per shard")
    shard_prefix: str = ranged("part", help="shard file names: PREFIX-00000.tar ...")
    # low quality: mining
    image_weight: float = ranged(0.5, min=0, max=1, help="mining similarity = w * cos(image emb) + (1 - w) * "
                                                         "cos(caption tf-idf)")
    band_low: float = ranged(0.5, help="keep pairs with similarity >= this (not unrelated) ...")
    band_high: float = ranged(0.98, help="... and <= this (not near-duplicates)")
    neighbours: int = ranged(8, min=1, help="k of the k-NN search")
    pairs_per_image: int = ranged(1, min=1, help="targets per reference")
    hard_negatives: int = ranged(3, min=0, help="other neighbours stored as hard negative keys")
    max_changes: int = ranged(2, min=1, help="caption diffs with more changed spans are rejected")
    mod_span: str = ranged("words", choices=SPANS,
                           help="what a modification text's clause names: words: the changed words alone "
                                "('replace red with blue'); phrase: the phrase around them ('replace the red car "
                                "with a blue car'); measured alike on the toy CIRR and CIRCO (docs/reports/CLAIMS.md)")
    text_dim: int = ranged(1024, min=1, help="hashed TF-IDF size")
    exact_max: int = ranged(50_000, min=1, help="--knn global: exact k-NN (quadratic) up to this many images, "
                                                "faiss IVF (near-linear) above")
    knn: str = ranged("auto", choices=KNN_MODES,
                      help="global: every embedding in one worker (to ~1M); sharded: an IVF join spread over the "
                           "workers (lists by k-means on a sample, grouped by list), for larger datasets; auto: "
                           "global up to --global-max images, sharded above")
    global_max: int = ranged(1_000_000, min=1, help="--knn auto: the most images for global (1M: minutes and a "
                                                    "few GB, docs/SYNTH.md)")
    nprobe: int = ranged(16, min=1, help="IVF lists searched per query (faiss IVF and sharded)")
    nlist: Optional[int] = ranged(None, min=1, help="IVF lists (default 4 sqrt(N), at most 4096)")
    # high quality: editing
    editor: str = ranged("toy", help="high quality: 'toy' (exact toy-world editor) or an InstructPix2Pix model id "
                                     "/ directory (diffusers)")
    toy_coarse_fraction: float = ranged(0.0, min=0, max=1,
                                        help="--editor toy: share of the colour/shape/position/background edits "
                                             "described coarsely ('give the circle another colour': any other "
                                             "value answers it), so that the data holds one-to-many texts")
    clip: Optional[str] = ranged(None, help="CLIP for keyword swaps and filters (required by the diffusers editor)")
    clip_pretrained: Optional[str] = ranged(None, help="open_clip tag or weights file for --clip")
    samples_per_source: int = ranged(2, min=1, help="edited candidates per source image (seeds and guidance "
                                                    "scales differ)")
    text_guidance: list[float] = ranged([5.0, 7.5, 10.0], item_gt=0,
                                        help="InstructPix2Pix text guidance scales each candidate draws one of "
                                             "(its usual range); candidates that share both scales are edited in "
                                             "one batch, so one value of each batches every candidate")
    image_guidance: list[float] = ranged([1.2, 1.5, 1.8], item_gt=0, help="image guidance scales: see --text-guidance")
    keep_per_source: int = ranged(1, min=1, help="best candidates kept per source (by directional similarity)")
    swap_low: float = ranged(0.5, help="keyword swaps need CLIP text similarity in [swap_low, swap_high]")
    swap_high: float = ranged(0.7, help="see --swap-low")
    min_image_image: float = ranged(0.70, help="filter: CLIP image-image similarity of source and edit (the "
                                               "InstructPix2Pix / CompoDiff defaults, as the next two)")
    min_caption_image: float = ranged(0.2, help="filter: CLIP similarity of the edited caption and the edit")
    min_directional: float = ranged(0.2, help="filter: CLIP directional similarity")
    steps: int = ranged(20, min=1, help="diffusion steps")
    device: str = ranged("cpu", help="torch device for the editor, its CLIP and the language model")
    batch_size: int = ranged(4, min=1, help="editor / LLM batch size (RunInference)")
    # both: modification text by a language model instead of templates (synth.llm)
    llm: Optional[str] = ranged(None, help="write modification texts with this Hugging Face language model (hub "
                                           "id or directory; causal or encoder-decoder) instead of templates")
    llm_prompt: str = ranged(DEFAULT_PROMPT, help="prompt with {ref} and {tgt} (the two captions)")
    llm_max_new_tokens: int = ranged(32, min=1, help="the most tokens the language model writes")
    llm_chat: str = ranged("auto", choices=CHAT_MODES,
                           help="send the prompt as a user message through the model's chat template (instruct "
                                "models): auto = when its tokenizer has one")
    caption_edit: str = ranged("swap", choices=("swap", "llm"),
                               help="high quality with the diffusers editor: keyword swap, or --llm writes the "
                                    "instruction and the edited caption (its instruction is the modification text)")
    llm_edit_prompt: str = ranged(DEFAULT_EDIT_PROMPT, help="prompt with {caption}; the model answers "
                                                            "'instruction | edited caption'")
