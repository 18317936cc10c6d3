"""Why do mined (LQ) triplets train stage II less well than edited (HQ) ones? A toy-world diagnosis.

Toy-specific on purpose (it reads the toy world's scene files, the labelled exception): for every LQ triplet of
a claims run it finds whether the target is the reference with exactly one toy edit, and writes two triplet
datasets from those single-edit pairs:

  lq_single          the mined pairs and their synthesized texts, as mined
  lq_single_toytext  the same pairs, each text replaced by a toy-editor phrasing of its one edit (the phrasing
                     the HQ triplets and the toy benchmarks use)

and, the other way round, one from the HQ (edited) triplets:

  hq_difftext        every HQ triplet with its text replaced by one `synth` writes for mined pairs, from the
                     two captions (synth.modtext, `--mod-span phrase`: the object named, as the HQ texts do)

so that `eval ablate` can separate what costs: the pairs (several changes, or changes the text does not name)
or the texts' phrasing (experiments/lq_diagnosis.yaml, experiments/lq_texts.yaml). Prints a JSON summary.

    python experiments/lq_diagnosis.py --claims runs/claims --out runs/exp/lq
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import webdataset as wds  # noqa: E402

from cir import dataset as ds  # noqa: E402
from cir import schema  # noqa: E402
from synth.modtext import modification_text  # noqa: E402
from toyworld.edits import apply_edit, enumerate_edits, mod_texts  # noqa: E402
from toyworld.scene import Scene  # noqa: E402


def scene_of(source: str) -> Scene:
    return Scene.from_json(json.loads(Path(source).with_suffix(".json").read_text(encoding="utf-8")))


def one_edit(ref: Scene, tgt: Scene):
    """The toy edit that turns ref into tgt, or None when no single edit does."""
    return next((e for e in enumerate_edits(ref) if apply_edit(ref, e).key == tgt.key), None)


def differences(ref: Scene, tgt: Scene) -> int:
    """How many things differ: the background, and each slot whose object differs (added, removed, changed)."""
    by_slot = [{o.slot: o for o in s.objects} for s in (ref, tgt)]
    slots = set(by_slot[0]) | set(by_slot[1])
    return int(ref.background != tgt.background) + sum(by_slot[0].get(s) != by_slot[1].get(s) for s in slots)


def write(out: Path, samples: list[dict], source: Path) -> None:
    """A triplet dataset folder the trainers read: shards, its index rows, and the source's card (which names
    the caption dataset the negative bank reads)."""
    if out.exists():
        shutil.rmtree(out)
    (out / ds.SHARD_DIR).mkdir(parents=True)
    for i in range(0, len(samples), 500):
        with wds.TarWriter(str(out / ds.SHARD_DIR / f"part-{i // 500:05d}.tar"), mtime=ds.TAR_MTIME) as sink:
            for sample in samples[i:i + 500]:
                sink.write(sample)
    shutil.copy(source / "dataset.json", out / "dataset.json")
    index = pq.read_table(source / "index.parquet")  # eval ablate counts a dataset's triplets here
    keys = pa.array([s["__key__"] for s in samples])
    pq.write_table(index.filter(pc.is_in(index.column("key"), value_set=keys)), out / "index.parquet")
    (out / "stats.json").write_text(json.dumps({"written": len(samples)}), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--claims", default="runs/claims", help="a claims run's output_dir")
    p.add_argument("--out", default="runs/exp/lq", help="where the derived datasets go")
    args = p.parse_args(argv)
    data = Path(args.claims) / "data"
    sources = {r["key"]: r["source"] for r in pq.read_table(data / "captions" / "index.parquet").to_pylist()}
    rng = random.Random(0)
    counts, kinds = Counter(), Counter()
    single, single_toytext = [], []
    for url in ds.shard_urls(str(data / "triplets_low")):
        for raw in ds.iter_shard(url):
            t = schema.TripletSample.from_webdataset(raw)
            ref, tgt = scene_of(sources[t.meta["ref_key"]]), scene_of(sources[t.meta["tgt_key"]])
            n = differences(ref, tgt)
            counts[f"{min(n, 3)}{'+' if n >= 3 else ''} differences"] += 1
            counts[f"{len(ref.objects)} object(s) in the reference"] += 1
            edit = one_edit(ref, tgt)
            if edit is None:
                continue
            kinds[edit.kind] += 1
            single.append(raw)
            toy = schema.TripletSample(t.key, t.ref, t.tgt, rng.choice(mod_texts(ref, edit)), t.meta)
            single_toytext.append(toy.to_webdataset())
    hq_difftext = []
    for url in ds.shard_urls(str(data / "triplets_high")):
        for raw in ds.iter_shard(url):
            t = schema.TripletSample.from_webdataset(raw)
            text, changes, _ = modification_text(t.meta["ref_caption"], t.meta["tgt_caption"],
                                                 random.Random(f"0:{t.key}"), max_ops=99,  # every pair kept
                                                 span="phrase")
            counts[f"HQ caption diffs of {min(len(changes), 3)}{'+' if len(changes) >= 3 else ''} span(s)"] += 1
            hq_difftext.append(schema.TripletSample(t.key, t.ref, t.tgt, text, t.meta).to_webdataset())
    out = Path(args.out)
    write(out / "lq_single", single, data / "triplets_low")
    write(out / "lq_single_toytext", single_toytext, data / "triplets_low")
    write(out / "hq_difftext", hq_difftext, data / "triplets_high")
    total = sum(v for k, v in counts.items() if k.endswith("differences"))
    print(json.dumps({"lq_triplets": total, "single_edit": len(single), "single_edit_kinds": dict(kinds),
                      **dict(sorted(counts.items()))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
