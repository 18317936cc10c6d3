"""`cir.load` and the model's methods: what a user's own code gets, and that the commands' numbers are the
API's (eval run's ranking, search's top 5, the docs' example)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cir
from cir.model import CIRModel, ExportError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="module")
def stage2_like(tiny_stage1_export, tmp_path_factory) -> Path:
    """A stage II-shaped export: the tiny stage I export plus seeded adapters and a fixed fusion weight."""
    from cir.composer import AdapterConfig, ComposingAdapters, FixedFusion
    from cir.model import text_encoder_shape

    model = cir.load(tiny_stage1_export)
    torch.manual_seed(0)
    width, blocks = text_encoder_shape(model.backbone)
    model.adapters = ComposingAdapters(AdapterConfig(), width, blocks)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised up-projections would make them the identity
    model.fusion = FixedFusion(0.25)
    model.stage = 2
    return model.save(tmp_path_factory.mktemp("stage2") / "export")


def _gallery(toy_world) -> list[Path]:
    return sorted((toy_world / "bench" / "cirr" / "dev").glob("*.png"))


def test_a_fresh_interpreter_loads_and_encodes(tiny_stage1_export, toy_world):
    image = _gallery(toy_world)[0]
    code = (f"import cir, json\nfrom PIL import Image\nm = cir.load({str(tiny_stage1_export)!r})\n"
            f"q = m.encode_query([Image.open({str(image)!r})], ['make the red circle blue'])\n"
            f"g = m.encode_image([Image.open({str(image)!r})])\n"
            "print(json.dumps([list(q.shape), list(g.shape), q.norm().item(), g.norm().item(), q.dtype == g.dtype]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    q_shape, g_shape, q_norm, g_norm, same_dtype = json.loads(out.stdout.strip().splitlines()[-1])
    dim = json.loads((tiny_stage1_export / "cir_config.json").read_text())["sizes"]["embed_dim"]
    assert q_shape == g_shape == [1, dim] and same_dtype
    assert q_norm == pytest.approx(1.0, abs=1e-5) and g_norm == pytest.approx(1.0, abs=1e-5)


def test_inputs_paths_pil_and_preprocessed_tensors_agree(tiny_stage1_export, toy_world):
    model = cir.load(tiny_stage1_export)
    files = _gallery(toy_world)[:5]
    from_paths = model.encode_image(files, batch_size=2)
    pil = [Image.open(f) for f in files]
    assert torch.allclose(model.encode_image(pil), from_paths, atol=1e-5)
    pixels = torch.stack([model.preprocess(im.convert("RGB")) for im in pil])
    assert torch.allclose(model.encode_image(pixels), from_paths, atol=1e-5)
    texts = ["add a blue square", "remove the circle", "make it red", "a", "b"]
    q = model.encode_query(files, texts, batch_size=2)
    assert torch.allclose(model.encode_query(pixels, texts), q, atol=1e-5)
    assert q.shape == (5, model.embed_dim) and not torch.allclose(q[0], q[1])
    # the text decides the query: the same reference with two texts differs, the plain text tower differs again
    assert not torch.allclose(model.encode_text(texts), q, atol=1e-3)
    with pytest.raises(ValueError, match="one text per image"):
        model.encode_query(files, texts[:2])
    with pytest.raises(ValueError, match="one text per image"):
        model.encode_query(files[:1], "a bare string")
    # a text that is not a string is named, never encoded as the word "None" (issue 44)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType None, not a string"):
        model.encode_query(files[:2], ["a", None])
    with pytest.raises(TypeError, match=r"texts\[0\] is int"):
        model.encode_text([3])
    for call in (lambda: model.encode_image(files, batch_size=0), lambda: model.encode_text(texts, batch_size=-1),
                 lambda: model.encode_query(files, texts, batch_size=0),
                 lambda: model.encode_references(files, batch_size=1.5)):
        with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
            call()


def test_save_round_trip_adapters_and_fusion_weights(stage2_like, toy_world, tmp_path):
    model = cir.load(stage2_like)
    assert isinstance(model, CIRModel) and model.stage == 2 and model.adapters is not None
    files = _gallery(toy_world)[:4]
    texts = ["add a red circle"] * 4
    q, w = model.encode_query(files, texts, return_weights=True)
    assert torch.allclose(w, torch.full((4,), 0.25))
    # w = 0.25: the query is normalize(0.25 v_ref + 0.75 q_text), as the fusion defines it
    v = model.encode_image(files)
    model.fusion = None
    text_part = model.encode_query(files, texts)
    assert torch.allclose(q, torch.nn.functional.normalize(0.25 * v + 0.75 * text_part, dim=-1), atol=1e-5)
    assert model.encode_query(files, texts, return_weights=True)[1] is None
    again = cir.load(cir.load(stage2_like).save(tmp_path / "copy"))
    assert torch.equal(again.encode_query(files, texts), q)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in stage2_like.iterdir())


def test_not_an_export_is_named(tmp_path, tiny_stage1_export):
    with pytest.raises(ExportError, match=re.escape(str(tmp_path))):
        cir.load(tmp_path)
    with pytest.raises(ExportError, match="Hugging Face Hub.*local directory"):
        cir.load("hf-hub:nobody/not-cached", cache_dir=str(tmp_path / "hub"), local_files_only=True)


def test_a_damaged_or_edited_export_is_named_with_what_to_do(tiny_stage1_export, toy_world, tmp_path):
    """Issue 44: every damaged or mismatched export is an ExportError (or the CLIP's BackboneError) naming the
    file and the field, through `cir.load` and through `eval run` (exit 2), never a raw library error."""
    import shutil

    from cir.backbone import BackboneError
    from eval.__main__ import main as eval_main

    def copy(name):
        out = tmp_path / name
        shutil.copytree(tiny_stage1_export, out)
        return out

    weights = copy("truncated") / "mapping.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    empty = copy("empty") / "mapping.safetensors"
    empty.write_bytes(b"")
    missing = copy("missing") / "mapping.safetensors"
    missing.unlink()
    for file, message in ((weights, "does not load"), (empty, "does not load"), (missing, "is missing")):
        with pytest.raises(ExportError, match=re.escape(str(file)) + ".*" + message):
            cir.load(file.parent)
    broken = copy("broken") / "cir_config.json"
    broken.write_text("{not json")
    with pytest.raises(ExportError, match="cir_config.json is not valid JSON"):
        cir.load(broken.parent)
    config = json.loads((tiny_stage1_export / "cir_config.json").read_text())
    for name, edit, message in (
            ("unknown-field", lambda c: c["mapping"].update(colour="red"), "field 'mapping' does not fit"),
            ("more-tokens", lambda c: c["mapping"].update(num_tokens=c["mapping"]["num_tokens"] + 1),
             "does not match cir_config.json's 'mapping'"),
            ("bad-norm", lambda c: c["mapping"].update(token_norm="unit"), "field 'mapping'.*token_norm"),
            ("no-sizes", lambda c: c.pop("sizes"), "missing sizes")):
        edited = json.loads(json.dumps(config))
        edit(edited)
        folder = copy(name)
        (folder / "cir_config.json").write_text(json.dumps(edited))
        with pytest.raises(ExportError, match=message):
            cir.load(folder)
    clip_config = copy("clip-config") / "clip" / "open_clip_config.json"
    clip_config.write_text("{")
    with pytest.raises(BackboneError, match="open_clip_config.json is not valid JSON"):
        cir.load(clip_config.parent.parent)
    edited = json.loads((tiny_stage1_export / "clip" / "open_clip_config.json").read_text())
    edited["model_cfg"]["vision_cfg"]["colour"] = 3  # a field open_clip's config has not
    clip_config.write_text(json.dumps(edited))
    with pytest.raises(BackboneError, match="not a loadable open_clip export"):
        cir.load(clip_config.parent.parent)
    clip = copy("clip-truncated") / "clip" / "open_clip_model.safetensors"
    clip.write_bytes(clip.read_bytes()[:64])
    with pytest.raises(BackboneError, match="not a loadable open_clip export"):
        cir.load(clip.parent.parent)
    with pytest.raises(BackboneError, match="CUDA device|not a torch device"):
        cir.load(tiny_stage1_export, device="cuda:7")
    with pytest.raises(BackboneError, match="not a torch device"):
        cir.load(tiny_stage1_export, device="gpu please")
    assert eval_main(["run", "--benchmark", "cirr", "--data", str(toy_world / "bench" / "cirr"), "--checkpoint",
                      str(weights.parent), "--split", "val", "--output", str(tmp_path / "out")]) == 2


def test_hf_hub_id_resolves_through_the_hub_cache(tiny_stage1_export, toy_world, tmp_path):
    """An export laid out as huggingface_hub caches a downloaded repo loads by its id, offline."""
    import shutil

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--toy-cir"
    shutil.copytree(tiny_stage1_export, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = cir.load("hf-hub:someone/toy-cir", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    files = _gallery(toy_world)[:2]
    assert torch.equal(model.encode_image(files), cir.load(tiny_stage1_export).encode_image(files))


def test_push_to_hub_uploads_a_loadable_export(tiny_stage1_export, tmp_path, monkeypatch):
    """push_to_hub goes through huggingface_hub's create_repo + upload_folder (faked here: nothing is sent)."""
    import shutil

    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls.append(("upload", repo_id))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = cir.load(tiny_stage1_export).push_to_hub("me/toy-cir", token="t")
    assert url.endswith("/commit/abc")
    assert calls == [("token", "t"), ("create", "me/toy-cir", True, True), ("upload", "me/toy-cir")]
    assert cir.load(tmp_path / "uploaded").stage == 1


def test_the_api_ranks_as_eval_run_does(stage2_like, toy_world, tmp_path):
    """examples/cirr_recall.py (cir.load + the benchmark's json files) gives eval run's ranking and Recall@1."""
    from cirr_recall import rank, recall_at_1

    from eval.run import run

    bench = toy_world / "bench" / "cirr"
    metrics = run("cirr", str(bench), str(stage2_like), output=str(tmp_path / "run"), grids=0)
    submitted = json.loads((tmp_path / "run" / "recall_submission.json").read_text())
    ranked = rank(str(stage2_like), str(bench))
    assert {str(k): v[:10] for k, v in ranked.items()} == {k: v[:10] for k, v in submitted.items()
                                                           if k not in ("version", "metric")}
    assert recall_at_1(str(stage2_like), str(bench)) == pytest.approx(metrics["recall@1"], abs=0.05)


def test_the_docs_example_gives_search_top_5(tiny_stage1_export, toy_world, tmp_path, capsys):
    """docs/PYTHON.md's first code block, run on the toy world, prints what `python -m search search` ranks."""
    from search.__main__ import main as search_main

    folder = toy_world / "bench" / "cirr" / "dev"
    reference = sorted(folder.glob("*.png"))[3]
    text = "add a small red circle on the left"
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "PYTHON.md").read_text(), re.S).group(1)
    for name, value in (("EXPORT", str(tiny_stage1_export)), ("FOLDER", f"Path({str(folder)!r})"),
                        ("REFERENCE", f"FOLDER / {reference.name!r}"), ("TEXT", repr(text))):
        block, n = re.subn(rf"^{name} = .*$", f"{name} = {value if name != 'EXPORT' else repr(value)}", block,
                           flags=re.M)
        assert n == 1, name
    exec(compile(block, "docs/PYTHON.md", "exec"), {})
    printed = [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert len(printed) == 5 and reference.name not in printed

    assert search_main(["index", "--checkpoint", str(tiny_stage1_export), "--images", str(folder),
                      "--output", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert search_main(["search", "--index", str(tmp_path / "idx"), "--reference", reference.name, "--text", text,
                      "--k", "5", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in found["results"]] == printed
