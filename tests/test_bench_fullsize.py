"""bench/fullsize.py --tiny: the full-size dry run's own code path (every command of docs/OWN_DATA.md's flow on
models built from configs and a folder of photo-like images without sidecar captions) end to end at tiny size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"caption", "synth_low", "synth_high", "stage0", "stage1", "stage2", "eval", "search",
         "search_query"}


def test_fullsize_dry_run_passes_every_step_at_tiny_size(tmp_path):
    out, work = tmp_path / "fullsize.json", tmp_path / "work"
    done = subprocess.run([sys.executable, "bench/fullsize.py", "--tiny", "--out", str(out), "--work", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result and result["size"] == "tiny"
    assert set(result["models"]) == {"clip", "blip", "ip2p", "llm"}
    assert all(m["params"] > 0 for m in result["models"].values())
    assert set(result["steps"]) == STEPS
    for name, step in result["steps"].items():
        assert step["ok"] and step["seconds"] > 0 and step["peak_rss_mib"] > 100, (name, step)
    steps, models = result["steps"], result["models"]
    assert steps["caption"]["params"] == models["blip"]["params"] + models["clip"]["params"]
    assert steps["synth_high"]["params"] == models["ip2p"]["params"] + models["clip"]["params"]
    # each step made what the next one reads: the model's captions, LLM-written texts, edits, exports, metrics
    assert not list((work / "images").glob("*.txt"))  # no sidecar captions: every step reads the model's
    model_captions = json.loads((work / "captions" / "dataset.json").read_text())
    assert model_captions["config"]["captioner"] == models["blip"]["path"]
    captions = pq.read_table(work / "captions" / "index.parquet").column("caption").to_pylist()
    assert len(set(captions)) > len(captions) // 2  # the captioner's words follow its image: pairs to mine
    for kind in ("low", "high"):
        assert json.loads((work / kind / "stats.json").read_text())["written"] > 0
    low_card = json.loads((work / "low" / "dataset.json").read_text())
    assert low_card["config"]["llm"] == models["llm"]["path"] and low_card["config"]["llm_chat"] == "on"
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["recall@1"] <= 100
    assert json.loads((work / "search_query.log").read_text().strip().splitlines()[-1])["results"]


def own_data_commands() -> list[list[str]]:
    """The command lines of docs/OWN_DATA.md's shell blocks (continuations joined, comments dropped)."""
    import re
    import shlex

    text = (ROOT / "docs" / "OWN_DATA.md").read_text(encoding="utf-8")
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def test_own_data_commands_parse_with_the_recipes_the_dry_run_runs():
    """Every command docs/OWN_DATA.md tells a user to type is accepted by its parser (no unknown flag), and its
    training configs are the recipe files bench/fullsize.py runs, which load."""
    from eval.__main__ import build_parser as eval_parser
    from pipeline.caption import build_parser as caption_parser
    from synth.job import build_parser as synth_parser
    from train.config import load_config
    from train.stage0 import Stage0Config
    from train.stage1 import Stage1Config
    from train.stage2 import Stage2Config

    seen = set()
    for cmd in own_data_commands():
        if cmd[:3] == ["python", "beam_runner.py", "caption"] or cmd[:3] == ["python", "beam_runner.py", "synth"]:
            parser = caption_parser() if cmd[2] == "caption" else synth_parser()
            _, unknown = parser.parse_known_args(cmd[3:])
            assert unknown == [], (cmd, unknown)
        elif cmd[:4] == ["python", "-m", "eval", "run"]:
            eval_parser().parse_args(cmd[3:])
        elif cmd[:2] == ["accelerate", "launch"]:
            stage, config = cmd[2], cmd[cmd.index("--config") + 1]
            cls = {"train/stage0.py": Stage0Config, "train/stage1.py": Stage1Config, "train/stage2.py": Stage2Config}
            cfg = load_config(cls[stage], str(ROOT / config))
            assert config.startswith("recipes/one_gpu/") and cfg.max_steps > 0
        elif cmd[:3] != ["python", "beam_runner.py", "inspect"]:
            raise AssertionError(f"OWN_DATA.md command not checked here: {cmd}")
        seen.add(" ".join(cmd[:3]))
    assert len(seen) == 7  # caption, inspect, synth, the three stages, eval
    bench = (ROOT / "bench" / "fullsize.py").read_text()
    assert all(f'"stage{n}.yaml"' in bench for n in (0, 1, 2))
