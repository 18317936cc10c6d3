"""Modification text by a language model (synth.llm): the prompt holds both captions, the model's greedy text
becomes `mod` (template kept beside it), empty texts are rejected, bad prompts are clear errors."""
from __future__ import annotations

import json

import pytest
from apache_beam.ml.inference.base import PredictionResult

from synth.config import DEFAULT_PROMPT
from synth.job import run
from synth.llm import REJECTED, LLMHandler, WithLLMText, clean, provenance
from tests.test_synth import BEAM, triplets

LOW = ["--quality", "low", "--image-weight", "0", "--band-low", "0.3", "--seed", "1"]


def by_key(out) -> dict[str, tuple[str, dict]]:
    return {t["__key__"]: (t["mod.txt"].decode(), json.loads(t["json"])) for t in triplets(out)}


def test_llm_writes_the_modification_text_from_both_captions(toy_captions, tiny_causal_lm, tmp_path):
    from transformers import pipeline

    template_out, out = tmp_path / "template", tmp_path / "llm"
    run(["--input", str(toy_captions[0]), "--output", str(template_out), *LOW, *BEAM])
    stats = run(["--input", str(toy_captions[0]), "--output", str(out), *LOW, "--llm", str(tiny_causal_lm),
                 "--llm-max-new-tokens", "6", *BEAM])
    rows, template_rows = by_key(out), by_key(template_out)
    assert stats["written"] == len(rows) > 10
    assert set(rows) <= set(template_rows)  # same pairs; only the text differs
    generate = pipeline("text-generation", model=str(tiny_causal_lm))
    for key, (mod, meta) in rows.items():
        prompt = DEFAULT_PROMPT.format(ref=meta["ref_caption"], tgt=meta["tgt_caption"])
        expected = clean(generate(prompt, return_full_text=False, max_new_tokens=6, do_sample=False)[0]
                         ["generated_text"])
        assert mod == expected and mod
        assert meta["mod_template"] == template_rows[key][0] != mod
        assert meta["method"] == "mined-template+llm"
        assert meta["provenance"]["modtext"]["llm"] == {"model": str(tiny_causal_lm), "prompt": DEFAULT_PROMPT,
                                                        "max_new_tokens": 6, "decoding": "greedy",
                                                        "chat": False}  # a base model: no chat template
    card = json.loads((out / "dataset.json").read_text())
    assert card["models"]["llm"] == str(tiny_causal_lm)
    again = tmp_path / "again"
    run(["--input", str(toy_captions[0]), "--output", str(again), *LOW, "--llm", str(tiny_causal_lm),
         "--llm-max-new-tokens", "6", *BEAM])
    assert by_key(again) == rows  # greedy, one prompt at a time: same text every run


def test_encoder_decoder_models_generate_through_their_own_generate(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tests.tiny_models import make_tiny_seq2seq_lm
    from synth.llm import Seq2SeqGenerator

    path = make_tiny_seq2seq_lm(tmp_path / "t5")
    handler = LLMHandler(str(path), "from {ref} to {tgt}:", max_new_tokens=5)
    model = handler.load_model()
    assert isinstance(model, Seq2SeqGenerator)
    specs = [{"ref_caption": "a red circle", "tgt_caption": "a blue circle"},
             {"ref_caption": "a green cross", "tgt_caption": "a green cross on the left"}]
    results = list(handler.run_inference(specs, model))
    tokenizer, t5 = AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path)
    for spec, result in zip(specs, results):
        ids = t5.generate(**tokenizer(f"from {spec['ref_caption']} to {spec['tgt_caption']}:", return_tensors="pt"),
                          max_new_tokens=5, do_sample=False)
        assert result.example is spec
        assert result.inference == tokenizer.decode(ids[0], skip_special_tokens=True) != ""


CHAT_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP]{% endfor %}"
                 "{% if add_generation_prompt %} circle : {% endif %}")


def with_chat_template(model, out):
    """A copy of a tiny model whose tokenizer has a chat template, as instruct models ship one."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def test_chat_models_get_the_prompt_through_their_chat_template(toy_captions, tiny_causal_lm, tmp_path, capsys):
    from transformers import pipeline

    chat_lm = with_chat_template(tiny_causal_lm, tmp_path / "chat-lm")
    out = tmp_path / "chat"
    run(["--input", str(toy_captions[0]), "--output", str(out), *LOW, "--llm", str(chat_lm),
         "--llm-max-new-tokens", "6", *BEAM])
    generate = pipeline("text-generation", model=str(chat_lm))
    rows = by_key(out)
    differs = 0
    for mod, meta in rows.values():
        prompt = DEFAULT_PROMPT.format(ref=meta["ref_caption"], tgt=meta["tgt_caption"])
        as_chat, plain = (clean(generate(p, return_full_text=False, max_new_tokens=6, do_sample=False)[0]
                                ["generated_text"]) for p in ([{"role": "user", "content": prompt}], prompt))
        assert mod == as_chat
        differs += as_chat != plain
        assert meta["provenance"]["modtext"]["llm"]["chat"] is True
    assert rows and differs > len(rows) // 2  # the template really changed what the model saw
    assert json.loads((out / "dataset.json").read_text())["config"]["llm_chat"] == "on"  # auto, resolved
    off = tmp_path / "off"
    run(["--input", str(toy_captions[0]), "--output", str(off), *LOW, "--llm", str(chat_lm), "--llm-chat", "off",
         "--llm-max-new-tokens", "6", *BEAM])
    assert all(meta["provenance"]["modtext"]["llm"]["chat"] is False for _, meta in by_key(off).values())
    with pytest.raises(SystemExit):
        run(["--input", str(toy_captions[0]), "--output", str(tmp_path / "on"), *LOW, "--llm", str(tiny_causal_lm),
             "--llm-chat", "on", *BEAM])
    assert "has no chat template" in capsys.readouterr().err


def test_encoder_decoder_chat_template_is_applied_before_generate(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tests.tiny_models import make_tiny_seq2seq_lm

    path = with_chat_template(make_tiny_seq2seq_lm(tmp_path / "t5"), tmp_path / "t5-chat")
    handler = LLMHandler(str(path), "from {ref} to {tgt}:", max_new_tokens=5, chat=True)
    spec = {"ref_caption": "a red circle", "tgt_caption": "a blue circle"}
    result = next(iter(handler.run_inference([spec], handler.load_model())))
    tokenizer, t5 = AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path)
    text = "[CLS] user : from a red circle to a blue circle: [SEP] circle : "
    assert tokenizer.apply_chat_template([{"role": "user", "content": "from a red circle to a blue circle:"}],
                                         tokenize=False, add_generation_prompt=True) == text
    ids = t5.generate(**tokenizer(text, return_tensors="pt", add_special_tokens=False), max_new_tokens=5,
                      do_sample=False)
    assert result.inference == tokenizer.decode(ids[0], skip_special_tokens=True)


def test_generated_text_is_cleaned_and_an_empty_one_rejected():
    assert clean('\n  Instruction: "make the circle blue"\nSecond line') == "make the circle blue"
    assert clean("answer: add a cross") == "add a cross"
    fn = WithLLMText(provenance("m", DEFAULT_PROMPT, 8, False))
    spec = {"mod": "replace red with blue", "method": "mined-template", "provenance": {"knn": "exact"}}
    kept = list(fn.process(PredictionResult(spec, " make it blue\n", "m")))
    assert kept[0]["mod"] == "make it blue" and kept[0]["mod_template"] == "replace red with blue"
    assert kept[0]["provenance"]["knn"] == "exact" and kept[0]["provenance"]["modtext"]["llm"]["model"] == "m"
    rejected = list(fn.process(PredictionResult(spec, ' \n "" \n', "m")))
    assert len(rejected) == 1 and rejected[0].tag == REJECTED and rejected[0].value == "llm_empty"


def test_bad_llm_options_are_clear_errors(toy_captions, tmp_path, capsys):
    def refused(args, message):
        with pytest.raises(SystemExit) as exc:
            run(["--input", str(toy_captions[0]), "--output", str(tmp_path / "out"), *LOW, *args, *BEAM])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    refused(["--llm", str(tmp_path / "no-model")], "LLM model not found")
    refused(["--llm", str(tmp_path), "--llm-prompt", "describe {ref}"], "must contain {tgt} (target caption)")
    refused(["--llm", str(tmp_path), "--llm-prompt", "{ref} -> {tgt} {other}"], "may only use the fields")
    refused(["--llm", str(tmp_path), "--llm-max-new-tokens", "0"], "llm")


def test_llm_rewrites_edited_triplets_too(toy_captions, tiny_causal_lm, tmp_path):
    from toyworld.edits import Edit, mod_texts
    from toyworld.parse import parse_caption

    out = tmp_path / "high"
    stats = run(["--input", str(toy_captions[0]), "--output", str(out), "--quality", "high", "--num-triplets", "6",
                 "--hard-negatives", "0", "--llm", str(tiny_causal_lm), "--llm-max-new-tokens", "4", *BEAM])
    rows = by_key(out)
    assert len(rows) == stats["written"] == 6 - stats["rejected_by_reason"].get("llm_empty", 0) > 0
    for mod, meta in rows.values():
        assert meta["method"] == "toy-exact-edit+llm" and mod and mod != meta["mod_template"]
        # the editor's own text is kept beside the model's
        assert meta["mod_template"] in mod_texts(parse_caption(meta["ref_caption"]), Edit(**meta["edit"]))
