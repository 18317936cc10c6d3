"""`search index` / `search search`: index -> search round trip, incremental index == full rebuild, faiss, shards,
refusing another CLIP, bad queries, and the PNG grids."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from search.__main__ import main as search_main
from cir.encoder import Encoder
from search.index import GalleryError, GalleryIndex, IndexConfig, build_index
from search.search import Searcher
from cir.grids import OUTLINE, TARGET_COLOUR, GridRow, grid_size, panel_box, render_grid


def _gallery_dir(toy_world: Path) -> Path:
    return toy_world / "bench" / "cirr" / "dev"


@pytest.fixture(scope="module")
def indexed(toy_world, tiny_stage1_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    summary = build_index(IndexConfig(images=str(_gallery_dir(toy_world)), output=str(out),
                                      checkpoint=str(tiny_stage1_export), batch_size=16))
    return out, summary


@pytest.fixture(scope="module")
def searcher(indexed, tiny_stage1_export):
    return Searcher(GalleryIndex(indexed[0]), str(tiny_stage1_export))


def test_index_holds_every_image_with_the_checkpoints_features(indexed, toy_world, tiny_stage1_export):
    out, summary = indexed
    files = sorted(_gallery_dir(toy_world).glob("*.png"))
    assert summary["images"] == summary["encoded"] == len(files) > 0 and summary["failed"] == 0
    index = GalleryIndex(out)
    assert index.names == [f.name for f in files]
    direct = Encoder(str(tiny_stage1_export), "image_only", None, "cpu").images(files, 7, progress=False)
    assert torch.allclose(index.features, direct, atol=1e-5)
    assert index.thumb(0)[:2] == b"\xff\xd8"  # a JPEG thumbnail


def test_search_ranks_like_brute_force_and_leaves_out_the_reference(searcher, toy_world, tiny_stage1_export):
    index = searcher.index
    name = index.names[5]
    own = searcher.search(reference_row=5, k=3, keep_reference=True)
    assert own["method"] == "image_only" and own["results"][0]["name"] == name
    assert own["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert name not in [r["name"] for r in searcher.search(reference_row=5, k=10)["results"]]
    # the same image given as a file is recognised by its bytes and left out too
    by_file = searcher.search(image=_gallery_dir(toy_world) / name, k=10)
    assert by_file["excluded"] == name

    text = "add a small red circle on the left"
    found = searcher.search(image=_gallery_dir(toy_world) / name, text=text, k=8)
    enc = Encoder(str(tiny_stage1_export), "model", None, "cpu")
    ref = enc.images([_gallery_dir(toy_world) / name], 1, progress=False)
    q = enc.queries([_gallery_dir(toy_world) / name], ref, [[text]], 1)
    scores = (q @ index.features.T)[0]
    scores[5] = -float("inf")
    assert found["method"] == "model"
    assert [r["row"] for r in found["results"]] == scores.topk(8).indices.tolist()
    assert [r["score"] for r in found["results"]] == pytest.approx(scores.topk(8).values.tolist(), abs=1e-5)

    text_only = searcher.search(text="a large blue square", k=4)
    t = enc.queries([None], ref, [["a large blue square"]], 1, "text_only")
    assert text_only["method"] == "text_only"
    assert [r["row"] for r in text_only["results"]] == (t @ index.features.T)[0].topk(4).indices.tolist()


def test_bad_queries_get_clear_errors(searcher, tmp_path):
    with pytest.raises(GalleryError, match="empty"):
        searcher.search(reference_row=0, text="   ")
    with pytest.raises(GalleryError, match="needs a reference image, a text"):
        searcher.search()
    with pytest.raises(GalleryError, match="cannot read the query image"):
        searcher.search(image=tmp_path / "missing.png", text="red")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(GalleryError, match="not a usable image"):
        searcher.search(image=tmp_path / "broken.png", text="red")
    with pytest.raises(GalleryError, match="no gallery row"):
        searcher.search(reference_row=10_000, text="red")


def test_search_command_prints_json_and_fails_cleanly(indexed, capsys, tmp_path):
    out, _ = indexed
    index = GalleryIndex(out)
    grid = tmp_path / "not" / "yet" / "grid.png"  # a folder that does not exist yet is made (#23)
    assert search_main(["search", "--index", str(out), "--reference", index.names[2], "--text", "make it blue",
                      "--k", "4", "--json", "--grid", str(grid)]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(found["results"]) == 4 and found["excluded"] == index.names[2]
    from PIL import Image

    assert Image.open(grid).size == grid_size(1, 4, 160)
    assert search_main(["search", "--index", str(out), "--reference", "nope.png", "--text", "x"]) == 2
    assert "no image named 'nope.png'" in capsys.readouterr().err
    # --target: the image the user expects, ranked however deep (the first 4 of a deeper search are the same)
    assert search_main(["search", "--index", str(out), "--reference", index.names[2], "--text", "make it blue",
                        "--k", "20", "--json"]) == 0
    deep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    target = deep[9]["name"]  # ranked 10th: below the 4 shown
    assert search_main(["search", "--index", str(out), "--reference", index.names[2], "--text", "make it blue",
                        "--k", "4", "--json", "--target", target, "--grid", str(grid)]) == 0
    searcher_results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert searcher_results["target"] == {"name": target, "rank": 10}
    assert searcher_results["results"] == found["results"]
    assert search_main(["search", "--index", str(out), "--reference", index.names[2], "--text", "make it blue",
                        "--target", "nope.png"]) == 2
    assert "no image named 'nope.png'" in capsys.readouterr().err
    assert search_main(["search", "--index", str(tmp_path / "none"), "--text", "x"]) == 2
    assert "is not a gallery index" in capsys.readouterr().err
    # the checkpoint's own errors (here: an architecture without weights) are messages too, not tracebacks
    assert search_main(["search", "--index", str(out), "--text", "x", "--checkpoint", "ViT-B-32"]) == 2
    assert "randomly initialised" in capsys.readouterr().err
    # sizes below 1 are refused by the parser, before any model loads (issue 44: --batch-size 0 was a traceback)
    for argv in (["index", "--checkpoint", "x", "--images", "x", "--output", str(tmp_path / "i"), "--batch-size", "0"],
                 ["search", "--index", str(out), "--text", "x", "--k", "-3"]):
        with pytest.raises(SystemExit) as exited:
            search_main(argv)
        assert exited.value.code == 2 and "a whole number of at least 1" in capsys.readouterr().err


def test_incremental_index_equals_a_full_rebuild(toy_world, tiny_stage1_export, tmp_path):
    files = sorted(_gallery_dir(toy_world).glob("*.png"))
    half, full = tmp_path / "half", tmp_path / "full"
    half.mkdir()
    for f in files[: len(files) // 2]:
        shutil.copy(f, half / f.name)
    cfg = dict(checkpoint=str(tiny_stage1_export), batch_size=8)
    first = build_index(IndexConfig(images=str(half), output=str(tmp_path / "inc"), **cfg))
    assert first["encoded"] == len(files) // 2
    shutil.copytree(half, full)
    for f in files[len(files) // 2:]:
        shutil.copy(f, full / f.name)
    (full / "broken.png").write_bytes(b"not an image")
    second = build_index(IndexConfig(images=str(full), output=str(tmp_path / "inc"), **cfg))
    assert (second["encoded"], second["unchanged"], second["failed"]) == (len(files) - len(files) // 2,
                                                                         len(files) // 2, 1)
    failed = pq.read_table(tmp_path / "inc" / "failed.parquet").to_pylist()
    assert failed[0]["source"].endswith("broken.png") and failed[0]["reason"] == "not_an_image"
    rebuilt = build_index(IndexConfig(images=str(full), output=str(tmp_path / "rebuilt"), **cfg))
    assert rebuilt["encoded"] == len(files)
    inc, ref = GalleryIndex(tmp_path / "inc"), GalleryIndex(tmp_path / "rebuilt")
    order = np.argsort(inc.names)
    assert [inc.names[i] for i in order] == ref.names
    assert torch.allclose(inc.features[order], ref.features, atol=1e-5)

    # a changed image is encoded again and supersedes its old row; nothing else is re-encoded
    shutil.copy(files[-1], full / files[0].name)
    third = build_index(IndexConfig(images=str(full), output=str(tmp_path / "inc"), **cfg))
    assert (third["encoded"], third["images"]) == (1, len(files))
    again = GalleryIndex(tmp_path / "inc")
    changed, same_as = again.names.index(files[0].name), again.names.index(files[-1].name)
    assert torch.allclose(again.features[changed], again.features[same_as], atol=1e-5)


def test_index_refuses_a_checkpoint_with_another_clip(indexed, toy_world, tmp_path):
    from tests.tiny_models import make_tiny_clip

    out, _ = indexed
    other = make_tiny_clip(tmp_path / "other-clip", seed=1)
    with pytest.raises(GalleryError, match="another CLIP"):
        Searcher(GalleryIndex(out), str(other))
    with pytest.raises(GalleryError, match="another CLIP"):
        build_index(IndexConfig(images=str(_gallery_dir(toy_world)), output=str(out), checkpoint=str(other)))


def test_index_of_a_clip_by_architecture_name_and_its_weights(searcher, toy_world, tiny_stage1_export, tmp_path):
    """`--pretrained` is part of the index's CLIP: recorded, used by default when searching, and a search with
    the bare name (random weights) is another CLIP. The same weights as the export's give the same ranking."""
    weights = tiny_stage1_export / "clip" / "open_clip_model.safetensors"
    out = tmp_path / "named"
    build_index(IndexConfig(images=str(_gallery_dir(toy_world)), output=str(out), checkpoint="tiny-clip-32",
                            pretrained=str(weights), batch_size=16))
    index = GalleryIndex(out)
    assert (index.manifest["checkpoint"], index.manifest["pretrained"]) == ("tiny-clip-32", str(weights))
    named = Searcher(index).search(None, "a red circle", 5, None, False)["results"]
    by_export = searcher.search(None, "a red circle", 5, None, False)["results"]
    assert [r["name"] for r in named] == [r["name"] for r in by_export]
    with pytest.raises(GalleryError, match="another CLIP"):
        Searcher(index, "tiny-clip-32")


def test_index_of_caption_dataset_shards_with_faiss(toy_captions, tiny_stage1_export, tmp_path):
    data, _ = toy_captions
    summary = build_index(IndexConfig(images=str(data), output=str(tmp_path / "idx"),
                                      checkpoint=str(tiny_stage1_export), faiss_min=10))
    index = GalleryIndex(tmp_path / "idx")
    keys = pq.read_table(Path(data) / "index.parquet").column("key").to_pylist()
    assert summary["faiss"] and sorted(index.names) == sorted(keys)
    assert index.faiss is not None and index.faiss.ntotal == len(index)
    import hashlib

    assert hashlib.sha256(index.image_bytes(3)).hexdigest() == index.sha256[3]
    # the IVF search finds an image's own row first, as the exact scan does
    searcher = Searcher(index, str(tiny_stage1_export))
    for row in (0, 7, 20):
        found = searcher.search(reference_row=row, k=1, keep_reference=True)
        assert found["results"][0]["row"] == row


def test_grid_has_the_expected_size_panels_and_target_outline():
    from PIL import Image

    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255))
    rows = [GridRow(red, "make it blue", [(red, "a", 0.9), (blue, "b", 0.8), (red, "c", 0.7)], {"b"}),
            GridRow(None, "text only", [(blue, "d", 0.5)])]
    sheet = render_grid(rows, panel=100)
    assert sheet.size == grid_size(2, 3, 100)
    x0, y0, x1, y1 = panel_box(0, 3, 100)  # the target "b": first result column is 2
    assert sheet.getpixel((x0 + 1, y0 + 1)) == TARGET_COLOUR
    assert sheet.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == (0, 0, 255)  # the image inside the outline
    a0, b0, _, _ = panel_box(0, 2, 100)
    assert sheet.getpixel((a0 + OUTLINE // 2, (b0 + 100 // 2))) != TARGET_COLOUR  # not a target
    cx0, cy0, cx1, cy1 = panel_box(0, 0, 100)
    assert sheet.getpixel(((cx0 + cx1) // 2, (cy0 + cy1) // 2)) == (255, 0, 0)  # reference panel


def test_a_target_the_grid_does_not_show_has_its_rank_under_the_text():
    """Issue 42: an example grid whose target ranked below the shown results says where it ranked."""
    from PIL import Image

    from cir.grids import LABEL
    from eval.run import target_rank

    assert target_rank(["a", "b", "c"], ("z", "c")) == 3 and target_rank(["a", "b"], ("z",)) is None
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255))

    def label_pixels(note: str) -> set:
        sheet = render_grid([GridRow(red, "make it blue", [(blue, "a", 0.9)], {"z"}, note)], panel=100)
        x0, _, x1, y1 = panel_box(0, 1, 100)
        return set(sheet.crop((x0, y1, x1, y1 + LABEL)).getdata())

    assert any(r > 100 and g < 60 and b < 60 for r, g, b in label_pixels("target at #12"))  # written in red
    assert not any(r > 100 and g < 60 and b < 60 for r, g, b in label_pixels(""))


def test_the_old_eval_commands_say_where_search_went(capsys):
    from eval.__main__ import main as eval_main

    assert eval_main(["index", "--images", "x"]) == 2
    assert "`index` is `python -m search index` now" in capsys.readouterr().err
