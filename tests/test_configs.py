"""Every config we ship parses into its stage's dataclasses (an unknown or misspelt key would be an error)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cir.config import ConfigError
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train" / "configs").rglob("*.yaml"))


def _config_class(path: Path):
    from train.stage0 import Stage0Config
    from train.stage1 import Stage1Config
    from train.stage2 import Stage2Config

    return {"0": Stage0Config, "1": Stage1Config, "2": Stage2Config}[re.search(r"stage(\d)", path.name).group(1)]


def test_the_shipped_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {"toy_stage0.yaml", "toy_stage1.yaml", "toy_stage2.yaml", "fashion_stage2_hybrid.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_parses(path):
    cfg = load_config(_config_class(path), str(path))
    assert cfg.max_steps > 0 and cfg.output_dir


def test_a_misspelt_key_in_a_config_is_an_error(tmp_path):
    from train.stage2 import Stage2Config

    bad = tmp_path / "bad_stage2.yaml"
    bad.write_text((ROOT / "train/configs/toy_stage2.yaml").read_text().replace("temperature", "temprature"))
    with pytest.raises(ConfigError, match="temprature"):
        load_config(Stage2Config, str(bad))


@pytest.mark.parametrize("override, message", [
    ("max_steps=-3", "config.max_steps: must be at least 1, got -3"),
    ("data.batch_size=0", "config.data.batch_size: must be at least 1, got 0"),
    ("save_every=0", "config.save_every: must be at least 1"),
    ("log_every=0", "config.log_every: must be at least 1"),
    ("grad_accum=0", "config.grad_accum: must be at least 1"),
    ("optim.lr=-1", "config.optim.lr: must be greater than 0, got -1.0"),
    ("mixed_precision=fp8x", "config.mixed_precision: one of no, fp16, bf16, got 'fp8x'"),
    ("data.weights=[0,0]", "config.data.weights: every item must be greater than 0"),
    ("data.weights=[2,-1]", "config.data.weights: every item must be greater than 0"),
    ("data.subset_fraction=1.5", "config.data.subset_fraction: must be at most 1"),
])
def test_impossible_settings_are_named_before_anything_trains(override, message):
    """Issue #23: these trained and exported (or died in a traceback); now each is a one-line error."""
    from train.stage0 import Stage0Config

    with pytest.raises(ConfigError) as err:
        load_config(Stage0Config, str(ROOT / "train" / "configs" / "toy_stage0.yaml"), [override])
    assert message in str(err.value)


def test_an_impossible_setting_exits_2_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "train/stage0.py", "--config", "train/configs/toy_stage0.yaml",
                           f"output_dir={out}", "max_steps=-3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "config.max_steps: must be at least 1, got -3" in done.stderr
    assert not out.exists()


# ------------------------------------------------------------------ the data jobs' flags come from their configs

@pytest.mark.parametrize("job", ["synth", "caption"])
def test_job_flags_are_their_config_fields(job, capsys):
    """One definition per setting: every field of SynthConfig / CaptionConfig is a flag of the same name, with
    the field's default and help; a value out of a field's range exits 2 naming the flag."""
    import dataclasses

    if job == "synth":
        from synth.config import SynthConfig as Config
        from synth.job import build_parser, run
        required = ["--input", "in", "--output", "out", "--quality", "low"]
    else:
        from pipeline.caption import CaptionConfig as Config
        from pipeline.caption import build_parser, run
        required = ["--input", "in", "--output", "out"]
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    fields = dataclasses.fields(Config)
    assert {f.name for f in fields} | {"help", "overwrite"} == set(flags)
    args = parser.parse_args(required)
    for f in fields:
        flag = f"--{f.name.replace('_', '-')}"
        assert flags[f.name].option_strings in ([flag], [flag, f"--no-{flag[2:]}"]) and flags[f.name].help
        if f.name not in ("input", "output", "quality"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(args, f.name) == default
    with pytest.raises(SystemExit) as exit_:
        run([*required, "--shard-size", "0"])
    assert exit_.value.code == 2 and "--shard-size: must be at least 1, got 0" in capsys.readouterr().err
    # --help says each default (issue 42: it listed ranges but no default), once, bool flags included
    text = " ".join(parser.format_help().split())
    assert "(default: 1000)" in text and "(default: part)" in text
    assert text.count("(default: False)") == sum(1 for f in fields if f.default is False)
    if job == "synth":  # a list[float] field: `--name A B`, each item a number in range
        assert parser.parse_args([*required, "--text-guidance", "7.5", "5"]).text_guidance == [7.5, 5.0]
        with pytest.raises(SystemExit) as exit_:
            run([*required, "--image-guidance", "1.5", "0"])
        assert exit_.value.code == 2 and "--image-guidance: every item must be greater than 0" in \
            capsys.readouterr().err


def test_a_config_file_missing_a_required_key_is_named(tmp_path):
    from eval.ablate import load

    path = tmp_path / "ablate.yaml"
    path.write_text("output_dir: x\nstage1: y\ncounts: [10]\nbenchmarks: {b: {}}\n")
    with pytest.raises(ConfigError, match="missing key.*sources"):
        load(str(path))
    path.write_text("output_dir: x\nstage1: y\nsources: {a: b}\ncounts: [ten]\nbenchmarks: {b: {}}\n")
    with pytest.raises(ConfigError, match=r"counts\[0\]: expected a number"):
        load(str(path))


def test_eval_run_flags_are_its_config_fields(capsys):
    """`python -m eval run`'s flags and eval.run.run's keywords are RunConfig's fields: required ones required,
    a bool as --name / --no-name, a value out of range or an unknown keyword named (exit 2 on the command line)."""
    import dataclasses

    from eval.__main__ import build_parser, main
    from eval.config import RunConfig
    from eval.run import run

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    flags = {a.dest: a for a in sub.choices["run"]._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(RunConfig)}
    assert {name for name, a in flags.items() if a.required} == {"benchmark", "data", "checkpoint"}
    required = ["run", "--benchmark", "cirr", "--data", "d", "--checkpoint", "c"]
    assert build_parser().parse_args([*required, "--shared-concept"]).shared_concept is True
    assert build_parser().parse_args(required).shared_concept is False
    assert main([*required, "--grids", "-1"]) == 2
    assert "--grids: must be at least 0, got -1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key.*grid_rows"):
        run("cirr", "d", "c", grid_rows=3)


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2"])
def test_stage_help_lists_every_config_key_with_a_default_that_reads_back(stage, capsys):
    """Issue 42: `train/stageN.py --help` listed no config keys. It lists each with its default, and every line
    given back as an override reads as that default (YAML 1.2 booleans: mixed_precision=no is the string 'no',
    which YAML 1.1 made False and the config refused)."""
    import dataclasses
    import importlib

    from train.loop import parse_args

    module = importlib.import_module(f"train.{stage}")
    cls = next(v for k, v in vars(module).items() if k.endswith("Config") and k.startswith("Stage"))
    with pytest.raises(SystemExit):
        parse_args(cls, ["--help"])
    text = capsys.readouterr().out
    lines = text.split("config keys (key=value) and their defaults", 1)[1].splitlines()[1:]
    overrides = [line.strip().replace(" = ", "=", 1) for line in lines if line.startswith("  ")]
    assert "mixed_precision=no" in overrides and "data.batch_size=64" in overrides
    assert load_config(cls, None, overrides) == cls()
    assert len(overrides) == len(set(o.split("=")[0] for o in overrides)) > len(dataclasses.fields(cls))
