"""Reading and writing the small JSON files of run and export directories."""

from __future__ import annotations

import json
from pathlib import Path

from qflow.errors import QflowError


def read_json(path: Path, missing: str | None = None) -> dict:
    """The JSON object in ``path``; a one-line QflowError if it is missing or malformed.

    ``missing`` replaces the message for a missing file.
    """
    if not path.is_file():
        raise QflowError(missing or f"file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QflowError(f"malformed JSON in {path}: {exc}") from None
    if not isinstance(data, dict):
        raise QflowError(f"malformed JSON in {path}: expected an object")
    return data


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
