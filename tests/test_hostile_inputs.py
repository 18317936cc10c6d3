"""Issue #23, as a hostile but realistic user: nothing a user types destroys data or mixes datasets. Each test
reproduces a break that was reported and asserts the new behaviour (a clear message, exit 2, nothing lost)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from pipeline.caption import run as caption

BEAM = ["--runner", "DirectRunner"]


def images(toy_world, tmp_path, n=6):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((toy_world / "images").glob("toy_00000*"))[: n * 3]:
        shutil.copy(p, folder / p.name)
    return folder


def exits_2(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        caption(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["same", "inside"])
def test_an_output_that_is_or_lies_inside_the_input_is_refused(toy_world, tmp_path, capsys, where):
    """Break 1: `caption --input D --output D` was accepted, and a later `--overwrite` deleted D, inputs and all."""
    photos = images(toy_world, tmp_path)
    before = sorted(p.name for p in photos.iterdir())
    output = photos if where == "same" else photos / "captions"
    exits_2(capsys, ["--input", str(photos), "--output", str(output), "--overwrite", *BEAM], "overlap")
    assert sorted(p.name for p in photos.iterdir()) == before


def test_an_output_that_contains_the_input_is_refused(toy_world, tmp_path, capsys):
    photos = images(toy_world, tmp_path)
    exits_2(capsys, ["--input", str(photos / "*"), "--output", str(tmp_path), *BEAM], "overlap")
    # a glob that leaves the sidecar captions out leaves the default captioner nothing to read
    exits_2(capsys, ["--input", str(photos / "*.jpg"), "--output", str(tmp_path / "out"), *BEAM],
            "a glob must match them too")


def test_a_folder_that_is_not_our_dataset_is_never_written_into(toy_world, tmp_path, capsys):
    photos = images(toy_world, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    exits_2(capsys, ["--input", str(photos), "--output", str(mine), "--overwrite", *BEAM], "without a dataset card")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_overwrite_deletes_only_what_the_job_wrote(toy_world, tmp_path):
    """--overwrite replaces a dataset of ours made with another configuration; a file the user put beside it
    stays."""
    photos = images(toy_world, tmp_path)
    out = tmp_path / "captions"
    first = caption(["--input", str(photos), "--output", str(out), "--shard-size", "2", *BEAM])
    (out / "notes.txt").write_text("keep me")
    again = caption(["--input", str(photos), "--output", str(out), "--shard-size", "3", "--overwrite", *BEAM])
    assert again["written"] == first["written"]
    assert (out / "notes.txt").read_text() == "keep me"
    import pyarrow.parquet as pq

    in_index = set(pq.read_table(out / "index.parquet").column("shard").to_pylist())
    assert {p.stem for p in (out / "shards").glob("*.tar")} == in_index  # no shard of the old layout is left


def test_a_rerun_after_the_input_changed_is_refused(toy_world, tmp_path, capsys):
    """Break 2: caption 6 images, add 3, rerun the same command: it wrote into the finished dataset (keys in two
    shards, images missing). Now the rerun names the change; --overwrite rebuilds a consistent dataset."""
    from pipeline.inspect import run as inspect

    photos = images(toy_world, tmp_path)
    out = tmp_path / "captions"
    argv = ["--input", str(photos), "--output", str(out), "--shard-size", "2", *BEAM]
    assert caption(argv)["written"] == 6
    for p in sorted((toy_world / "images").glob("toy_00001*"))[:9]:
        shutil.copy(p, photos / p.name)
    exits_2(capsys, argv, "the input changed since")
    assert caption([*argv, "--overwrite"])["written"] == 9
    assert inspect([str(out)]) == 0
    assert caption(argv)["shards_written_this_run"] == 0  # the same input again: a resume with nothing to do


def test_synth_refuses_a_rerun_on_a_remade_caption_dataset(toy_world, tmp_path, capsys):
    from synth.job import run as synth

    photos = images(toy_world, tmp_path, n=8)
    captions, triplets = tmp_path / "captions", tmp_path / "triplets"
    caption(["--input", str(photos), "--output", str(captions), "--shard-size", "4", *BEAM])
    argv = ["--input", str(captions), "--output", str(triplets), "--quality", "high", "--num-triplets", "4",
            "--image-weight", "0", *BEAM]
    assert synth(argv)["written"] > 0
    caption(["--input", str(photos), "--output", str(captions), "--shard-size", "3", "--overwrite", *BEAM])
    with pytest.raises(SystemExit) as done:
        synth(argv)
    assert done.value.code == 2 and "the input changed since" in capsys.readouterr().err


def test_eval_run_never_scores_from_a_stale_or_broken_cache(toy_world, tiny_stage1_export, tmp_path, capsys):
    """Break 3: the gallery cache was keyed by weights and paths: a benchmark regenerated at the same path was
    scored with the old features (avg 5.0 against 40.0 fresh). A truncated cache failed every later run."""
    from eval.run import run
    from toyworld.cli import run as make_world

    world = tmp_path / "w"
    make_world(["--output", str(world), "--num-images", "4", "--bench-queries", "8", "--seed", "1"])
    out = tmp_path / "eval"
    run("cirr", str(world / "bench" / "cirr"), str(tiny_stage1_export), output=str(out))
    make_world(["--output", str(world), "--num-images", "4", "--bench-queries", "8", "--seed", "2", "--overwrite"])
    again = run("cirr", str(world / "bench" / "cirr"), str(tiny_stage1_export), output=str(out))
    fresh = run("cirr", str(world / "bench" / "cirr"), str(tiny_stage1_export), output=str(tmp_path / "fresh"))
    assert again == fresh
    for cache in out.glob("gallery-*.npy"):
        cache.write_bytes(cache.read_bytes()[:100])
    assert run("cirr", str(world / "bench" / "cirr"), str(tiny_stage1_export), output=str(out)) == fresh
    assert "does not load" in capsys.readouterr().err


def test_of_two_identical_images_the_captioned_one_is_kept(toy_world, tmp_path):
    """Break 7: de-duplication kept the copy with the smaller path before captions were looked at; when that copy
    had no sidecar, the image was dropped as no_caption."""
    import json

    photos = images(toy_world, tmp_path, n=2)
    first = sorted(photos.glob("*.jpg"))[0]
    shutil.copy(first, photos / "a_copy_without_caption.jpg")  # sorts before the captioned original
    out = tmp_path / "captions"
    stats = caption(["--input", str(photos), "--output", str(out), *BEAM])
    assert stats["written"] == 2 and stats["duplicates"] == 1 and stats["failed"] == 0
    import pyarrow.parquet as pq

    sources = pq.read_table(out / "index.parquet").column("source").to_pylist()
    assert str(first) in sources and not any("a_copy" in s for s in sources)
    assert json.loads((out / "stats.json").read_text())["failed_by_reason"] == {}


def test_a_dataset_missing_a_shard_its_index_names_is_refused_by_every_reader(toy_captions, tiny_stage1_export,
                                                                              tmp_path, capsys):
    """Issue 44: synth on a caption dataset with a shard deleted exited 0 and mined what was left without a word;
    inspect refused it. Now synth, training and search index refuse it too, naming the missing shard."""
    from search.__main__ import main as search_main
    from synth.job import run as synth
    from train.stage0 import main as stage0

    src, _ = toy_captions
    data = tmp_path / "captions"
    shutil.copytree(src, data)
    gone = sorted((data / "shards").glob("*.tar"))[1]
    gone.unlink()
    with pytest.raises(SystemExit) as done:
        synth(["--input", str(data), "--output", str(tmp_path / "t"), "--quality", "low", "--image-weight", "0",
               *BEAM])
    assert done.value.code == 2 and f"missing under shards/ ({gone.stem})" in capsys.readouterr().err
    assert stage0([f"output_dir={tmp_path / 's0'}", f"data.train=['{data}']", "clip.model=tiny-clip-32",
                   "max_steps=1"]) == 2
    assert "partly copied" in capsys.readouterr().err
    assert search_main(["index", "--checkpoint", str(tiny_stage1_export), "--images", str(data), "--output",
                        str(tmp_path / "index")]) == 2
    assert gone.stem in capsys.readouterr().err


def test_a_shard_cut_short_is_counted_not_fatal(toy_captions, tmp_path):
    """Break 5: a shard cut in half crashed stage 0 (KeyError: 'txt' in its collate); corrupt members are
    documented as skipped and counted. Cut a shard right after a sample's image, before its caption."""
    import json
    import tarfile

    from train.stage0 import main as stage0

    src, _ = toy_captions
    data = tmp_path / "captions"
    shutil.copytree(src, data)
    shard = sorted((data / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    caption_member = next(m for m in members[len(members) // 2:] if m.name.endswith(".txt"))
    shard.write_bytes(shard.read_bytes()[:caption_member.offset])  # a key's txt sorts after its image and json
    out = tmp_path / "s0"
    assert stage0([f"output_dir={out}", f"data.train=['{data}']", "clip.model=tiny-clip-32", "data.batch_size=8",
                   "data.shuffle_buffer=0", "max_steps=6", "log_every=1", "save_every=100"]) == 0
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1]["data_errors"] >= 1 and (out / "final").is_dir()


def test_training_reruns_resume_finish_or_refuse(toy_captions, tmp_path, capsys):
    """Break 6: rerunning a finished training command without resume= retrained from scratch, Accelerate deleted
    the old checkpoint, train_log.jsonl grew, and the run died at its final save: no export. Now one command
    serves first start and restart (resume=auto), a finished run says so, another config is refused."""
    import json

    from train.stage0 import main as stage0

    data, _ = toy_captions
    out = tmp_path / "s0"
    args = [f"output_dir={out}", f"data.train=['{data}']", "clip.model=tiny-clip-32", "data.batch_size=8",
            "data.shuffle_buffer=16", "max_steps=4", "save_every=2", "log_every=1"]
    assert stage0(args) == 0
    log = (out / "train_log.jsonl").read_text()
    stamp = (out / "final" / "open_clip_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert stage0(args) == 0  # the same command again: finished, nothing trained or written
    assert "finished" in capsys.readouterr().out
    assert (out / "train_log.jsonl").read_text() == log
    assert (out / "final" / "open_clip_model.safetensors").stat().st_mtime_ns == stamp
    shutil.rmtree(out / "final")  # a kill after the step-4 checkpoint, before the export
    assert stage0(args) == 0
    assert "resumed from" in capsys.readouterr().out and (out / "final").is_dir()
    assert stage0([*args, "optim.lr=1e-3"]) == 2  # another config into the same output_dir
    assert "another config (optim.lr: 0.0005 -> 0.001)" in capsys.readouterr().err
    (out / "notes.txt").write_text("keep me")
    assert stage0([*args, "optim.lr=1e-3", "overwrite=true"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-3


def test_a_fifo_among_the_images_is_a_failed_row_not_a_hang(toy_world, tmp_path):
    """Break 4: a FIFO in an input folder hung the caption job and `search index` forever (blocked in the read).
    Both run in subprocesses with a timeout, so a regression fails instead of hanging the suite."""
    import json
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    root = Path(__file__).resolve().parents[1]
    photos = images(toy_world, tmp_path, n=3)
    os.mkfifo(photos / "pipe.jpg")
    os.mkfifo(photos / "pipe2.txt")  # a FIFO sidecar beside a real image
    shutil.copy(sorted(photos.glob("toy_*.jpg"))[0], photos / "pipe2.jpg")
    out = tmp_path / "captions"
    done = subprocess.run([sys.executable, "beam_runner.py", "caption", "--input", str(photos), "--output", str(out),
                           *BEAM], cwd=root, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    failed = pq.read_table(out / "failed.parquet").to_pylist()
    assert {(r["source"].rsplit("/", 1)[1], r["reason"]) for r in failed} >= {("pipe.jpg", "not_a_regular_file")}
    assert json.loads((out / "stats.json").read_text())["written"] == 3  # pipe2.jpg duplicates a captioned image
    index = tmp_path / "index"
    done = subprocess.run([sys.executable, "-m", "search", "index", "--checkpoint", "tiny-clip-32", "--pretrained",
                           "random", "--images", str(photos), "--output", str(index)], cwd=root, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["failed"] == 1
    (row,) = pq.read_table(index / "failed.parquet").to_pylist()
    assert "pipe.jpg" in json.dumps(row) and "not a regular file" in json.dumps(row)


def test_weak_cases_get_clear_messages(tmp_path, toy_world, capsys):
    """Weak cases of #23: a predictions file naming a query twice was scored (the last one silently); a port
    out of range gave a traceback; an input that matches nothing, or yields nothing, exited 0 without a word."""
    import json
    import subprocess
    import sys

    from eval.__main__ import main as eval_main

    root = Path(__file__).resolve().parents[1]
    cirr = toy_world / "bench" / "cirr"
    queries = json.loads((cirr / "captions" / "cap.rc2.val.json").read_text())
    first = str(queries[0]["pairid"])
    body = ", ".join(f'"{q["pairid"]}": []' for q in queries)
    preds = tmp_path / "p.json"
    preds.write_text(f'{{"version": "rc2", "metric": "recall", {body}, "{first}": []}}')
    assert eval_main(["score", "--benchmark", "cirr", "--annotations", str(cirr / "captions" / "cap.rc2.val.json"),
                      "--predictions", str(preds)]) == 2
    assert f"the key '{first}' appears twice" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "search", "serve", "--index", str(tmp_path), "--port", "99999"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "a port is a number from 1 to 65535" in done.stderr
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    exits_2(capsys, ["--input", str(empty), "--output", str(tmp_path / "out"), *BEAM],
            f"--input {empty} matches no image files (jpg, jpeg, png")
    exits_2(capsys, ["--input", str(tmp_path / "photos*"), "--output", str(tmp_path / "out"), *BEAM],
            "photos* matches no image files")  # a glob's typo
    (empty / "broken.jpg").write_bytes(b"not a jpeg")
    # images without a single sidecar caption: the default captioner has nothing to read (issue 42: every input
    # became a failed row, with no hint why)
    exits_2(capsys, ["--input", str(empty), "--output", str(tmp_path / "out"), *BEAM],
            "none of the 1 images under --input")
    (empty / "broken.txt").write_text("a broken picture")
    stats = caption(["--input", str(empty), "--output", str(tmp_path / "out"), *BEAM])
    assert stats["written"] == 0 and "holds no samples" in capsys.readouterr().err


def test_input_paths_as_users_write_them(toy_world, tmp_path, capsys):
    """Weak cases: a missing --input and a folder named "[2023]" gave Beam tracebacks without the path; broken
    YAML in a training config gave a traceback (`search search --grid` into a missing folder: test_gallery.py)."""
    from cir.config import ConfigError
    from train.config import load_config
    from train.stage0 import Stage0Config

    exits_2(capsys, ["--input", str(tmp_path / "no_such_folder"), "--output", str(tmp_path / "o"), *BEAM],
            "no_such_folder does not exist")
    photos = images(toy_world, tmp_path, n=2)
    year = tmp_path / "[2023]"
    photos.rename(year)
    assert caption(["--input", str(year), "--output", str(tmp_path / "captions"), *BEAM])["written"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1, 2\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML \(line \d+, column \d+\)"):
        load_config(Stage0Config, str(bad))


def test_a_latin1_sidecar_is_named_as_such(toy_world, tmp_path):
    """Weak case: a sidecar in latin-1 was reported as "no sidecar caption"."""
    import pyarrow.parquet as pq

    photos = images(toy_world, tmp_path, n=2)
    sidecar = sorted(photos.glob("*.txt"))[0]
    sidecar.write_bytes("une photo d'un carré rouge".encode("latin-1"))
    (sidecar.with_suffix(".json")).unlink()
    out = tmp_path / "captions"
    stats = caption(["--input", str(photos), "--output", str(out), *BEAM])
    assert stats["written"] == 1 and stats["failed_by_reason"] == {"bad_sidecar": 1}
    (row,) = pq.read_table(out / "failed.parquet").to_pylist()
    assert sidecar.name in row["error"] and "not UTF-8" in row["error"]


@pytest.mark.parametrize("victim", ["model.safetensors", "random_states_0.pkl"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(toy_captions, tmp_path, capsys, victim):
    """Weak cases: truncated checkpoint files gave raw tracebacks, and a truncated RNG state file was silently
    ignored. The train state lists every file's size; a resume passes a damaged checkpoint over, with a warning."""
    from train.stage0 import main as stage0

    data, _ = toy_captions
    out = tmp_path / "s0"
    args = [f"output_dir={out}", f"data.train=['{data}']", "clip.model=tiny-clip-32", "data.batch_size=8",
            "data.shuffle_buffer=16", "max_steps=4", "save_every=2", "log_every=1"]
    assert stage0(args) == 0
    shutil.rmtree(out / "final")  # a kill after the last checkpoint, before the export
    damaged = next((out / "checkpoints" / "checkpoint_1").rglob(victim))
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    assert stage0(args) == 0
    logs = capsys.readouterr()
    assert f"checkpoint_1 is damaged ({victim} has" in logs.err
    assert f"resumed from {out / 'checkpoints' / 'checkpoint_0'} at step 2" in logs.out
    assert (out / "final").is_dir()


def test_an_output_that_cannot_be_written_is_named(toy_world, tmp_path, capsys):
    """Weak case: an output path that is a file, or lies below one, gave a traceback."""
    photos = images(toy_world, tmp_path, n=2)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    exits_2(capsys, ["--input", str(photos), "--output", str(a_file), *BEAM], "exists and is not a directory")
    exits_2(capsys, ["--input", str(photos), "--output", str(a_file / "captions"), *BEAM], "cannot be written")
    # a URL whose filesystem is not installed here (the library writes through fsspec)
    exits_2(capsys, ["--input", str(photos), "--output", "nofs://bucket/captions", *BEAM], "Protocol not known: nofs")
    if importlib.util.find_spec("gcsfs") is None:
        exits_2(capsys, ["--input", str(photos), "--output", "gs://bucket/captions", *BEAM], "gcsfs")


def test_a_broken_symlink_is_a_failed_row(toy_world, tmp_path):
    """Weak case: Beam's listing skipped a symlink whose target is gone without counting it."""
    import pyarrow.parquet as pq

    photos = images(toy_world, tmp_path, n=2)
    (photos / "gone.png").symlink_to(tmp_path / "deleted.png")
    stats = caption(["--input", str(photos), "--output", str(tmp_path / "out"), *BEAM])
    assert stats["written"] == 2 and stats["failed_by_reason"] == {"broken_symlink": 1}
    assert stats["inputs"] == stats["written"] + stats["failed"] + stats["duplicates"] == 3
    row, = pq.read_table(tmp_path / "out" / "failed.parquet").to_pylist()
    assert row["source"].endswith("gone.png") and "deleted.png" in row["error"]


def test_models_that_cannot_load_are_named_before_the_job(toy_world, toy_captions, tmp_path, capsys):
    """Weak case: an HF captioner that could not be loaded (offline, or a typo in its id) failed 30 s into the job
    inside RunInference; the editor and LLM of synth likewise. Now: one line, exit 2, before any work."""
    from synth.job import run as synth

    photos = images(toy_world, tmp_path, n=2)
    out = ["--output", str(tmp_path / "out"), *BEAM]
    exits_2(capsys, ["--input", str(photos), "--captioner", "Salesforce/not-downloaded", *out],
            "captioner model Salesforce/not-downloaded is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    exits_2(capsys, ["--input", str(photos), "--captioner", "Salesforce//blip", *out],
            "captioner model 'Salesforce//blip' is neither a local folder nor a Hugging Face Hub id")
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    (not_a_model / "model.bin").write_bytes(b"")
    exits_2(capsys, ["--input", str(photos), "--captioner", str(not_a_model), *out],
            f"captioner model {not_a_model} is a folder without config.json")
    with pytest.raises(SystemExit) as done:
        synth(["--input", str(toy_captions[0]), "--quality", "high", "--editor", "timbrooks/not-here",
               "--clip", "tiny-clip-32", "--image-weight", "0", *out])
    assert done.value.code == 2 and "editor model timbrooks/not-here is not in the local Hugging Face cache" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        synth(["--input", str(toy_captions[0]), "--quality", "high", "--editor", str(not_a_model),
               "--clip", "tiny-clip-32", "--image-weight", "0", *out])
    assert done.value.code == 2 and "is a folder without model_index.json" in capsys.readouterr().err


def test_commands_end_with_their_own_status(toy_captions):
    """Weak case: an argument error exited 134 ("terminate called without an active exception") about once in
    seven runs: the interpreter's C++ teardown with torch and pyarrow loaded aborted after the command was done.
    The entry points now leave with the command's status once the streams are flushed (cir.cli.run_and_exit)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\nfrom cir.cli import run_and_exit\nprint('written before the end', flush=False)\n"
            "run_and_exit(lambda: sys.exit(sys.argv[1]) if sys.argv[1] != '3' else 3)")
    message = subprocess.run([sys.executable, "-c", code, "a message"], cwd=root, capture_output=True, text=True)
    assert message.returncode == 1 and message.stderr.strip() == "a message"
    assert message.stdout.strip() == "written before the end"  # flushed, though os._exit skips the teardown
    assert subprocess.run([sys.executable, "-c", code, "3"], cwd=root, capture_output=True).returncode == 3
    # an error the user can fix that no command caught: its message and 2, no traceback
    raising = ("from cir.cli import run_and_exit\nfrom cir.config import ConfigError\n"
               "def main():\n    raise ConfigError('max_steps: must be > 0')\nrun_and_exit(main)")
    done = subprocess.run([sys.executable, "-c", raising], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().endswith("error: max_steps: must be > 0")
    assert "Traceback" not in done.stderr
    # the reported case: synth's argument error after reading the caption dataset's parquet index, torch loaded
    argv = [sys.executable, "beam_runner.py", "synth", "--input", str(toy_captions[0]), "--output", "unused",
            "--quality", "low", "--image-weight", "0.5"]
    codes = [subprocess.run(argv, cwd=root, capture_output=True, text=True).returncode for _ in range(8)]
    assert codes == [2] * 8
