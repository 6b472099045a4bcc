"""Reading the JSON files of a checkpoint, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError
from .files import describe, read_text


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; CheckpointError if it is unreadable, malformed or not an object."""
    try:
        data = json.loads(read_text(path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: cannot read: not UTF-8 text: {e}") from e
    except (ValueError, RecursionError) as e:  # also a number of 5000 digits, [[[[...]]]] nested too deeply
        raise CheckpointError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
