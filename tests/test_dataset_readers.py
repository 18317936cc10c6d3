"""Our datasets read with the tools people already use, and no project code: webdataset, Hugging Face
`datasets` (through the dataset card each job writes) and pandas / pyarrow / duckdb for index.parquet."""
from __future__ import annotations

import glob
import json

import pytest

from synth.job import run as synth

BEAM = ["--runner", "DirectRunner"]
CAPTION_META = {"key", "source", "width", "height", "sha256", "caption", "captioner"}
TRIPLET_META = {"ref_key", "tgt_key", "ref_caption", "tgt_caption", "quality", "method", "scores", "hard_negatives",
                "seed"}


@pytest.fixture(scope="module")
def triplets(toy_captions, tmp_path_factory):
    """Toy-editor triplets: references are the caption dataset's images (jpg and png), targets re-rendered."""
    src, _ = toy_captions
    out = tmp_path_factory.mktemp("hq") / "high"
    stats = synth(["--input", str(src), "--output", str(out), "--quality", "high", "--num-triplets", "24",
                   "--image-weight", "0", "--seed", "0", *BEAM])
    assert stats["written"] > 10
    return out, stats


def shards(path) -> list[str]:
    return sorted(glob.glob(f"{path}/shards/*.tar"))


def test_webdataset_reads_caption_and_triplet_shards(toy_captions, triplets):
    import webdataset as wds
    from PIL import Image

    captions, cap_stats = toy_captions
    samples = list(wds.WebDataset(shards(captions), shardshuffle=False).decode("pil"))
    assert len(samples) == cap_stats["written"]
    formats = set()
    for s in samples:
        (image,) = [s[e] for e in ("jpg", "png", "webp") if e in s]
        formats |= {e for e in ("jpg", "png") if e in s}
        assert isinstance(image, Image.Image) and isinstance(s["txt"], str)
        assert CAPTION_META <= set(s["json"]) and s["json"]["key"] == s["__key__"] and s["json"]["caption"] == s["txt"]
    assert formats == {"jpg", "png"}  # both formats in one dataset: what makes the HF loader need the card
    out, stats = triplets
    samples = list(wds.WebDataset(shards(out), shardshuffle=False).decode("pil"))
    assert len(samples) == stats["written"]
    for s in samples:
        assert [k for k in s if k.startswith("ref.")] and [k for k in s if k.startswith("tgt.")]
        assert isinstance(s["mod.txt"], str) and s["mod.txt"]
        assert TRIPLET_META <= set(s["json"]) and s["json"]["quality"] == "high"


def test_hugging_face_datasets_loads_the_folder_through_its_card(toy_captions, triplets, tmp_path):
    """`load_dataset(DIR)`: the README.md header names the shards and types every member, so samples with jpg and
    with png images load as one table (absent members are None)."""
    import datasets

    captions, cap_stats = toy_captions
    table = datasets.load_dataset(str(captions), split="train", cache_dir=str(tmp_path / "hf"))
    assert table.num_rows == cap_stats["written"]
    assert isinstance(table.features["png"], datasets.Image) and isinstance(table.features["json"], datasets.Json)
    rows = list(table)
    assert all((r["jpg"] is None) != (r["png"] is None) for r in rows)
    assert {r["__key__"] for r in rows} == {r["json"]["key"] for r in rows}
    assert all(r["txt"] == r["json"]["caption"] and r["png" if r["jpg"] is None else "jpg"].size == (64, 64)
               for r in rows)
    out, stats = triplets
    table = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert table.num_rows == stats["written"]
    r = table[0]
    assert r["mod.txt"] and r["json"]["ref_key"] and (r["ref.jpg"] or r["ref.png"]) and (r["tgt.jpg"] or r["tgt.png"])


def test_hugging_face_webdataset_loader_with_features(toy_captions, tmp_path):
    """The packaged loader on the shard files: without features it infers columns from five samples and refuses
    mixed image formats; with the card's features it reads every sample."""
    import datasets
    from datasets import Features, Image, Json, List, Value

    captions, cap_stats = toy_captions
    files = {"train": shards(captions)}
    features = Features({"jpg": Image(), "png": Image(), "webp": Image(), "txt": Value("string"), "json": Json(),
                         "emb.npy": List(Value("float16")), "__key__": Value("string"), "__url__": Value("string")})
    table = datasets.load_dataset("webdataset", data_files=files, split="train", features=features,
                                  cache_dir=str(tmp_path / "hf"))
    assert table.num_rows == cap_stats["written"]
    with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
        datasets.load_dataset("webdataset", data_files=files, split="train", cache_dir=str(tmp_path / "hf2"))


def test_index_parquet_queries_with_pandas_and_pyarrow(toy_captions, triplets):
    import pandas as pd
    import pyarrow.parquet as pq

    captions, cap_stats = toy_captions
    frame = pd.read_parquet(captions / "index.parquet")
    assert len(frame) == cap_stats["written"] and frame["key"].is_unique
    assert set(frame["shard"]) == {p.rsplit("/", 1)[1][:-4] for p in shards(captions)}
    assert set(frame["ext"]) == {"jpg", "png"}
    png = pq.read_table(captions / "index.parquet", filters=[("ext", "=", "png")])
    assert 0 < png.num_rows < len(frame)
    out, stats = triplets
    frame = pd.read_parquet(out / "index.parquet")
    assert len(frame) == stats["written"] and set(frame["quality"]) == {"high"}
    assert set(frame["ref_key"]) <= set(pd.read_parquet(captions / "index.parquet")["key"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "path: shards/*.tar" in card
    assert json.loads((out / "dataset.json").read_text())["kind"] == "triplet"


def test_index_parquet_joins_in_duckdb(toy_captions, triplets):
    """SQL over the two indexes, as a user's notebook would: every triplet's reference is a captioned image."""
    import duckdb

    captions, cap_stats = toy_captions
    out, stats = triplets
    con = duckdb.connect()
    per_ext = dict(con.execute(f"SELECT ext, count(*) FROM '{captions / 'index.parquet'}' GROUP BY ext").fetchall())
    assert sum(per_ext.values()) == cap_stats["written"] and set(per_ext) == {"jpg", "png"}
    joined, = con.execute(f"SELECT count(*) FROM '{out / 'index.parquet'}' t JOIN '{captions / 'index.parquet'}' c "
                          f"ON t.ref_key = c.key").fetchone()
    assert joined == stats["written"] > 0
