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


def test_no_import_circle_anywhere():
    """Every import between the project's modules, lazy ones inside functions included, forms no circle."""
    import ast

    packages = ("cir", "toyworld", "pipeline", "synth", "train", "eval", "search")
    imports = {}
    for package in packages:
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module:
                    module = node.module if node.level == 0 else f"{package}.{node.module}"
                    found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
                elif isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
            imports[name] = found
    graph = {m: sorted(d for d in found if d in imports and d != m) for m, found in imports.items()}
    assert len(graph) > 50 and "train.sources" in graph["train.loop"]
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in graph[module]:
            assert dep not in path, f"import circle: {' -> '.join(path[path.index(dep):] + [dep])}"
            if dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in graph:
        visit(module, [module])
