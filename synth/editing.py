"""High-quality triplets for real data: caption edit -> InstructPix2Pix edit -> CLIP filters.

1. `CaptionEdit`: a keyword of the caption is swapped for another word of the dataset's vocabulary whose
   CLIP text similarity to it lies in a band (default 0.5-0.7: related, not the same); the instruction is
   written from the caption diff by `synth.modtext`. (Or `--caption-edit llm`: a language model writes the
   instruction and the edited caption, `synth.llm.LLMCaptionEdit`.) `samples_per_source` candidates per source, each with
   its own seed and guidance scales drawn from `--text-guidance` and `--image-guidance`.
2. `InstructPix2PixHandler`: diffusers' StableDiffusionInstructPix2PixPipeline, through RunInference, on
   batches of candidates that share guidance scales (`batch_group` -> GroupByKey -> `edit_batches`).
3. `ClipFilter`: InstructPix2Pix / CompoDiff filters: image-image cos >= 0.70, edited caption-image cos >= 0.2,
   directional cos(E_I(tgt) - E_I(ref), E_T(edited) - E_T(caption)) >= 0.2; the best `keep_per_source`
   (by directional similarity) of each source survive. Every score goes into the triplet's json.
"""
from __future__ import annotations

import io
import random
import re
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from PIL import Image

from cir import dataset as ds
from synth.modtext import modification_text
from synth.specs import REJECTED, SCORED, image_fields

STOPWORDS = set("""a an the of on in at to and or with without for from by is are was were be been it its this that
these those there here some any two three four five one very photo picture image close up top front side back
next near over under into onto while his her their our your my""".split())
WORD_RE = re.compile(r"[a-z]+")


def vocabulary(captions: Iterable[str], size: int = 2000, min_count: int = 2) -> list[str]:
    """The dataset's most frequent content words: the pool that keyword swaps draw from."""
    counts = Counter(w for c in captions for w in WORD_RE.findall(c.lower()) if w not in STOPWORDS and len(w) > 2)
    return sorted(w for w, n in counts.most_common(size) if n >= min_count)


def _encode_texts(backbone, texts: list[str], device: str = "cpu"):
    import torch

    from cir.mapping import encode_text

    with torch.no_grad():
        return encode_text(backbone.model, backbone.tokenizer(texts).to(device)).float().cpu().numpy()


class CaptionEdit(beam.DoFn):
    """(key, source sample) -> candidate edits {key, source, caption, edited_caption, instruction, seed, ...}."""

    def __init__(self, vocab: list[str], clip: str, clip_pretrained: Optional[str], band: tuple[float, float],
                 samples_per_source: int, seed: int, guidance: tuple[list, list], max_tries: int = 8,
                 mod_span: str = "words", device: str = "cpu"):
        self.vocab, self.clip, self.clip_pretrained, self.device = vocab, clip, clip_pretrained, device
        self.band, self.samples, self.seed, self.max_tries = band, samples_per_source, seed, max_tries
        self.mod_span = mod_span  # synth.modtext: what the instruction names
        self.guidance = guidance  # (text scales, image scales): each candidate draws one of each

    def setup(self):
        from cir.backbone import create_backbone

        backbone = create_backbone(self.clip, self.clip_pretrained, device=self.device)
        backbone.model.eval()
        self.word_emb = dict(zip(self.vocab, _encode_texts(backbone, self.vocab, self.device)))  # word -> [d]

    def process(self, item: tuple[str, dict]) -> Iterator:
        key, sample = item
        rng = random.Random(f"{self.seed}:caption-edit:{key}")
        words = [w for w in dict.fromkeys(WORD_RE.findall(sample["caption"].lower())) if w in self.word_emb]
        swaps = []
        for word in rng.sample(words, min(len(words), self.max_tries)):
            sims = {w: float(self.word_emb[word] @ e) for w, e in self.word_emb.items() if w != word}
            options = sorted(w for w, s in sims.items() if self.band[0] <= s <= self.band[1])
            if options:
                swaps.append((word, rng.choice(options), sims))
                break
        if not swaps:
            yield beam.pvalue.TaggedOutput(REJECTED, "no_keyword_swap")
            return
        word, new, sims = swaps[0]
        edited = re.sub(rf"\b{re.escape(word)}\b", new, sample["caption"], count=1, flags=re.IGNORECASE)
        instruction, _, reason = modification_text(sample["caption"], edited, rng, span=self.mod_span)
        if instruction is None:
            yield beam.pvalue.TaggedOutput(REJECTED, reason)
            return
        for i in range(self.samples):
            yield {"source_key": key, "sample": sample, "caption": sample["caption"], "edited_caption": edited,
                   "instruction": instruction, "swap": {"from": word, "to": new, "text_similarity": round(sims[new], 4)},
                   "candidate": i, "edit_seed": rng.randrange(2**31), "guidance": rng.choice(self.guidance[0]),
                   "image_guidance": rng.choice(self.guidance[1])}


def model_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is the model's native `side` (Stable Diffusion 1.5: 512), both
    multiples of 8 (the VAE's downsampling): a diffusion model edits well near the size it was trained at, and a
    1024 px photo costs it 4x the UNet work and 16x the attention memory of 512."""
    scale = side / max(size)
    return tuple(max(8, round(n * scale / 8) * 8) for n in size)


def editor_dtype(device: str):
    """The editor's weights: fp16 on an accelerator (Stable Diffusion's usual inference precision, half the
    memory), fp32 on the CPU (whose fp16 kernels are slow)."""
    import torch

    return torch.float32 if str(device).startswith("cpu") else torch.float16


def batch_group(candidate: dict) -> tuple[tuple[int, float, float], dict]:
    """A candidate keyed by what its pipeline call must share with its batch neighbours: the guidance scales
    (one pair per diffusers call) and, so that batches are fixed by the data alone, its source's shard."""
    return (candidate["sample"]["shard"], candidate["guidance"], candidate["image_guidance"]), candidate


def _pixel_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size  # the header only: PIL decodes pixels on first access


def edit_batches(element, batch_size: int) -> Iterator[list[dict]]:
    """(group, its candidates) -> lists of at most `batch_size` candidates, each one editor call.

    The order (reference size, source key, candidate number) depends only on the group's contents, so a
    candidate is denoised beside the same neighbours on every run and every runner (a batched UNet's low bits
    depend on the batch), and references of one size lie together (one call edits one size)."""
    _, group = element
    ordered = sorted(group, key=lambda c: (_pixel_size(c["sample"]["image"]), c["source_key"], c["candidate"]))
    for i in range(0, len(ordered), batch_size):
        yield ordered[i:i + batch_size]


class InstructPix2PixHandler(ModelHandler[list, bytes, object]):
    """diffusers' InstructPix2Pix (hub id or local directory): a batch from `edit_batches` (candidates sharing
    guidance scales) -> edited image as PNG bytes per candidate.

    Each candidate keeps its own seed (a generator per row draws its initial and ancestral noise). The
    references are edited at the model's native size (`model_size`), those of one size in one pipeline call,
    and each edit is resized back to its reference's size, so the triplet's two images match."""

    def __init__(self, model: str, *, steps: int = 20, device: str = "cpu"):
        # RunInference hands over one batch from edit_batches at a time: its own batching depends on bundle timing
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.model, self.steps, self.device = model, steps, device

    def load_model(self):
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(self.model, safety_checker=None,
                                                                      requires_safety_checker=False,
                                                                      torch_dtype=editor_dtype(self.device))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def run_inference(self, batch: Sequence[list], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        side = model.unet.config.sample_size * model.vae_scale_factor
        for candidates in batch:
            refs = [Image.open(io.BytesIO(c["sample"]["image"])).convert("RGB") for c in candidates]
            by_size: dict[tuple[int, int], list[int]] = {}  # model size -> rows, in the batch's order
            for i, ref in enumerate(refs):
                by_size.setdefault(model_size(ref.size, side), []).append(i)
            edited: dict[int, Image.Image] = {}
            for size, rows in by_size.items():
                edited.update(zip(rows, self._edit(model, [candidates[i] for i in rows],
                                                   [refs[i].resize(size, Image.BICUBIC) for i in rows])))
            for i, (c, ref) in enumerate(zip(candidates, refs)):
                buf = io.BytesIO()
                edited[i].resize(ref.size, Image.BICUBIC).save(buf, format="PNG")
                yield PredictionResult(c, buf.getvalue(), self.model)

    def _edit(self, model, candidates: list[dict], images: list[Image.Image]) -> list[Image.Image]:
        """One pipeline call: candidates with the same guidance scales, images of the same size."""
        import torch

        return model(prompt=[c["instruction"] for c in candidates], image=images, num_inference_steps=self.steps,
                     guidance_scale=candidates[0]["guidance"], image_guidance_scale=candidates[0]["image_guidance"],
                     generator=[torch.Generator().manual_seed(c["edit_seed"]) for c in candidates],
                     output_type="pil").images

    def get_num_bytes(self, batch: Sequence[list]) -> int:
        return sum(len(c["sample"]["image"]) for candidates in batch for c in candidates)


def with_target(result) -> dict:
    return {**result.example, "tgt_image": result.inference}


class ClipFilter(beam.DoFn):
    """(source key, [edited candidates]) -> at most `keep` specs that pass every threshold."""

    def __init__(self, clip: str, clip_pretrained: Optional[str], thresholds: dict, keep: int, seed: int,
                 editor: str, device: str = "cpu"):
        self.clip, self.clip_pretrained, self.thresholds = clip, clip_pretrained, thresholds
        self.keep, self.seed, self.editor, self.device = keep, seed, editor, device

    def setup(self):
        from cir.backbone import create_backbone

        self.backbone = create_backbone(self.clip, self.clip_pretrained, device=self.device)
        self.backbone.model.eval()

    def _images(self, blobs: list[bytes]) -> np.ndarray:
        import torch

        from cir.backbone import preprocess_batch

        pixels = preprocess_batch(self.backbone.preprocess, [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs])
        with torch.no_grad():
            return self.backbone.model.encode_image(pixels.to(self.device), normalize=True).float().cpu().numpy()

    def process(self, element) -> Iterator:
        source_key, candidates = element
        candidates = sorted(candidates, key=lambda c: c["candidate"])
        ref = self._images([candidates[0]["sample"]["image"]])[0]
        tgts = self._images([c["tgt_image"] for c in candidates])
        texts = _encode_texts(self.backbone, [candidates[0]["caption"]] + [c["edited_caption"] for c in candidates],
                              self.device)
        passed = []
        for c, tgt, edited in zip(candidates, tgts, texts[1:]):
            d_img, d_txt = tgt - ref, edited - texts[0]
            scores = {"image_image": float(ref @ tgt), "caption_image": float(edited @ tgt),
                      "directional": float(d_img @ d_txt / max(np.linalg.norm(d_img) * np.linalg.norm(d_txt), 1e-8))}
            failing = [name for name, low in self.thresholds.items() if scores[name] < low]
            if failing:
                yield beam.pvalue.TaggedOutput(REJECTED, f"below_{failing[0]}")
                yield self._scored(source_key, c, scores, f"below_{failing[0]}")
                continue
            passed.append((scores, c))
        passed.sort(key=lambda sc: -sc[0]["directional"])
        for scores, c in passed[: self.keep]:
            yield self._scored(source_key, c, scores, "")
            tgt_key = ds.content_key(c["tgt_image"])
            yield {"key": ds.content_key(f"{source_key}|{c['candidate']}|ip2p|{self.seed}".encode()),
                   "ref_key": source_key, "tgt_key": tgt_key, "ref_caption": c["caption"],
                   "tgt_caption": c["edited_caption"], "mod": c["instruction"], "quality": "high",
                   "method": "instructpix2pix-clip-filtered", "shard": c["sample"]["shard"],
                   "scores": {k: round(v, 4) for k, v in scores.items()}, "hard_negatives": [], "seed": self.seed,
                   "tgt_image": c["tgt_image"], "tgt_ext": "png", **image_fields("ref", c["sample"]),
                   "provenance": {"editor": self.editor, "clip": self.clip, "thresholds": self.thresholds,
                                  **{k: c[k] for k in ("swap", "llm_edit") if k in c},  # how the caption changed
                                  "edit_seed": c["edit_seed"], "guidance": c["guidance"],
                                  "image_guidance": c["image_guidance"]}}
        for scores, c in passed[self.keep:]:
            yield beam.pvalue.TaggedOutput(REJECTED, "beyond_keep_per_source")
            yield self._scored(source_key, c, scores, "beyond_keep_per_source")

    @staticmethod
    def _scored(source_key: str, c: dict, scores: dict, rejected: str):
        """A candidate's scores for filter_scores.parquet, keyed by its source's shard; `rejected` "" if kept."""
        return beam.pvalue.TaggedOutput(SCORED, (c["sample"]["shard"], {
            "ref_key": source_key, "candidate": c["candidate"], "kept": not rejected, "rejected": rejected,
            **{k: round(v, 4) for k, v in scores.items()}}))
