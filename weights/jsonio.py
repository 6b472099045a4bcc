"""Reading the JSON files of a checkpoint, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; CheckpointError if it is unreadable, malformed or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
