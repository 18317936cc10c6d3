"""The library stays a library: importing any `cir` module (or the trainers) loads no Beam, and `cir` never
imports the app above it (pipeline, synth, train, eval, search, toyworld); scoring benchmarks (eval) and
searching a gallery (search) are two products that do not import each other."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(f"cir.{p.stem}" for p in (ROOT / "cir").glob("*.py") if p.stem != "__init__")
APP = ("pipeline", "synth", "train", "eval", "search", "toyworld", "apache_beam")


def _loaded_after(modules: list[str]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print('\\n'.join(sorted({k.split('.')[0] for k in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_library_imports_nothing_of_the_app_and_no_beam():
    assert "cir.dataset" in LIBRARY and "cir.schema" in LIBRARY
    assert not _loaded_after(LIBRARY) & set(APP)


def test_training_loads_no_beam():
    assert "apache_beam" not in _loaded_after(["train.stage0", "train.stage1", "train.stage2"])


def test_eval_and_search_are_separate_products():
    assert "search" not in _loaded_after(["eval.__main__", "eval.run", "eval.score", "eval.ablate", "eval.claims"])
    assert "eval" not in _loaded_after(["search.__main__", "search.index", "search.search", "search.serve"])
