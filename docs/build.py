"""Run every code block of docs/*.md, write what each prints below it, and build the notebook.

    python docs/build.py                    # run the blocks, rewrite the ```output blocks and walkthrough.ipynb
    python docs/build.py --check            # run them; exit 1 where an output or the notebook is out of date
    python docs/build.py --check docs/MATH.md

The outputs in the docs are never typed by hand: this script runs the blocks of a file in order, in
one namespace (```python) or one shell each (```bash, from the repository root), and puts what they
print into the ```output block that follows. tests/test_docs.py runs --check, so a change to the
code (or to the bundled model) that changes an output fails the tests until this script is rerun.

docs/walkthrough.ipynb is built from docs/WALKTHROUGH.md: prose as markdown cells, each python block as a
code cell with its output. --check also runs the notebook's own code cells and compares what they
print with the outputs stored in it.

A block that cannot run here (it needs a downloaded data set, or hours) says so on its first line,
`# not run: <why>`, and is shown as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
WALKTHROUGH, NOTEBOOK = DOCS / "WALKTHROUGH.md", DOCS / "walkthrough.ipynb"
RUNNABLE = ("python", "bash")
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"# not run: \S")


class DocError(Exception):
    """A block failed to run, or a file is not well formed."""


@dataclass
class Block:
    kind: str  # "prose", or a fence's language: "python", "bash", "output", "" (plain), "text", ...
    source: str
    line: int  # 1-based line of the opening fence (or of the first prose line)


def parse(text: str, path: Path) -> list[Block]:
    """Prose and fenced blocks, in order; a fence must be closed."""
    blocks: list[Block] = []
    lines = text.split("\n")
    prose: list[str] = []
    prose_start = 1
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if not prose:
                prose_start = i + 1
            prose.append(lines[i])
            i += 1
            continue
        if prose:
            blocks.append(Block("prose", "\n".join(prose), prose_start))
            prose = []
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise DocError(f"{path}:{start + 1}: code block never closed")
        blocks.append(Block(match.group(1), "\n".join(body), start + 1))
        i += 1
    if prose:
        blocks.append(Block("prose", "\n".join(prose), prose_start))
    return blocks


def run_python(source: str, namespace: dict, where: str) -> str:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, where, "exec"), namespace)
    except Exception:
        raise DocError(f"{where} failed:\n{out.getvalue()}{traceback.format_exc()}") from None
    return out.getvalue()


def run_bash(source: str, where: str) -> str:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", source], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    if result.returncode:
        raise DocError(f"{where} exited with status {result.returncode}:\n{result.stdout}")
    return result.stdout


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_file(path: Path) -> tuple[list[Block], list[str | None]]:
    """Run the runnable blocks of one markdown file in order: its blocks, and per block what it printed
    (None for blocks that do not run)."""
    blocks = parse(path.read_text(encoding="utf-8"), path)
    namespace: dict = {"__name__": "__docs__"}
    outputs: list[str | None] = []
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for block in blocks:
            where = f"{shown(path)}:{block.line}"
            if block.kind in RUNNABLE and NOT_RUN.match(block.source):
                outputs.append(None)
            elif block.kind == "python":
                outputs.append(run_python(block.source, namespace, where))
            elif block.kind == "bash":
                outputs.append(run_bash(block.source, where))
            else:
                outputs.append(None)
    finally:
        os.chdir(cwd)
    return blocks, outputs


def render(blocks: list[Block], outputs: list[str | None]) -> str:
    """The markdown again, with each runnable block followed by an ```output block of what it printed
    (none where it printed nothing); the old output blocks are dropped."""
    parts: list[str] = []
    for block, output in zip(blocks, outputs):
        if block.kind == "output":
            continue
        if block.kind == "prose":
            parts.append(block.source)
            continue
        parts.append(f"```{block.kind}\n{block.source}\n```")
        if output:
            parts.append(f"```output\n{output.rstrip()}\n```")
    text = "\n".join(parts)
    # An output block is placed right under its code: drop the blank prose line between them.
    return re.sub(r"```\n\n```output\n", "```\n```output\n", text)


def notebook(blocks: list[Block], outputs: list[str | None]) -> str:
    """WALKTHROUGH.md as a Jupyter notebook (nbformat 4): prose cells and code cells with their outputs."""
    cells = []
    for block, output in zip(blocks, outputs):
        if block.kind == "output":
            continue
        if block.kind == "bash":
            raise DocError(f"{WALKTHROUGH.name}:{block.line}: the walkthrough runs as a notebook: python blocks only")
        if block.kind == "python":
            cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                    "source": block.source.splitlines(keepends=True)}  # fmt: skip
            if output:
                cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": output.splitlines(keepends=True)}]
        else:
            source = block.source.strip("\n") if block.kind == "prose" else f"```{block.kind}\n{block.source}\n```"
            if not source:
                continue
            if cells and cells[-1]["cell_type"] == "markdown":  # a diagram joins the prose around it
                cells[-1]["source"] = "".join(cells[-1]["source"]) + "\n\n" + source
                cells[-1]["source"] = cells[-1]["source"].splitlines(keepends=True)
                continue
            cell = {"cell_type": "markdown", "metadata": {}, "source": source.splitlines(keepends=True)}
        cells.append(cell)
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"
    book = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(book, indent=1, ensure_ascii=False) + "\n"


def run_notebook(path: Path) -> list[tuple[str, str, str]]:
    """Run the code cells of a notebook in order: (cell id, stored output, printed output) per code cell."""
    book = json.loads(path.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__docs__"}
    results = []
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for cell in book["cells"]:
            if cell["cell_type"] != "code":
                continue
            stored = "".join("".join(o.get("text", "")) for o in cell["outputs"])
            printed = run_python("".join(cell["source"]), namespace, f"{shown(path)}, {cell['id']}")
            results.append((cell["id"], stored, printed))
    finally:
        os.chdir(cwd)
    return results


def diff(old: str, new: str, name: str) -> str:
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), f"{name} (in the repository)", f"{name} (as run now)",
                                 lineterm="", n=1)  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="markdown files to run (default: every docs/*.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 where a file differs from what its blocks print")
    args = p.parse_args(argv)
    files = [f.resolve() for f in args.files] or sorted(DOCS.glob("*.md"))
    stale = []
    try:
        for path in files:
            if not path.is_file():
                raise DocError(f"{path}: no such file")
            blocks, outputs = run_file(path)
            current, rendered = path.read_text(encoding="utf-8"), render(blocks, outputs)
            targets = [(path, current, rendered)]
            if path == WALKTHROUGH:
                old_book = NOTEBOOK.read_text(encoding="utf-8") if NOTEBOOK.exists() else ""
                targets.append((NOTEBOOK, old_book, notebook(blocks, outputs)))
            for target, old, new in targets:
                if old == new:
                    continue
                if args.check:
                    stale.append(diff(old, new, target.name))
                else:
                    target.write_text(new, encoding="utf-8")
                    print(f"wrote {shown(target)}")
            if args.check and path == WALKTHROUGH and NOTEBOOK.exists():
                for cell, stored, printed in run_notebook(NOTEBOOK):
                    if stored != printed:
                        stale.append(diff(stored, printed, f"{NOTEBOOK.name}, {cell}"))
    except DocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stale:
        print("\n\n".join(stale), file=sys.stderr)
        print("\nout of date: run `python docs/build.py` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
