"""Stage II: composing adapters start from stage I exactly, hard negatives push the reference away, each
option trains on toy triplets, the export composes queries in eval."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cir.composer import (AdaptiveFusion, AdapterConfig, ComposingAdapters, FixedFusion, MURConfig, augment_targets,
                          fusion_target, hard_negative_infonce, mur_gamma, uncertainty_loss)
from cir.model import compose, load_cir_model, text_encoder_shape
from cir.schema import TGT
from train.stage2 import main

BASE = ["data.batch_size=8", "data.shuffle_buffer=16", "optim.warmup_steps=2", "log_every=1", "save_every=100",
        "optim.lr=2e-3", "adapters.bottleneck=16"]


@pytest.fixture(scope="module")
def triplets(toy_captions, tmp_path_factory):
    from synth.job import run

    out = tmp_path_factory.mktemp("hq") / "high"
    run(["--input", str(toy_captions[0]), "--output", str(out), "--quality", "high", "--image-weight", "0",
         "--runner", "DirectRunner"])
    return out


def test_adapters_start_as_stage1_exactly(tiny_stage1_export):
    model = load_cir_model(tiny_stage1_export)
    clip = model.backbone.model
    width, blocks = text_encoder_shape(model.backbone)
    adapters = ComposingAdapters(AdapterConfig(bottleneck=8), width, blocks)
    v, prompts = F.normalize(torch.randn(3, model.backbone.embed_dim), dim=-1), model.backbone.tokenizer(
        ["a photo of $ that is red"] * 3)
    with torch.no_grad():
        plain, _ = compose(clip, model.mapping, model.placeholder, v, None, prompts)
        with_adapters, _ = compose(clip, model.mapping, model.placeholder, v, None, prompts, adapters)
    assert torch.allclose(plain, with_adapters, atol=1e-6)  # W_up = 0 at the start
    with pytest.raises(ValueError, match="do not exist"):
        ComposingAdapters(AdapterConfig(blocks=[0, 99]), width, blocks)


def test_reference_as_negative_pushes_the_reference_away():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    targets, refs = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    grads = {}
    for w in (0.0, 1.0):
        q.grad = None
        hard_negative_infonce(q, targets, refs, 0.07, w).backward()
        grads[w] = q.grad.clone()
    # descending the loss moves q away from its reference only when the reference is a negative
    push = {w: float((-g * refs).sum()) for w, g in grads.items()}
    assert push[1.0] < push[0.0]


def test_negatives_the_tower_cannot_tell_from_the_target_are_left_out():
    """negative_max_similarity: a reference (or mined negative) with cos > max to the query's own target is not a
    negative; the others still are."""
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1)
    targets = F.normalize(torch.randn(4, 8), dim=-1)
    refs = F.normalize(torch.randn(4, 8), dim=-1)
    refs[0] = F.normalize(targets[0] + 0.01 * torch.randn(8), dim=0)  # query 0's reference looks like its target
    negs = torch.stack([targets + 0.01, F.normalize(torch.randn(4, 8), dim=-1)], dim=1)  # [4, 2, 8]: one copy each
    mask = torch.ones(4, 2, dtype=torch.bool)

    def per_query(ref_w, hn_w, max_sim, n=None, m=None):
        return torch.stack([hard_negative_infonce(q[i:i + 1], targets, refs[i:i + 1], 0.07, ref_w, i,
                                                  None if n is None else n[i:i + 1], None if m is None else m[i:i + 1],
                                                  hn_w, max_sim) for i in range(4)])

    kept, filtered, none = per_query(1.0, 0.0, 1.0), per_query(1.0, 0.0, 0.9), per_query(0.0, 0.0, 1.0)
    assert torch.allclose(filtered[0], none[0]) and not torch.allclose(kept[0], none[0])  # query 0: ref left out
    assert torch.allclose(filtered[1:], kept[1:])  # the others keep their reference negative
    only_second = per_query(0.0, 1.0, 1.0, negs, torch.tensor([[False, True]] * 4))
    assert torch.allclose(per_query(0.0, 1.0, 0.9, negs, mask), only_second)  # the near-copies are dropped


def test_mined_hard_negatives_push_away_and_masked_ones_do_nothing():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    targets, refs = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    negs = F.normalize(torch.randn(4, 2, 8), dim=-1)
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])

    def grad(weight, m):
        q.grad = None
        hard_negative_infonce(q, targets, refs, 0.07, 1.0, 0, negs, m, weight).backward()
        return q.grad.clone()

    plain = grad(0.0, mask)
    with_hn = grad(2.0, mask)
    # descending moves q away from its real hard negatives; a query with none keeps the plain gradient
    push = [float((-(with_hn[i] - plain[i]) * negs[i, 0]).sum()) for i in (0, 1, 3)]
    assert all(p < 0 for p in push), push
    assert torch.allclose(with_hn[2], plain[2])
    assert torch.allclose(grad(2.0, torch.zeros_like(mask)), plain)


@pytest.fixture(scope="module")
def low_triplets(toy_captions, tmp_path_factory):
    from synth.job import run

    out = tmp_path_factory.mktemp("lq") / "low"
    run(["--input", str(toy_captions[0]), "--output", str(out), "--quality", "low", "--image-weight", "0",
         "--shard-size", "12", "--runner", "DirectRunner"])  # several shards: two ranks split them
    return out


def test_hard_negative_bank_holds_the_caption_dataset_encoded(tiny_stage1_export, low_triplets, toy_captions,
                                                              tmp_path):
    from cir import dataset as ds
    from cir.mapping import image_features
    from train.data import decode_sample, image_of

    out = tmp_path / "s2"
    args = [f"output_dir={out}", f"init_from={tiny_stage1_export}", f"data.train=['{low_triplets}']", "max_steps=3",
            *BASE, "hard_negatives.weight=1.0", "hard_negatives.per_query=2"]
    assert main(args) == 0
    meta = json.loads((out / "negative_bank" / "bank.json").read_text())
    feats = np.load(out / "negative_bank" / "features.npy")
    assert meta["datasets"] == [str(toy_captions[0])]  # found through the triplet dataset's card
    samples = [decode_sample(s) for u in ds.shard_urls(str(toy_captions[0])) for s in ds.iter_shard(u)]
    assert sorted(meta["keys"]) == sorted(s["__key__"] for s in samples)
    model = load_cir_model(tiny_stage1_export)
    row = meta["keys"].index(samples[5]["__key__"])
    with torch.no_grad():
        direct = image_features(model.backbone.model, model.backbone.preprocess(image_of(samples[5]))[None], False)[0]
    assert torch.allclose(torch.from_numpy(feats[row]).float(), direct[0], atol=2e-3)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["hard_negatives_per_query"] <= 2 for r in log)
    stamp = (out / "negative_bank" / "features.npy").stat().st_mtime_ns
    assert main([*args, "max_steps=4", "resume=latest"]) == 0  # the same CLIP and data: the bank is reused
    assert (out / "negative_bank" / "features.npy").stat().st_mtime_ns == stamp
    # with hard_negatives.cache_dir, runs of the same CLIP and data share one bank, by its fingerprint
    shared, stamps = tmp_path / "banks", []
    for run in ("a", "b"):
        assert main([*args, f"output_dir={tmp_path / run}", f"hard_negatives.cache_dir={shared}"]) == 0
        assert not (tmp_path / run / "negative_bank").exists()
        (bank,) = shared.iterdir()
        stamps.append((bank / "features.npy").stat().st_mtime_ns)
    assert stamps[0] == stamps[1]  # built by the first run, read by the second
    assert np.array_equal(np.load(bank / "features.npy"), feats)
    assert json.loads((bank / "bank.json").read_text()) == meta


def test_cached_embeddings_only_from_the_stage_i_clip(tiny_stage1_export, toy_world, tiny_clip_dir, tmp_path):
    """tgt.emb.npy (copied by synth from the caption job) and the negative bank's emb.npy stand in for the
    frozen CLIP only when the caption job's CLIP is stage I's: another CLIP's are recomputed by the tower."""
    from cir import dataset as ds
    from cir.backbone import clip_fingerprint, create_backbone
    from cir.mapping import image_features
    from tests.tiny_models import make_tiny_clip
    from pipeline.caption import run as caption
    from synth.job import run as synth
    from train.config import load_config
    from train.data import decode_sample
    from train.negatives import encode_datasets
    from train.stage2 import Stage2, Stage2Config

    beam = ["--runner", "DirectRunner"]
    made = {}
    for name, clip in (("same", tiny_clip_dir), ("other", make_tiny_clip(tmp_path / "other-clip", seed=1))):
        cap, low = tmp_path / f"cap-{name}", tmp_path / f"low-{name}"
        caption(["--input", str(toy_world / "images"), "--output", str(cap), "--clip", str(clip), *beam])
        synth(["--input", str(cap), "--output", str(low), "--quality", "low", "--image-weight", "0", *beam])
        made[name] = cap, [decode_sample(s) for u in ds.shard_urls(str(low)) for s in ds.iter_shard(u)][:8]
    stage = Stage2(load_config(Stage2Config, None, [f"init_from={tiny_stage1_export}",
                                                     f"data.train=['{tmp_path / 'low-same'}']"]))
    stage.build()
    clip = stage.cir.backbone
    # the premise: stage I's frozen CLIP is the "same" caption job's CLIP (tiny-clip-32, seed 0)
    assert stage.clip_id == clip_fingerprint(create_backbone(str(tiny_clip_dir)).model)
    same, other = stage.collate(made["same"][1]), stage.collate(made["other"][1])
    assert "tgt_emb" in same and "tgt_pixels" not in same
    assert "tgt_pixels" in other and "tgt_emb" not in other
    assert stage.undecoded_images(made["same"][1]) == [(TGT,)] * 8  # and nothing kept yet (train.frozen)
    assert stage.undecoded_images(made["other"][1]) == [()] * 8

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return image_features(clip.model, pixels, False)[0]

    keys, feats = encode_datasets([str(made["other"][0])], encode, clip.preprocess, 16, stage.clip_id, False)
    samples = {s["__key__"]: s for u in ds.shard_urls(str(made["other"][0])) for s in map(decode_sample, ds.iter_shard(u))}
    direct = encode(torch.stack([clip.preprocess(samples[k].get("jpg") or samples[k].get("png")) for k in keys[:4]]))
    assert torch.allclose(torch.from_numpy(feats[:4]).float(), direct, atol=2e-3)  # the tower, not the foreign cache
    foreign = torch.from_numpy(np.stack([samples[k]["emb.npy"] for k in keys[:4]])).float()
    assert not torch.allclose(foreign, direct, atol=1e-1)


def test_augmenter_follows_each_features_own_distribution():
    """f_hat = alpha (f - m) / s + beta, alpha ~ N(1, s), beta ~ N(m, s), with m, s the feature's own mean and
    std over its dimensions: per dimension E = (f_j - m) / s + m and Var = (f_j - m)^2 + s^2."""
    torch.manual_seed(0)
    f = F.normalize(torch.randn(2, 16), dim=-1)
    f = f * torch.tensor([[1.0], [3.0]])  # two features with different spreads
    draws = f.repeat_interleave(20000, dim=0)  # [40000, 16]
    f_hat = augment_targets(draws, MURConfig(), torch.Generator().manual_seed(1)).view(2, 20000, 16)
    m, s = f.mean(-1, keepdim=True), f.std(-1, keepdim=True)
    assert torch.allclose(f_hat.mean(1), (f - m) / s + m, atol=0.02)
    assert torch.allclose(f_hat.var(1), (f - m) ** 2 + s ** 2, rtol=0.05, atol=1e-3)
    quiet = augment_targets(draws[:5], MURConfig(alpha_scale=0.0, beta_scale=0.0))
    assert torch.allclose(quiet, (draws[:5] - m[:1]) / s[:1] + m[:1])  # no noise: the normalised feature + m


def test_mur_fluctuations_are_measured_and_their_strength_can_be_set():
    """Issue 41: on unit-norm features the released augmenter (noise std s = 1/sqrt(d)) barely moves a target
    (cos ~ 0.99) and sigma is ~1 for every sample; `noise: [lo, hi]` draws each target's noise std from a range
    in units of the normalised feature: cos(f_hat, f) ~ 1/sqrt(1 + 2 n^2), so [0.23, 0.72] spans ~0.95 -> 0.7,
    and sigma ~ sqrt(1 + 2 n^2) follows each target's draw."""
    from cir.composer import fluctuation_stats

    torch.manual_seed(0)
    f = F.normalize(torch.randn(512, 128), dim=-1)
    released = fluctuation_stats(f, augment_targets(f, MURConfig(), torch.Generator().manual_seed(1)))
    assert released["target_cos"] > 0.985 and abs(released["sigma"] - 1.0) < 0.02 and released["sigma_spread"] < 0.1
    for n in (0.23, 0.72):
        fixed = fluctuation_stats(f, augment_targets(f, MURConfig(noise=[n, n]), torch.Generator().manual_seed(1)))
        assert abs(fixed["target_cos"] - 1 / math.sqrt(1 + 2 * n * n)) < 0.01
        assert abs(fixed["sigma"] - math.sqrt(1 + 2 * n * n)) < 0.02
    spread = fluctuation_stats(f, augment_targets(f, MURConfig(noise=[0.23, 0.72]), torch.Generator().manual_seed(1)))
    assert 0.75 < spread["target_cos"] < 0.92 and spread["target_cos_min"] < 0.75 and spread["sigma_spread"] > 0.08
    with pytest.raises(Exception, match="mur.noise"):  # refused before anything trains
        from train.config import load_config
        from train.stage2 import Stage2, Stage2Config

        Stage2(load_config(Stage2Config, None, ["init_from=x", "mur.noise=[0.7, 0.2]"]))


def test_uncertainty_loss_is_a_classification_loss_scaled_by_the_fluctuation():
    torch.manual_seed(0)
    q, f = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    f_hat = augment_targets(f, MURConfig(), torch.Generator().manual_seed(2))
    ce = F.cross_entropy(q @ F.normalize(f_hat, dim=-1).T / 0.07, torch.arange(4) + 2, reduction="none")
    sigma = f_hat.std()
    got = uncertainty_loss(q, f_hat, 0.07, offset=2)
    assert torch.allclose(got, (0.5 * (torch.exp(-sigma) * ce + sigma)).mean())
    per_sample = f_hat[2:6].std(dim=-1)
    assert torch.allclose(uncertainty_loss(q, f_hat, 0.07, 2, per_sample=True),
                          (0.5 * (torch.exp(-per_sample) * ce + per_sample)).mean())
    assert mur_gamma(0, 100, MURConfig()) == 1.0 and mur_gamma(100, 100, MURConfig()) < 0.2  # coarse first


def test_uncertainty_loss_on_numbers_worked_out_by_hand():
    """Issue 41: the test above recomputes the loss's own formula; these are the numbers worked out by hand. Two
    queries on the axes, targets twice as long on the same axes, temperature 1: each CE is log(1 + e) - 1 =
    0.31326; the batch std of [2, 0, 0, 2] (unbiased) is sqrt(4/3), each row's is sqrt(2); L = mean of
    1/2 (exp(-sigma) CE + sigma)."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_hat = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert uncertainty_loss(q, f_hat, 1.0).item() == pytest.approx(0.6267127770, abs=1e-6)
    assert uncertainty_loss(q, f_hat, 1.0, per_sample=True).item() == pytest.approx(0.7451863604, abs=1e-6)
    # query i's target is row offset + i: one query against the second of two rows, the first a wrong answer
    assert uncertainty_loss(q[1:], f_hat, 1.0, offset=1, per_sample=True).item() == pytest.approx(0.7451863604,
                                                                                               abs=1e-6)


def test_fusion_weight_starts_at_its_init_and_stays_in_0_1():
    fusion = AdaptiveFusion(8, hidden=4, init_logit=-1.0)
    q, v = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    out, w = fusion(v, q)
    assert torch.allclose(w, torch.sigmoid(torch.tensor(-1.0)).expand(5))
    assert torch.allclose(out.norm(dim=-1), torch.ones(5))


def test_fusion_target_leans_on_the_image_when_the_target_looks_like_the_reference():
    ref = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), dim=-1)
    q = F.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    tgt = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0]]), dim=-1)  # like the reference; like the text
    w = fusion_target(ref, q, tgt, 0.05)
    assert w[0] > 0.99 and w[1] < 0.01
    fixed = FixedFusion(0.25)
    out, ws = fixed(ref, q)
    assert torch.allclose(ws, torch.full((2,), 0.25)) and torch.allclose(out, F.normalize(0.25 * ref + 0.75 * q))
    with pytest.raises(ValueError, match="lies in"):
        FixedFusion(1.5)


def test_the_combiner_composes_both_features_and_mixes_them_per_query():
    """CLIP4Cir's Combiner: a unit query from an MLP of both projected features plus lam * q + (1 - lam) * v_ref,
    lam in (0, 1) per query (w = 1 - lam reported); no dropout in eval (the same query twice); its config
    rebuilds it."""
    from cir.composer import CombinerFusion, combiner_for, fusion_from_config

    torch.manual_seed(0)
    comb = combiner_for(8)
    assert comb.describe() == {"kind": "combiner", "projection": 32, "hidden": 64, "dropout": 0.5}
    ref, q = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    comb.eval()
    out, w = comb(ref, q)
    assert out.shape == (3, 8) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert ((0 < w) & (w < 1)).all() and torch.allclose(w, comb.weight(ref, q))
    assert torch.equal(comb(ref, q)[0], out)
    lam = 1 - w[:, None]
    assert torch.allclose(out, F.normalize(comb.combiner(comb._joint(ref, q)) + lam * q + (1 - lam) * ref, dim=-1))
    again = fusion_from_config(8, comb.describe())
    assert isinstance(again, CombinerFusion) and again.describe() == comb.describe()


@pytest.mark.parametrize("option", [[], ["loss=mur"], ["fusion=adaptive"], ["fusion=fixed", "fusion_weight=0.3"],
                                    ["fusion=adaptive", "template='{}'"], ["fusion=combiner", "template='{}'"]])
def test_each_option_trains_and_lowers_its_loss(tiny_stage1_export, triplets, tmp_path, option):
    out = tmp_path / "s2"
    assert main([f"output_dir={out}", f"init_from={tiny_stage1_export}", f"data.train=['{triplets}']", "max_steps=30",
                 *BASE, *option]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # the retrieval (fine) term; with loss=mur the total blends a falling coarse weight into it, so it may rise
    first, last = sum(r["fine"] for r in log[:5]) / 5, sum(r["fine"] for r in log[-5:]) / 5
    assert last < first, (first, last)
    model = load_cir_model(out / "final")
    assert model.stage == 2 and model.adapters is not None
    if option == ["fusion=adaptive"]:
        ws = [r["fusion_w_mean"] for r in log]
        assert all(0 < w < 1 for w in ws) and abs(ws[-1] - ws[0]) > 1e-3  # it moved, inside (0, 1)
        assert model.fusion is not None
        assert {"fusion_aux", "fusion_target_mean", "fusion_target_std"} <= set(log[-1])  # self-supervised target
    if option == ["fusion=adaptive", "template='{}'"]:  # CTI-IR's hybrid query: the image only through w
        assert model.template == "{}" and "fusion_target_mean" in log[-1]
    if option[:1] == ["fusion=fixed"]:
        assert all(abs(r["fusion_w_mean"] - 0.3) < 1e-6 for r in log)
        assert isinstance(model.fusion, FixedFusion) and model.fusion.fixed == 0.3  # the export keeps it
    if option[:1] == ["fusion=combiner"]:  # CLIP4Cir's compositor, kept by the export
        assert type(model.fusion).__name__ == "CombinerFusion" and all(0 < r["fusion_w_mean"] < 1 for r in log)
    if option == ["loss=mur"]:
        assert {"coarse", "gamma", "fine_grad_norm", "coarse_grad_norm", "target_cos", "sigma_spread"} <= set(log[-1])
        assert log[-1]["gamma"] < log[0]["gamma"]  # the coarse term's weight falls as fine matching takes over


def test_stage2_export_runs_in_eval(tiny_stage1_export, triplets, toy_world, tmp_path):
    from eval.run import run

    out = tmp_path / "s2"
    assert main([f"output_dir={out}", f"init_from={tiny_stage1_export}", f"data.train=['{triplets}']", "max_steps=3",
                 *BASE]) == 0
    metrics = run("cirr", str(toy_world / "bench" / "cirr"), str(out / "final"), output=str(tmp_path / "eval"))
    assert "recall@1" in metrics
    # a stage II export as the start would lose its adapters without a word: refused, the stage I one named
    assert main([f"output_dir={tmp_path / 'again'}", f"init_from={out / 'final'}", f"data.train=['{triplets}']",
                 "max_steps=1", *BASE]) == 2
    assert not (tmp_path / "again" / "final").exists()


def test_a_template_without_pseudo_tokens_takes_the_image_through_the_fusion_alone(tiny_stage1_export, triplets,
                                                                                  toy_world, tmp_path):
    """template "{}": the text side is E_T^A(the modification text), so the mapping plays no part; the reference
    changes the query only through w * v_ref, and not at all without a fusion."""
    images = sorted((toy_world / "images").glob("*.png"))[:2]
    texts = ["make it red", "make it red"]
    queries = {}
    for fusion in ("fixed", "text"):
        out = tmp_path / fusion
        assert main([f"output_dir={out}", f"init_from={tiny_stage1_export}", f"data.train=['{triplets}']",
                     "max_steps=2", *BASE, "template='{}'", f"fusion={fusion}", "fusion_weight=0.4"]) == 0
        model = load_cir_model(out / "final")
        q = model.encode_query(images, texts)
        with torch.no_grad():  # a mapping that maps everything to the same tokens changes nothing
            model.mapping.proj_out.weight.zero_()
        assert torch.allclose(model.encode_query(images, texts), q, atol=1e-6)
        queries[fusion] = q
    assert not torch.allclose(queries["fixed"][0], queries["fixed"][1], atol=1e-4)  # two references, one text
    assert torch.allclose(queries["text"][0], queries["text"][1], atol=1e-6)  # without a fusion: text alone


def test_bad_options_are_errors(tiny_stage1_export, triplets, tmp_path, capsys):
    args = [f"output_dir={tmp_path / 'o'}", f"data.train=['{triplets}']", "max_steps=1", *BASE]
    for bad, message in ((["loss=triplet"], "config.loss: one of infonce, mur, got 'triplet'"),
                         (["fusion=concat"], "config.fusion: one of text, adaptive, fixed"),
                         (["fusion_weight=1.5"], "config.fusion_weight: must be at most 1, got 1.5"),
                         (["temperature=0"], "config.temperature: must be greater than 0"),
                         (["template=a photo of $"], "template needs '{}'"),
                         (["template='{}'", "train_mapping=true"], "the mapping takes no part in the query")):
        assert main([*args, f"init_from={tiny_stage1_export}", *bad]) == 2  # before anything trains
        assert message in capsys.readouterr().err
    assert main([*args, f"init_from={tmp_path}"]) == 2
    assert "not a stage I/II export" in capsys.readouterr().err


def test_target_neighbours_are_the_nearest_bank_images_but_not_copies_of_the_target():
    from train.negatives import NegativeBank

    torch.manual_seed(0)
    feats = F.normalize(torch.randn(50, 8), dim=-1)
    bank = NegativeBank([f"k{i}" for i in range(50)], feats.numpy())
    v = feats[:3].clone()  # each target is itself in the bank (an LQ target is a real image)
    near, mask = bank.nearest(v, 4, 0.999)
    sims = v @ bank.features.float().T
    for i in range(3):
        expected = sims[i].masked_fill(sims[i] > 0.999, -2).topk(4).indices
        assert torch.allclose(near[i], bank.features.float()[expected])  # the nearest, the target itself left out
    assert mask.all() and near.shape == (3, 4, 8)
    _, few = bank.nearest(v, 4, -0.9)  # hardly any bank image is that far: the rest are masked, not made up
    assert few.sum() < 12


def test_two_ranks_train_stage2_with_a_shared_negative_bank(tiny_stage1_export, low_triplets, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "train" / "stage2.py"),
           f"output_dir={out}", f"init_from={tiny_stage1_export}", f"data.train=['{low_triplets}']", "max_steps=4",
           *BASE, "hard_negatives.weight=1.0", "grad_accum=2"]  # and the accumulated step's rows under DDP
    result = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("hard negatives: a bank of") == 1  # printed once, built once (by the main process)
    reads = {rank: {line.split()[1] for line in (out / "data_log" / f"rank{rank}-worker0.txt").read_text().splitlines()
                    if line.startswith("0 ")} for rank in (0, 1)}
    assert reads[0] and reads[1] and not reads[0] & reads[1]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["hard_negatives_per_query"] > 0 for r in log)
    assert load_cir_model(out / "final").stage == 2


@pytest.mark.parametrize("option", [["hard_negatives.weight=1.0", "hard_negatives.per_query=2",
                                     "hard_negatives.target_neighbours=2", "negative_max_similarity=0.95"],
                                    ["loss=mur", "fusion=adaptive"]])
def test_accumulated_features_make_the_step_of_the_whole_batch(tiny_stage1_export, low_triplets, tmp_path, option,
                                                               monkeypatch):
    """grad_accum=2 x 8 with cached features: each query meets all 16 targets (and its own reference, hard
    negatives, MUR noise as the big batch draws it), so the step equals one batch of 16; plain accumulation
    (two batches of 8, 8 targets each) does not. Only the targets are computed ahead: the queries (text tower)
    once per micro-batch."""
    from safetensors.torch import load_file

    from train.stage2 import Stage2

    calls = {"features": 0}
    features = Stage2.features

    def counted(self, *args):
        calls["features"] += 1
        return features(self, *args)

    monkeypatch.setattr(Stage2, "features", counted)

    step = [f"init_from={tiny_stage1_export}", f"data.train=['{low_triplets}']", *BASE, "max_steps=1",
            "optim.warmup_steps=1", "train_mapping=true", *option]
    runs = {"whole": ["data.batch_size=16"], "cached": ["data.batch_size=8", "grad_accum=2"],
            "plain": ["data.batch_size=8", "grad_accum=2", "accum_features=false"]}
    for name, extra in runs.items():
        calls["features"] = 0
        assert main([f"output_dir={tmp_path / name}", *step, *extra]) == 0
        assert calls["features"] == {"whole": 1, "cached": 2, "plain": 2}[name]
    files = ["adapters.safetensors", "mapping.safetensors"] + (["fusion.safetensors"] if "fusion=adaptive" in option else [])
    weights = {name: {f"{f}:{k}": v for f in files for k, v in load_file(str(tmp_path / name / "final" / f)).items()}
               for name in runs}
    whole, cached, plain = weights["whole"], weights["cached"], weights["plain"]
    # Equal up to float order: Adam's first step is ~lr * sign(g), so a gradient element near 0 can move its
    # weight by more than the sums' rounding (1.5e-5 seen on one machine); plain accumulation is ~4e-3 (~lr) off
    assert all(torch.allclose(whole[k], cached[k], atol=1e-4) for k in whole)
    assert max(float((whole[k] - plain[k]).abs().max()) for k in whole) > 1e-3


def test_stage2_trains_the_same_with_the_cache_and_hits_it(tiny_stage1_export, low_triplets, tmp_path):
    from tests.test_train_frozen import train_both_ways
    from train.stage2 import Stage2, Stage2Config

    logs, caches, decoded = train_both_ways(Stage2, Stage2Config, [
        f"init_from={tiny_stage1_export}", f"data.train=['{low_triplets}']", "max_steps=8", "data.batch_size=8",
        "data.shuffle_buffer=0", "adapters.bottleneck=16"], tmp_path)
    assert len(logs[0]) == 8 and all(abs(a - b) < 1e-4 for a, b in zip(logs[0], logs[64])), logs
    cache = caches[64]
    assert cache.hits + cache.misses == 8 * 8 * 2  # every reference and target of 8 batches of 8 asked for
    assert cache.hits > 0 and len(cache.rows) <= cache.misses  # those seen before were not encoded again
    # nor decoded: the stream decodes exactly the images the tower then encodes (off: all of them)
    assert decoded == {0: 8 * 8 * 2, 64: cache.encoded["ref"] + cache.encoded["tgt"]} and cache.encoded["tgt"] < 64


def test_the_bank_finds_the_caption_dataset_after_both_folders_moved(tmp_path, monkeypatch):
    """A triplet dataset records its input as given (relative to the cwd then); moved together with its caption
    folder, or read from another cwd, the bank takes the folder at the same relative place; with none there, the
    recorded path stands and the empty bank's error says how to fix it."""
    from train.data import DataError
    from train.negatives import HardNegativeConfig, bank_datasets, bank_samples

    def dataset(root, inp):
        (root / "data" / "captions" / "shards").mkdir(parents=True)
        (root / "data" / "captions" / "shards" / "part-00000.tar").write_bytes(b"")
        (root / "data" / "triplets").mkdir()
        card = {"config": {"input": inp, "output": "runs/claims/data/triplets"}}
        (root / "data" / "triplets" / "dataset.json").write_text(json.dumps(card))
        return str(root / "data" / "triplets")

    monkeypatch.chdir(tmp_path)  # the recorded runs/claims/... does not exist here: the folders "moved"
    moved = dataset(tmp_path / "elsewhere", "runs/claims/data/captions")
    assert bank_datasets(HardNegativeConfig(), [moved]) == [str(tmp_path / "elsewhere" / "data" / "captions")]
    assert bank_datasets(HardNegativeConfig(bank=["mine"]), [moved]) == ["mine"]  # an explicit bank wins
    (tmp_path / "runs" / "claims" / "data" / "captions" / "shards").mkdir(parents=True)
    (tmp_path / "runs" / "claims" / "data" / "captions" / "shards" / "part-00000.tar").write_bytes(b"")
    assert bank_datasets(HardNegativeConfig(), [moved]) == ["runs/claims/data/captions"]  # recorded, still there
    lost = dataset(tmp_path / "lost", "runs/gone/captions")
    assert bank_datasets(HardNegativeConfig(), [lost]) == ["runs/gone/captions"]
    with pytest.raises(DataError, match="hard_negatives.bank"):
        list(bank_samples(["runs/gone/captions"], show=False))
