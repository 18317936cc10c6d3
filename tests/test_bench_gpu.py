"""bench/gpu.py --tiny: the GPU benchmark's own code path, end to end on the CPU at toy sizes (the figures
themselves are measured on a GPU; nothing here times anything)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_runs_tiny_on_the_cpu_and_prints_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result  # the file after the last part is the printed JSON
    assert result["device"] == "cpu" and result["sizes"]["clip"] == "tiny-clip-32"
    for n in (0, 1, 2):
        figures = result[f"stage{n}"]
        assert set(figures["steps_per_s"]) == {"streamed", "predecoded", "openclip_stage_list"}
        assert all(rate > 0 for rate in figures["steps_per_s"].values())
        rates = figures["steps_per_s"]
        assert abs(figures["streamed_over_predecoded"] - rates["streamed"] / rates["predecoded"]) < 0.01
    assert result["caption_job_images_per_s"] > 0 and result["top50_seconds"] >= 0
    assert result["targets"] == {"streamed_over_predecoded": 0.9, "ours_over_openclip_stage_list": 1.0}
    assert set(result["part_seconds"]) == {"stage0", "stage1", "stage2", "caption_job_images_per_s", "top50_seconds"}


def test_gpu_bench_parts_pick_what_runs_and_unknown_parts_are_refused():
    done = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--parts", "topk"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["top50_seconds"] >= 0 and "data_seconds" not in result and "stage0" not in result
    done = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--parts", "topk,stage3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "stage3" in done.stderr


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    bench = load_bench()
    report = bench.Report({"date": "d"}, tmp_path / "gpu.json")
    report.part("first", lambda: 1.5)

    def broken():
        raise RuntimeError("CUDA out of memory")

    report.part("second", broken)
    report.part("third", lambda: {"steps_per_s": 2.0})
    assert report.failed == ["second"]
    assert report.result["second"] == {"error": "RuntimeError: CUDA out of memory"}
    assert report.result["first"] == 1.5 and report.result["third"] == {"steps_per_s": 2.0}
    saved = json.loads((tmp_path / "gpu.json").read_text())  # written after every part
    assert saved == report.result and set(saved["part_seconds"]) == {"first", "second", "third"}


@pytest.mark.parametrize("argv", [[], ["run"]])
def test_device_script_says_what_to_do_when_called_wrong(tmp_path, argv):
    # `run` without .whl/ is refused with how to get it (a copy of the tree without .whl, as on a bare checkout)
    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "gpu_device.sh"
    script.write_text((ROOT / "bench" / "gpu_device.sh").read_text())
    done = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ("fetch" in done.stderr) and (("no wheels" in done.stderr) == (argv == ["run"]))
