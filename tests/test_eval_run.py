"""`python -m eval run`: the toy benchmarks round trip through encode -> rank -> files -> official scores."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cir.encoder import top_k
from eval.run import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("use_faiss", [False, True])
def test_top_k_matches_brute_force_in_chunks_with_exclusions(use_faiss):
    torch.manual_seed(0)
    q, g = torch.randn(7, 16), torch.randn(103, 16)
    exclude = [5, -1, 102, 0, -1, 50, 64]
    full = q @ g.T
    for i, e in enumerate(exclude):
        if e >= 0:
            full[i, e] = -float("inf")
    for k in (10, 102):  # 102: every row but the excluded one
        scores, got = top_k(q, g, k, exclude, chunk=17, use_faiss=use_faiss)
        assert torch.equal(got, full.topk(k, dim=1).indices)
        assert torch.allclose(scores, full.topk(k, dim=1).values, atol=1e-5)
    scores, got = top_k(q, g, 4, [-1] * 7, chunk=17, use_faiss=use_faiss)
    assert torch.equal(got, (q @ g.T).topk(4, dim=1).indices)


def _check_example_grid(path, bench, queries, recall):
    """examples.png: the sampled queries' top 5, each row's target outlined exactly where it was ranked."""
    from PIL import Image

    from cir.grids import TARGET_COLOUR, grid_size, panel_box
    from cir.benchmarks import load_cirr
    from eval.run import _grid_sample

    sample = _grid_sample(load_cirr(bench, "val"), 6)
    sheet = Image.open(path).convert("RGB")
    assert sheet.size == grid_size(len(sample), 5, 160)
    target = {str(q["pairid"]): q["target_hard"] for q in queries}
    for (_, qid), row in sample.items():
        top5 = recall[qid][:5]
        outlined = [sheet.getpixel(panel_box(row, c + 2, 160)[:2]) == TARGET_COLOUR for c in range(5)]
        assert outlined == [name == target[qid] for name in top5]


def test_circo_and_fashioniq_and_baselines(toy_world, tiny_stage1_export, tmp_path):
    circo = run("circo", str(toy_world / "bench" / "circo"), str(tiny_stage1_export), output=str(tmp_path / "c"))
    assert set(circo) == {"map@5", "map@10", "map@25", "map@50", "ci95"}
    preds = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert all(isinstance(i, int) for ranked in preds.values() for i in ranked)
    for method in ("image_only", "text_only", "sum"):
        got = run("fashioniq", str(toy_world / "bench" / "fashioniq"), str(tiny_stage1_export / "clip"), method=method,
                  output=str(tmp_path / method))
        assert {"dress/recall@10", "avg/recall@50", "avg"} <= set(got)


def test_shoes_fashion200k_and_coarse_circo(toy_world, tiny_stage1_export, tmp_path):
    """The other layouts round trip too: Shoes and Fashion200k rank without the reference (their scorers refuse
    it) on their test split by default; the coarse CIRCO queries score as CIRCO, with several answers each."""
    from cir.benchmarks import load

    shoes = run("shoes", str(toy_world / "bench" / "shoes"), str(tiny_stage1_export), output=str(tmp_path / "s"))
    assert set(shoes) == {"recall@1", "recall@10", "recall@50", "avg", "ci95"}
    assert shoes["avg"] == pytest.approx((shoes["recall@1"] + shoes["recall@10"] + shoes["recall@50"]) / 3, abs=1e-3)
    f200k = run("fashion200k", str(toy_world / "bench" / "fashion200k"), str(tiny_stage1_export),
                output=str(tmp_path / "f"))
    assert set(f200k) == {"recall@1", "recall@10", "recall@50", "ci95"}
    preds = json.loads((tmp_path / "f" / "predictions.json").read_text())
    queries = (toy_world / "bench" / "fashion200k" / "test_queries.txt").read_text().splitlines()
    assert len(preds) == len(queries) == 12
    assert all(line.split()[0] not in preds[str(i)] for i, line in enumerate(queries))
    coarse = run("circo", str(toy_world / "bench" / "circo_coarse"), str(tiny_stage1_export), split="test",
                 output=str(tmp_path / "c"))
    assert {"map@5", "map@50"} <= set(coarse)
    assert all(len(q.targets) >= 2 for q in load("circo", toy_world / "bench" / "circo_coarse", "test").queries[""])
    with pytest.raises(ValueError, match="shoes has no split 'val'"):
        run("shoes", str(toy_world / "bench" / "shoes"), str(tiny_stage1_export), split="val",
            output=str(tmp_path / "v"))


def test_a_baseline_clip_by_architecture_name_and_its_weights(toy_world, tiny_stage1_export, tmp_path):
    """`--pretrained` gives an architecture name its weights (a tag, or here a file): the same CLIP as the
    export's directory scores the same. A real architecture without weights would be random: refused, as a
    CIRError (the command's message and exit 2)."""
    from cir.backbone import BackboneError
    from cir.model import ExportError
    from eval.__main__ import main as eval_main
    from eval.run import default_output

    circo = str(toy_world / "bench" / "circo")
    weights = str(tiny_stage1_export / "clip" / "open_clip_model.safetensors")
    by_dir = run("circo", circo, str(tiny_stage1_export / "clip"), method="sum", output=str(tmp_path / "d"))
    by_name = run("circo", circo, "tiny-clip-32", method="sum", output=str(tmp_path / "n"), pretrained=weights)
    assert by_name == by_dir
    with pytest.raises(BackboneError, match="randomly initialised"):
        run("circo", circo, "ViT-B-32", method="sum", output=str(tmp_path / "r"))
    with pytest.raises(ExportError, match="own CLIP"):
        run("circo", circo, str(tiny_stage1_export), output=str(tmp_path / "e"), pretrained=weights)
    assert eval_main(["run", "--benchmark", "circo", "--data", circo, "--checkpoint", "ViT-B-32", "--method", "sum",
                      "--output", str(tmp_path / "r")]) == 2
    assert default_output("hf-hub:org/clip") == Path("runs/eval/hf-hub_org_clip")
    assert default_output(str(tiny_stage1_export)) == tiny_stage1_export / "eval"


def test_missing_gallery_images_are_reported(toy_world, tiny_stage1_export, tmp_path):
    bench = tmp_path / "fiq"
    shutil.copytree(toy_world / "bench" / "fashioniq", bench)
    names = json.loads((bench / "image_splits" / "split.dress.val.json").read_text())
    queries = json.loads((bench / "captions" / "cap.dress.val.json").read_text())
    used = {q["candidate"] for q in queries} | {q["target"] for q in queries}
    unused = next(n for n in names if n not in used)
    (bench / "images" / f"{unused}.png").unlink()
    metrics = run("fashioniq", str(bench), str(tiny_stage1_export), output=str(tmp_path / "o"))
    assert metrics["missing_gallery_images"] == 1


def test_cli_needs_an_export_for_the_model_method(toy_world, tiny_stage1_export):
    args = [sys.executable, "-m", "eval", "run", "--benchmark", "cirr", "--data", str(toy_world / "bench" / "cirr")]
    bad = subprocess.run([*args, "--checkpoint", str(tiny_stage1_export / "clip")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "not a stage I/II export" in bad.stderr
    args = [sys.executable, "-m", "eval", "run", "--benchmark", "fashion200k", "--data",
            str(toy_world / "bench" / "fashion200k"), "--checkpoint", str(tiny_stage1_export), "--split", "val"]
    bad = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "fashion200k has no split 'val'" in bad.stderr


def test_an_output_under_a_file_is_refused(toy_world, tiny_stage1_export, tmp_path):
    from eval.__main__ import main

    (tmp_path / "file").write_text("keep me")
    for output in (tmp_path / "file", tmp_path / "file" / "below"):
        assert main(["run", "--benchmark", "cirr", "--data", str(toy_world / "bench" / "cirr"), "--checkpoint",
                     str(tiny_stage1_export), "--split", "val", "--output", str(output)]) == 2
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_copy_of_a_gallery_elsewhere_reuses_its_cached_features(toy_world, tiny_stage1_export, tmp_path,
                                                                  monkeypatch):
    """Gallery features are keyed by the images' bytes, not their paths: a benchmark written again in another
    folder with other query texts (eval claims' held-out phrasings) is not encoded again."""
    from cir.encoder import Encoder

    copy = tmp_path / "copy"
    shutil.copytree(toy_world / "bench" / "cirr", copy)
    cache = tmp_path / "cache"
    first = run("cirr", str(toy_world / "bench" / "cirr"), str(tiny_stage1_export), output=str(tmp_path / "a"),
                cache_dir=str(cache))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the gallery was encoded again")

    monkeypatch.setattr(Encoder, "images", no_encoding)
    assert run("cirr", str(copy), str(tiny_stage1_export), output=str(tmp_path / "b"), cache_dir=str(cache)) == first
    (copy / "dev" / sorted(p.name for p in (copy / "dev").iterdir())[0]).write_bytes(b"not the same image")
    with pytest.raises(AssertionError, match="encoded again"):  # other bytes: another key
        run("cirr", str(copy), str(tiny_stage1_export), output=str(tmp_path / "c"), cache_dir=str(cache))


def test_kept_reference_features_give_the_same_queries_and_spare_the_image_tower(toy_world, tiny_stage1_export,
                                                                                  tmp_path, monkeypatch):
    """Method `model` reads the references' features and patch tokens; eval run keeps them beside the gallery's
    features. Given back, they make the same query features as reading the images (text variants of one query
    split across batches), and a second evaluation with the same image tower does not run it over them."""
    from cir.encoder import Encoder
    from cir.model import CIRModel

    enc = Encoder(str(tiny_stage1_export), "model", None, "cpu")
    refs = sorted(p for p in (toy_world / "images").iterdir() if p.suffix in (".jpg", ".png"))[:3]
    texts = [["make it red", "red instead"], ["add a circle"], ["remove the square", "no square"]]
    ref_feats = enc.images(refs, 2)
    kept = enc.reference_features(enc.query_images(refs, texts), 2)
    assert kept[0].shape[0] == 5 and kept[1] is not None  # one per text variant; the mapping reads patches
    read = enc.queries(refs, ref_feats, texts, 2)
    assert torch.equal(enc.queries(refs, ref_feats, texts, 2, references=kept), read)

    cache = tmp_path / "cache"
    first = run("cirr", str(toy_world / "bench" / "cirr"), str(tiny_stage1_export), output=str(tmp_path / "a"),
                cache_dir=str(cache))
    assert len(list(cache.glob("references-*.npz"))) == 1

    def no_tower(*args, **kwargs):
        raise AssertionError("the references went through the image tower again")

    monkeypatch.setattr(CIRModel, "encode_references", no_tower)
    assert run("cirr", str(toy_world / "bench" / "cirr"), str(tiny_stage1_export), output=str(tmp_path / "b"),
               cache_dir=str(cache)) == first
    assert (tmp_path / "a" / "per_query.json").read_text() == (tmp_path / "b" / "per_query.json").read_text()
