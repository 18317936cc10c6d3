"""Modification text written by a Hugging Face language model, through Beam's RunInference.

`--llm MODEL` (hub id or local directory) rewrites each triplet's modification text from its two captions:
the prompt (`--llm-prompt`, with `{ref}` and `{tgt}`) holds the reference and target captions, the model's
greedy continuation (first line, trimmed) becomes `mod`. The template text it replaces stays in the json
(`mod_template`), so an ablation can compare the two. Decoder-only models (GPT-2, Llama, Qwen, ...) run
through transformers' text-generation pipeline; encoder-decoder models (T5 / Flan-T5), which transformers 5
no longer has a pipeline for, through their own `generate`. An empty generation is a rejected candidate
(`llm_empty` in stats), never a silent fallback to the template.

`--caption-edit llm` (high quality, diffusers editor) asks the same model for the edit itself: the prompt
(`--llm-edit-prompt`, with `{caption}`) is answered as "instruction | edited caption", as InstructPix2Pix's
training data were written; `LLMCaptionEdit` turns the answer into editor candidates or a rejected reason.

Instruct / chat models answer best in their own chat format: with `--llm-chat auto` (default) a tokenizer that
has a chat template gets the prompt as one user message through it (base models, which have none, get the
plain prompt); `on` requires a template, `off` never uses one. The choice is resolved before the job and
recorded in the provenance (`chat`).

Beam's huggingface handlers import tensorflow (gone with transformers 5), so `LLMHandler` subclasses
`ModelHandler` itself, as the caption job's handlers do.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from synth.config import CHAT_MODES, DEFAULT_PROMPT
from synth.specs import REJECTED

QUOTES = "\"'`“”‘’"
LABEL_RE = re.compile(r"^(instruction|answer|output|edit)\s*:\s*", re.IGNORECASE)


def resolve_chat(model: str, mode: str) -> bool:
    """--llm-chat auto|on|off -> whether prompts go through the model's chat template (read from its tokenizer)."""
    if mode not in CHAT_MODES:
        raise ValueError(f"--llm-chat must be one of {CHAT_MODES}, got {mode!r}")
    if mode == "off":
        return False
    from transformers import AutoTokenizer

    has_template = bool(getattr(AutoTokenizer.from_pretrained(model), "chat_template", None))
    if mode == "on" and not has_template:
        raise ValueError(f"--llm-chat on: the tokenizer of {model} has no chat template (a base model? use auto or off)")
    return has_template


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def provenance(model: str, prompt: str, max_new_tokens: int, chat: bool) -> dict:
    """What the json of every LLM-written text records about how it was written."""
    return {"model": model, "prompt": prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy", "chat": chat}


def clean(text: str) -> str:
    """The model's first non-empty line, without a leading 'Instruction:' label or surrounding quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return LABEL_RE.sub("", line).strip().strip(QUOTES).strip()


class Seq2SeqGenerator:
    """prompt -> generated text for an encoder-decoder model (the job the old text2text pipeline did)."""

    def __init__(self, model: str, device: str, generate_kwargs: dict, chat: bool = False):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(model).to(device).eval()
        self.device, self.generate_kwargs, self.chat = device, generate_kwargs, chat

    def __call__(self, prompt: str) -> str:
        import torch

        if self.chat:  # the template writes the special tokens itself
            text = self.tokenizer.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)
            inputs = self.tokenizer(text, return_tensors="pt", truncation=True, add_special_tokens=False)
        else:
            inputs = self.tokenizer(prompt, return_tensors="pt", truncation=True)
        inputs = inputs.to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        return self.tokenizer.decode(out[0], skip_special_tokens=True)


class CausalGenerator:
    """prompt -> the continuation only, by transformers' text-generation pipeline (which applies the chat
    template itself when given messages)."""

    def __init__(self, model: str, device: str, generate_kwargs: dict, chat: bool = False):
        from transformers import pipeline

        self.pipe = pipeline("text-generation", model=model, device=device)
        self.generate_kwargs, self.chat = generate_kwargs, chat

    def __call__(self, prompt: str) -> str:
        out = self.pipe(messages(prompt) if self.chat else prompt, return_full_text=False, **self.generate_kwargs)
        return out[0]["generated_text"] if out else ""


class LLMHandler(ModelHandler[dict, str, Any]):
    """Example dict -> the model's raw text for `prompt` filled from the example (`fields`: prompt field ->
    example key; the default fills {ref} and {tgt} with a triplet spec's two captions). `chat`: the prompt
    goes through the model's chat template as a user message (see resolve_chat)."""

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, *, fields: Optional[dict[str, str]] = None,
                 max_new_tokens: int = 32, device: str = "cpu", batch_size: int = 8, chat: bool = False):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.model, self.prompt, self.device, self.chat = model, prompt, device, chat
        self.fields = fields or {"ref": "ref_caption", "tgt": "tgt_caption"}
        # Greedy: the same captions give the same text on every run (the pipeline's default samples).
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}

    def load_model(self):
        from transformers import AutoConfig

        seq2seq = getattr(AutoConfig.from_pretrained(self.model), "is_encoder_decoder", False)
        return (Seq2SeqGenerator if seq2seq else CausalGenerator)(self.model, self.device, self.generate_kwargs,
                                                                  self.chat)

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        # One prompt per call: RunInference's batches depend on bundle timing, and padding a prompt next to
        # longer ones can flip a greedy near-tie; alone, a prompt decodes the same way on every run.
        for spec in batch:
            yield PredictionResult(spec, model(self.format(spec)), self.model)

    def format(self, example: dict) -> str:
        return self.prompt.format(**{name: example[key] for name, key in self.fields.items()})

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(example[key]) for example in batch for key in self.fields.values())

    def get_metrics_namespace(self) -> str:
        return "llm"


class WithLLMText(beam.DoFn):
    """RunInference result -> the spec with the model's text as `mod`; an empty text is rejected."""

    def __init__(self, provenance: dict):
        self.provenance = provenance

    def process(self, result: PredictionResult) -> Iterator:
        spec, text = result.example, clean(result.inference)
        if not text:
            yield beam.pvalue.TaggedOutput(REJECTED, "llm_empty")
            return
        yield {**spec, "mod": text, "mod_template": spec["mod"], "method": f"{spec['method']}+llm",
               "provenance": {**spec.get("provenance", {}), "modtext": {"llm": self.provenance}}}


class LLMModText(beam.PTransform):
    """Specs -> specs whose modification text the LLM wrote, plus rejected reasons (tag REJECTED)."""

    def __init__(self, model: str, prompt: str, max_new_tokens: int, device: str, batch_size: int,
                 chat: bool = False):
        super().__init__()
        self.handler = LLMHandler(model, prompt, max_new_tokens=max_new_tokens, device=device, batch_size=batch_size,
                                  chat=chat)
        self.fn = WithLLMText(provenance(model, prompt, max_new_tokens, chat))

    def expand(self, specs):
        from apache_beam.ml.inference.base import RunInference

        return (specs | "Generate" >> RunInference(self.handler)
                | "WithText" >> beam.ParDo(self.fn).with_outputs(REJECTED, main="specs"))


# ------------------------------------------------------------------------------------------ caption edits

def parse_edit(text: str, caption: str) -> tuple[Optional[tuple[str, str]], str]:
    """'instruction | edited caption' -> ((instruction, edited), '') or (None, rejected reason)."""
    instruction, sep, edited = clean(text).partition("|")
    instruction, edited = instruction.strip().strip(QUOTES).strip(), edited.strip().strip(QUOTES).strip()
    if not sep or not instruction or not edited:
        return None, "llm_unparsable"
    if edited.lower() == caption.strip().lower():
        return None, "llm_no_change"
    return (instruction, edited), ""


def edit_request(item: tuple[str, dict]) -> dict:
    key, sample = item
    return {"source_key": key, "sample": sample, "caption": sample["caption"]}


class LLMCaptionEdit(beam.DoFn):
    """RunInference result on a source -> `samples_per_source` edit candidates (the shape CaptionEdit yields:
    the instruction and edited caption are the model's; seeds and guidance scales drawn as there)."""

    def __init__(self, provenance: dict, samples_per_source: int, seed: int, text_guidance: tuple,
                 image_guidance: tuple):
        self.provenance = provenance
        self.samples, self.seed = samples_per_source, seed
        self.text_guidance, self.image_guidance = text_guidance, image_guidance

    def process(self, result: PredictionResult) -> Iterator:
        import random

        request = result.example
        parsed, reason = parse_edit(result.inference, request["caption"])
        if parsed is None:
            yield beam.pvalue.TaggedOutput(REJECTED, reason)
            return
        instruction, edited = parsed
        rng = random.Random(f"{self.seed}:caption-edit:{request['source_key']}")
        for i in range(self.samples):
            yield {"source_key": request["source_key"], "sample": request["sample"], "caption": request["caption"],
                   "edited_caption": edited, "instruction": instruction, "llm_edit": self.provenance,
                   "candidate": i, "edit_seed": rng.randrange(2**31), "guidance": rng.choice(self.text_guidance),
                   "image_guidance": rng.choice(self.image_guidance)}
