"""Every config we ship parses into its stage's dataclasses (an unknown or misspelt key would be an error)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from train.config import ConfigError, load_config

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
