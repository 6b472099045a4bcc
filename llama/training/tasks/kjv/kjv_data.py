"""Loads a shipped task's items for lm-eval (the YAMLs' `custom_dataset`): the JSONL file next to
this one, so the tasks work from wherever the package is installed, offline."""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def load(file: str, **metadata) -> datasets.DatasetDict:
    """`file`: the JSONL file's name in this folder (from the YAML's dataset_kwargs); lm-eval also
    passes the task's metadata, which loading does not need."""
    path = Path(__file__).parent / file
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})
