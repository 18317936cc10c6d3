"""bench/gpu.py --tiny: the GPU benchmark's own code path, end to end on the CPU at toy sizes (the figures
themselves are measured on a GPU; nothing here times anything)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_tiny_on_the_cpu_and_prints_every_figure():
    done = subprocess.run([sys.executable, "bench/gpu.py", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["sizes"]["clip"] == "tiny-clip-32"
    for n in (0, 1, 2):
        figures = result[f"stage{n}"]
        assert set(figures["steps_per_s"]) == {"streamed", "predecoded", "openclip_stage_list"}
        assert all(rate > 0 for rate in figures["steps_per_s"].values())
        rates = figures["steps_per_s"]
        assert abs(figures["streamed_over_predecoded"] - rates["streamed"] / rates["predecoded"]) < 0.01
    assert result["caption_job_images_per_s"] > 0 and result["top50_seconds"] >= 0
    assert result["targets"] == {"streamed_over_predecoded": 0.9, "ours_over_openclip_stage_list": 1.0}
