"""cir.schema: the one definition of the sample formats, written by every writer and read by every reader."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest

from cir import dataset as ds
from cir import schema
from cir.schema import IMAGE, REF, TGT, CaptionSample, Picture, SchemaError, TripletSample


def _emb(d: int = 8) -> np.ndarray:
    v = np.arange(1, d + 1, dtype=np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16)


def test_roles_name_their_members():
    assert IMAGE.images == ("jpg", "png", "webp") and IMAGE.emb == "emb.npy" and IMAGE.emb_clip == "emb_clip"
    assert TGT.images == ("tgt.jpg", "tgt.png", "tgt.webp") and TGT.emb == "tgt.emb.npy"
    assert REF.emb_clip == "ref_emb_clip" and TGT.name == "tgt" and IMAGE.name == "image"
    assert [schema.image_role(m) for m in ("png", "ref.webp", "tgt.jpg", "mod.txt", "emb.npy", "tgt.gif")] == [
        IMAGE, REF, TGT, None, None, None]
    assert schema.TRIPLET.required() == ("ref.jpg|ref.png|ref.webp", "tgt.jpg|tgt.png|tgt.webp", "mod.txt")
    assert set(schema.CAPTION.members()) == {"jpg", "png", "webp", "txt", "json", "emb.npy"}


def test_samples_round_trip_through_their_members():
    caption = CaptionSample("a" * 32, Picture(b"\x89PNG...", "png", _emb(), "clip-1"), "a red circle", {"key": "a" * 32})
    raw = caption.to_webdataset()
    assert set(raw) == {"__key__", "png", "emb.npy", "txt", "json"}
    assert all(isinstance(v, bytes) for k, v in raw.items() if k != "__key__")
    assert schema.parse_json(raw) == {"key": "a" * 32, "emb_clip": "clip-1"}
    back = CaptionSample.from_webdataset(raw)
    assert (back.key, back.caption, back.image.ext, back.image.emb_clip) == (caption.key, "a red circle", "png", "clip-1")
    assert np.array_equal(back.image.emb, _emb()) and back.to_webdataset() == raw

    triplet = TripletSample("b" * 32, Picture(b"ref", "jpg"), Picture(b"tgt", "webp", _emb(), "clip-2"), "make it blue",
                            {"quality": "high"})
    raw = triplet.to_webdataset()
    assert set(raw) == {"__key__", "ref.jpg", "tgt.webp", "tgt.emb.npy", "mod.txt", "json"}
    assert schema.parse_json(raw) == {"quality": "high", "tgt_emb_clip": "clip-2"}
    assert TripletSample.from_webdataset(raw).to_webdataset() == raw
    assert triplet.meta == {"quality": "high"}  # encoding does not change the sample


def test_shards_are_written_as_webdatasets_tarwriter_writes_them():
    """cir.dataset.tar_bytes writes shards with the standard library (webdataset's import loads torch, seconds
    of each data job's start-up): the bytes equal TarWriter's, and webdataset reads them back."""
    import io

    import webdataset as wds

    pictures = [Picture(bytes([i]) * (100 + 700 * i), "jpg", _emb() if i % 2 else None, "clip" if i % 2 else None)
                for i in range(6)]
    samples = [CaptionSample(f"{i:032x}", pic, f"caption {i} é", {"i": i}).to_webdataset()
               for i, pic in enumerate(pictures)]
    samples.append(TripletSample("f" * 32, Picture(b"ref", "png"), Picture(b"tgt", "webp"), "mod", {}).to_webdataset())
    theirs = io.BytesIO()
    with wds.TarWriter(theirs, mtime=ds.TAR_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
    ours = ds.tar_bytes(samples)
    assert ours == theirs.getvalue()
    from webdataset import tariterators

    read = list(tariterators.group_by_keys(tariterators.tar_file_expander([{"url": "x", "stream": io.BytesIO(ours)}])))
    assert [{k: v for k, v in r.items() if not k.startswith("__")} for r in read] == [
        {k: v for k, v in s.items() if k != "__key__"} for s in samples]
    with pytest.raises(TypeError, match="member txt is str"):
        ds.tar_bytes([{"__key__": "k", "txt": "not bytes"}])


def test_shards_are_read_as_webdataset_groups_them_with_where_each_member_lies(tmp_path):
    """cir.dataset.shard_members reads a shard with the standard library into the samples webdataset's
    tar_file_expander + group_by_keys make (meta members skipped, extensions lower-cased, consecutive members
    of a key grouped), and says where each member's bytes lie; read_spans reads them there, and refuses a file
    that changed since."""
    import os
    import tarfile

    from webdataset import tariterators

    samples = [CaptionSample(f"{i:032x}", Picture(bytes([i]) * (300 + 900 * i), "png"), f"caption {i}", {"i": i}
                             ).to_webdataset() for i in range(4)]
    samples.append(TripletSample("f" * 32, Picture(b"ref", "png"), Picture(b"tgt", "webp"), "mod", {}).to_webdataset())
    shard = tmp_path / "s.tar"
    shard.write_bytes(ds.tar_bytes(samples))
    with tarfile.open(shard, "a") as tar:  # what webdataset also skips or reshapes: meta, folders, upper case
        for name, data in (("__meta__.json", b"{}"), ("dir/k.TXT", b"upper"), ("noext", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(shard, "rb") as stream:
        theirs = [{k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"} for r in
                  tariterators.group_by_keys(tariterators.tar_file_expander([{"url": str(shard), "stream": stream}]))]
    ours = list(ds.shard_members(str(shard)))
    assert [s for s, _ in ours] == theirs == list(ds.iter_shard(str(shard)))
    assert theirs[-1] == {"__key__": "dir/k", "txt": b"upper"}
    stamp = ds.shard_stamp(str(shard))
    sample, where = ours[3]
    spans = [where["png"], where["txt"]]
    assert ds.read_spans(str(shard), stamp, spans) == [sample["png"], sample["txt"]]
    os.utime(shard, ns=(0, 0))  # another file at the same path, as far as anyone can tell
    with pytest.raises(ds.SourceChanged, match="changed while the job ran"):
        ds.read_spans(str(shard), stamp, spans)


def test_incomplete_samples_are_schema_errors_naming_the_sample():
    raw = TripletSample("c" * 32, Picture(b"ref", "png"), Picture(b"tgt", "png"), "x").to_webdataset()
    for member, what in (("tgt.png", "no tgt image"), ("mod.txt", "no mod.txt")):
        with pytest.raises(SchemaError, match=f"{'c' * 32} has {what}"):
            TripletSample.from_webdataset({k: v for k, v in raw.items() if k != member})
    with pytest.raises(SchemaError, match="has no txt"):
        CaptionSample.from_webdataset({"__key__": "k", "jpg": b"x", "txt": b"  "})
    with pytest.raises(SchemaError, match="'gif' is not one of"):
        Picture(b"GIF89a", "gif")


def test_caption_job_writes_the_schema_and_the_card_declares_it(toy_captions):
    data, _ = toy_captions
    samples = [s for url in ds.shard_urls(str(data)) for s in ds.iter_shard(url)]
    assert len(samples) == 48
    for raw in samples:
        assert CaptionSample.from_webdataset(raw).to_webdataset() == raw
    card = (data / "README.md").read_text()
    assert all(f"- name: {m}\n" in card for m in schema.CAPTION.members())


def test_supervised_loader_writes_triplet_samples_that_inspect_accepts(tmp_path):
    from pipeline.inspect import Report, _check_sample
    from tests.test_supervised import write_cirr
    from train.supervised import TripletSource

    write_cirr(tmp_path / "cirr")
    source = TripletSource("cirr", tmp_path / "cirr", "train")
    raw = source.sample(0, random.Random(0))
    sample = TripletSample.from_webdataset(raw)
    assert sample.meta["quality"] == "supervised" and sample.ref.ext == sample.tgt.ext == "png"
    assert sample.to_webdataset() == raw
    report = Report()
    _check_sample(report, "triplet", "s", "0" * 32, {k: v for k, v in raw.items() if k != "__key__"},
                  {"caption_words": [], "rows": [], "sizes": [], "keys": []})
    assert report.violations == []
