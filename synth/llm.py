"""Modification text written by a Hugging Face language model, through Beam's RunInference.

`--llm MODEL` (hub id or local directory) rewrites each triplet's modification text from its two captions:
the prompt (`--llm-prompt`, with `{ref}` and `{tgt}`) holds the reference and target captions, the model's
greedy continuation (first line, trimmed) becomes `mod`. The template text it replaces stays in the json
(`mod_template`), so an ablation can compare the two. Decoder-only models (GPT-2, Llama, Qwen, ...) run
through transformers' text-generation pipeline; encoder-decoder models (T5 / Flan-T5), which transformers 5
no longer has a pipeline for, through their own `generate`. An empty generation is a rejected candidate
(`llm_empty` in stats), never a silent fallback to the template.

Beam's huggingface handlers import tensorflow (gone with transformers 5), so `LLMModTextHandler` subclasses
`ModelHandler` itself, as the caption job's handlers do.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

DEFAULT_PROMPT = ("Two images are described below. Write a short instruction that turns the first image into "
                  "the second.\nFirst image: {ref}\nSecond image: {tgt}\nInstruction:")
REJECTED = "rejected"
QUOTES = "\"'`“”‘’"
LABEL_RE = re.compile(r"^(instruction|answer|output)\s*:\s*", re.IGNORECASE)


def check_prompt(prompt: str) -> None:
    """The prompt must show the model both captions; anything else in braces is an error, not a KeyError later."""
    try:
        prompt.format(ref="R", tgt="T")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"--llm-prompt may only use the fields {{ref}} and {{tgt}} ({err!r}); "
                         "write literal braces as {{ and }}") from None
    if "{ref}" not in prompt or "{tgt}" not in prompt:
        raise ValueError("--llm-prompt must contain both {ref} (reference caption) and {tgt} (target caption)")


def clean(text: str) -> str:
    """The model's first non-empty line, without a leading 'Instruction:' label or surrounding quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return LABEL_RE.sub("", line).strip().strip(QUOTES).strip()


class Seq2SeqGenerator:
    """prompt -> generated text for an encoder-decoder model (the job the old text2text pipeline did)."""

    def __init__(self, model: str, device: str, generate_kwargs: dict):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(model).to(device).eval()
        self.device, self.generate_kwargs = device, generate_kwargs

    def __call__(self, prompt: str) -> str:
        import torch

        inputs = self.tokenizer(prompt, return_tensors="pt", truncation=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        return self.tokenizer.decode(out[0], skip_special_tokens=True)


class CausalGenerator:
    """prompt -> the continuation only, by transformers' text-generation pipeline."""

    def __init__(self, model: str, device: str, generate_kwargs: dict):
        from transformers import pipeline

        self.pipe = pipeline("text-generation", model=model, device=device)
        self.generate_kwargs = generate_kwargs

    def __call__(self, prompt: str) -> str:
        out = self.pipe(prompt, return_full_text=False, **self.generate_kwargs)
        return out[0]["generated_text"] if out else ""


class LLMModTextHandler(ModelHandler[dict, str, Any]):
    """Triplet spec -> raw generated modification text for its (ref_caption, tgt_caption)."""

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, *, max_new_tokens: int = 32, device: str = "cpu",
                 batch_size: int = 8):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.model, self.prompt, self.device = model, prompt, device
        # Greedy: the same captions give the same text on every run (the pipeline's default samples).
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}

    def load_model(self):
        from transformers import AutoConfig

        seq2seq = getattr(AutoConfig.from_pretrained(self.model), "is_encoder_decoder", False)
        return (Seq2SeqGenerator if seq2seq else CausalGenerator)(self.model, self.device, self.generate_kwargs)

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        # One prompt per call: RunInference's batches depend on bundle timing, and padding a prompt next to
        # longer ones can flip a greedy near-tie; alone, a prompt decodes the same way on every run.
        for spec in batch:
            yield PredictionResult(spec, model(self.format(spec)), self.model)

    def format(self, spec: dict) -> str:
        return self.prompt.format(ref=spec["ref_caption"], tgt=spec["tgt_caption"])

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(s["ref_caption"]) + len(s["tgt_caption"]) for s in batch)

    def get_metrics_namespace(self) -> str:
        return "llm_modtext"


class WithLLMText(beam.DoFn):
    """RunInference result -> the spec with the model's text as `mod`; an empty text is rejected."""

    def __init__(self, model: str, prompt: str, max_new_tokens: int):
        self.provenance = {"model": model, "prompt": prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy"}

    def process(self, result: PredictionResult) -> Iterator:
        spec, text = result.example, clean(result.inference)
        if not text:
            yield beam.pvalue.TaggedOutput(REJECTED, "llm_empty")
            return
        yield {**spec, "mod": text, "mod_template": spec["mod"], "method": f"{spec['method']}+llm",
               "provenance": {**spec.get("provenance", {}), "modtext": {"llm": self.provenance}}}


class LLMModText(beam.PTransform):
    """Specs -> specs whose modification text the LLM wrote, plus rejected reasons (tag REJECTED)."""

    def __init__(self, model: str, prompt: str, max_new_tokens: int, device: str, batch_size: int):
        super().__init__()
        self.handler = LLMModTextHandler(model, prompt, max_new_tokens=max_new_tokens, device=device,
                                         batch_size=batch_size)
        self.fn = WithLLMText(model, prompt, max_new_tokens)

    def expand(self, specs):
        from apache_beam.ml.inference.base import RunInference

        return (specs | "Generate" >> RunInference(self.handler)
                | "WithText" >> beam.ParDo(self.fn).with_outputs(REJECTED, main="specs"))
