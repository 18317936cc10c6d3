"""experiments/lq_diagnosis.py: single-edit LQ pairs found from the toy scenes, and the datasets it writes;
experiments/stage1_probe.py: what a stage I mapping keeps of its image."""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

from cir import dataset as ds
from cir import schema
from synth.modtext import modification_text
from toyworld.edits import Edit, apply_edit, mod_texts
from toyworld.scene import Obj, Scene

ROOT = Path(__file__).resolve().parents[1]


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diagnosis():
    return _experiment("lq_diagnosis")


def test_one_edit_and_differences():
    lq = _diagnosis()
    ref = Scene("gray", (Obj("left", "circle", "red", "large"), Obj("right", "cross", "blue", "small")))
    moved = apply_edit(ref, Edit("position", "red circle", "center"))
    assert lq.one_edit(ref, moved) == Edit("position", "red circle", "center")
    assert lq.differences(ref, moved) == 2  # a move empties one slot and fills another
    both = apply_edit(apply_edit(ref, Edit("colour", "red circle", "green")), Edit("background", "", "black"))
    assert lq.one_edit(ref, both) is None and lq.differences(ref, both) == 2
    assert lq.one_edit(ref, ref) is None and lq.differences(ref, ref) == 0


def test_the_derived_datasets_keep_the_pairs_and_change_only_the_text(toy_captions, tmp_path, capsys):
    from synth.job import run as synth

    captions, _ = toy_captions
    data = tmp_path / "claims" / "data"
    shutil.copytree(captions, data / "captions")
    synth(["--input", str(data / "captions"), "--output", str(data / "triplets_low"), "--quality", "low",
           "--image-weight", "0", "--band-low", "0.3", "--runner", "DirectRunner"])
    synth(["--input", str(data / "captions"), "--output", str(data / "triplets_high"), "--quality", "high",
           "--num-triplets", "12", "--image-weight", "0", "--runner", "DirectRunner"])
    lq = _diagnosis()
    assert lq.main(["--claims", str(tmp_path / "claims"), "--out", str(tmp_path / "lq")]) == 0
    summary = json.loads(capsys.readouterr().out)
    read = {name: {s["__key__"]: s for url in ds.shard_urls(str(tmp_path / "lq" / name)) for s in ds.iter_shard(url)}
            for name in ("lq_single", "lq_single_toytext")}
    mined = {s["__key__"]: s for url in ds.shard_urls(str(data / "triplets_low")) for s in ds.iter_shard(url)}
    assert 0 < summary["single_edit"] == len(read["lq_single"]) == len(read["lq_single_toytext"]) <= len(mined)
    sources = {json.loads(s["json"])["key"]: json.loads(s["json"])["source"]
               for url in ds.shard_urls(str(data / "captions")) for s in ds.iter_shard(url)}
    for key, sample in read["lq_single"].items():
        assert sample == mined[key]  # the mined triplet, byte for byte
        toy = schema.TripletSample.from_webdataset(read["lq_single_toytext"][key])
        ref, tgt = (lq.scene_of(sources[toy.meta[k]]) for k in ("ref_key", "tgt_key"))
        assert toy.mod in mod_texts(ref, lq.one_edit(ref, tgt))  # the toy editor's phrasing of its one edit
        assert (toy.ref.data, toy.tgt.data) == (schema.TripletSample.from_webdataset(sample).ref.data,
                                                schema.TripletSample.from_webdataset(sample).tgt.data)
    assert (tmp_path / "lq" / "lq_single" / "index.parquet").is_file()
    # the edited triplets, each with the caption-diff text synth writes for mined pairs (the phrase named)
    edited = {s["__key__"]: s for url in ds.shard_urls(str(data / "triplets_high")) for s in ds.iter_shard(url)}
    difftext = {s["__key__"]: s for url in ds.shard_urls(str(tmp_path / "lq" / "hq_difftext"))
                for s in ds.iter_shard(url)}
    assert set(difftext) == set(edited) and len(edited) == 12
    for key, sample in difftext.items():
        new, old = schema.TripletSample.from_webdataset(sample), schema.TripletSample.from_webdataset(edited[key])
        assert (new.ref.data, new.tgt.data, new.meta) == (old.ref.data, old.tgt.data, old.meta)
        expected = modification_text(old.meta["ref_caption"], old.meta["tgt_caption"], random.Random(f"0:{key}"),
                                     max_ops=99, span="phrase")[0]
        assert new.mod == expected
    assert sum(s["mod.txt"] != edited[k]["mod.txt"] for k, s in difftext.items()) >= 6  # mostly other texts


def test_stage1_probe_ranks_each_pseudo_prompt_against_the_gallery_and_its_image_set(toy_world, tiny_stage1_export,
                                                                                      tmp_path):
    import torch

    from cir.model import load_cir_model

    probe = _experiment("stage1_probe")
    refs, gallery, sets = probe.references(toy_world / "bench" / "cirr", "val")
    assert refs == sorted(refs) and all(r in sets[r] and set(sets[r]) <= set(gallery) for r in refs)
    out = probe.probe(tiny_stage1_export, refs, gallery, sets, batch_size=4)
    assert load_cir_model(tiny_stage1_export).mapping.cfg.use_patches and sorted(out) == ["", "swapped"]
    for variant in out.values():
        assert all(len(values) == len(refs) for values in variant.values())
        # first in the whole gallery implies first in its own image set, never the other way round
        assert all(s >= g for s, g in zip(variant["set@1"], variant["self@1"]))
        assert all(-100.0 <= c <= 100.0 for c in variant["cos"])
    # swapping the patches changes what the mapping makes of at least one image (the cross-attention reads them)
    assert out["swapped"]["cos"] != out[""]["cos"]
    # a mapping blind to its image (every pseudo token the same) ranks one image first for every reference
    model = load_cir_model(tiny_stage1_export)
    with torch.no_grad():
        model.mapping.proj_out.weight.zero_()
    blind = probe.probe(model.save(tmp_path / "blind"), refs, gallery, sets, batch_size=4)[""]
    assert len(set(blind["cos"])) > 1 and sum(blind["self@1"]) <= 100.0


def test_adaptation_sweep_scores_each_variant_on_its_own_clip(tmp_path):
    """experiments/adaptation_sweep.py at toy sizes: a from-scratch and a pretrained-start variant and one sharing
    the latter's stage 0, each trained and scored on val; a rerun reuses everything; an unknown variant exits 2."""
    import pytest

    sweep = _experiment("adaptation_sweep")
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--world-images", "48", "--bench-queries", "6", "--heldout", "20", "--only",
            "scratch-600,pretrained-200-lr1e-4,pretrained-200-lr1e-4-seed1", "max_steps=2", "data.batch_size=8"]
    assert sweep.main(argv) == 0
    results = json.loads((out / "sweep.json").read_text())
    assert set(results) == {"scratch-600", "pretrained-200-lr1e-4", "pretrained-200-lr1e-4-seed1"}
    assert not (out / "pretrained-200-lr1e-4-seed1" / "stage0").exists()  # the same stage 0 as its first row
    shared = {k: v for k, v in results["pretrained-200-lr1e-4"].items() if "stage1" not in k}
    assert shared == {k: v for k, v in results["pretrained-200-lr1e-4-seed1"].items() if "stage1" not in k}
    assert results["scratch-600"]["clip_r1"] != results["pretrained-200-lr1e-4"]["clip_r1"]
    assert "| scratch-600 |" in (out / "sweep.md").read_text()
    stamp = (out / "scratch-600" / "stage1" / "final").stat().st_mtime_ns
    assert sweep.main(argv) == 0 and (out / "scratch-600" / "stage1" / "final").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit) as exited:
        sweep.main(["--out", str(out), "--only", "nope"])
    assert exited.value.code == 2


def test_text_ceiling_gives_eval_runs_numbers_for_the_queries_it_shares_with_it(toy_world, tiny_stage1_export,
                                                                                 tmp_path):
    """experiments/text_ceiling.py: image-only, sum and stage I as `eval run` scores them (CIRR R@1 with the
    reference excluded, CIRCO mAP@5), and the caption-written queries as values of the same metric."""
    from eval.run import run as eval_run

    ceiling = _experiment("text_ceiling")
    for layout, metric in (("cirr", "recall@1"), ("circo", "map@5")):
        root = toy_world / "bench" / layout
        got = ceiling.ceiling(tiny_stage1_export, root, layout)
        assert set(got) == set(ceiling.QUERIES)
        for kind, method in (("image_only", "image_only"), ("sum", "sum"), ("stage1", "model")):
            checkpoint = tiny_stage1_export if method == "model" else tiny_stage1_export / "clip"
            metrics = eval_run(layout, str(root), str(checkpoint), split="val", method=method,
                               output=str(tmp_path / f"{layout}-{kind}"))
            assert abs(got[kind][0] - metrics[metric]) <= 0.005, (layout, kind, got[kind], metrics[metric])
        assert all(0.0 <= lo <= value <= hi <= 100.0 for value, lo, hi in got.values())


def test_clip_strength_tables_and_plots_each_comparison_at_each_strength(tmp_path):
    strength = _experiment("clip_strength")

    def claim(cid, diffs):
        comps = [{"benchmark": b, "metric": "avg", "better": "x", "other": "y", "difference": d,
                  "ci95": [d - 1.0, d + 1.0], "verdict": "holds" if d > 1 else "does not hold"}
                 for b, d in zip(("toy-cirr", "toy-circo"), diffs)]
        return {"id": cid, "verdict": "holds" if min(diffs) > 1 else "does not hold", "comparisons": comps,
                "summary": f"holds in {sum(d > 1 for d in diffs)} of 2 comparisons, does not hold in 0"}

    results = {"scratch": {"clip_r1": 20.0, "open_r1": 5.0,
                           "claims": [claim("A", [0.5, 2.0]), claim("B", [3.0, 4.0])]},
               "pretrained": {"clip_r1": 55.25, "open_r1": 80.0,
                              "claims": [claim("A", [5.0, -2.5]), claim("B", [0.0, 1.5])]}}
    text = strength.table(results).splitlines()
    assert "scratch (CLIP R@1 open 5.0, world 20.0)" in text[0]
    assert "pretrained (CLIP R@1 open 80.0, world 55.3)" in text[0]
    assert len(text) == 2 + 2 * (1 + 2)  # header, rule; per claim its verdict and its two comparisons
    assert text[3] == ("| A | x vs y, toy-cirr avg | +0.5 [-0.5, +1.5] does not hold | +5.0 [+4.0, +6.0] holds |")
    assert text[4].startswith("| A | x vs y, toy-circo avg | +2.0 [+1.0, +3.0] holds | -2.5 [-3.5, -1.5]")
    strength.plot(results, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_calibration_simulates_nulls_and_the_seed_level_interval_reduces_to_the_queries_bootstrap():
    """experiments/verdict_calibration.py: the null runs share their per-query part across seeds; with identical
    seeds the seed-level interval (eval.stats.seed_level_ci, the claims report's) is the queries' bootstrap
    interval of their mean (no seed spread to add), and it widens with the seeds' spread."""
    import numpy as np

    from eval import stats

    calib = _experiment("verdict_calibration")
    runs = calib.null_runs(np.random.default_rng(0), 3, 0.0, 10.0, 0.0)
    assert len(runs) == 3 and runs[0][""] == runs[1][""] and len(runs[0][""]) == calib.QUERIES
    lo, hi = stats.seed_level_ci(runs, digits=None)
    q_lo, q_hi = stats.bootstrap_ci(stats.mean_over(runs), digits=None)
    mean = stats.metric_of(runs[0])
    assert abs((hi - lo) - (q_hi - q_lo)) < 1e-9 and abs((lo + hi) / 2 - mean) < 1e-9
    spread = [{"": [x + shift for x in runs[0][""]]} for shift in (-2.0, 0.0, 2.0)]
    s_lo, s_hi = stats.seed_level_ci(spread, digits=None)
    # the seeds' means are -2, 0, +2 around the same queries: sd 2, t(2 df) = 4.303; the queries' half-width as before
    assert abs((s_hi - s_lo) / 2 - np.hypot(4.303 * 2.0 / np.sqrt(3), (q_hi - q_lo) / 2)) < 1e-6
