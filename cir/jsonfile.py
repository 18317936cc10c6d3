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
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and undecodable bytes
        raise error(f"{what} {path} is not valid JSON: {err}") from None
