"""Reading the JSON files of annotated datasets (benchmarks, training annotations) with errors that name them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_json(path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """The parsed file; a missing file or invalid JSON raises `error` saying which file and what it holds."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as err:  # JSONDecodeError, undecodable bytes and a key given twice
        raise error(f"{what} {path} is not valid JSON: {err}") from None


def _unique_keys(pairs: list) -> dict:
    """An object that gives a key twice (a query predicted twice) is an error: json keeps the last silently."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen
