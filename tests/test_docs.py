"""The docs for learners cannot rot: every code block of docs/*.md runs, and prints what the page shows.

docs/build.py runs the blocks of a page in order and compares what each prints with the ```output
block under it (and, for the walkthrough, builds the notebook and runs the notebook's own cells).
Here it runs with --check on every page; a failure shows the difference, and `python docs/build.py`
rewrites the outputs. Also checked: links between the docs resolve, every exercise names tests that
exist, and the README points into docs/.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def build(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCS / "build.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_learner_pages_exist():
    assert {p.name for p in PAGES} >= {"WALKTHROUGH.md", "MATH.md", "EXERCISES.md"}


@pytest.mark.slow  # each page loads the bundled model or the reference tokenizers in a fresh process
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_block_runs_and_prints_what_the_page_shows(page):
    result = build("--check", str(page))
    assert result.returncode == 0, result.stderr[-6000:]


def test_the_notebook_is_the_walkthrough_and_valid():
    book = nbformat.read(DOCS / "walkthrough.ipynb", as_version=4)
    nbformat.validate(book)
    code_cells = ["".join(c.source) for c in book.cells if c.cell_type == "code"]
    page = (DOCS / "WALKTHROUGH.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)\n```$", page, flags=re.S | re.M)
    assert code_cells == blocks
    assert all(c.outputs for c in book.cells if c.cell_type == "code" and "print(" in "".join(c.source))


def test_the_checker_fails_on_a_stale_output_and_on_a_failing_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nprint(6 * 7)\n```\n```output\n41\n```\n", encoding="utf-8")
    stale = build("--check", str(page))
    assert stale.returncode == 1 and "-41" in stale.stderr and "+42" in stale.stderr
    assert "run `python docs/build.py`" in stale.stderr
    assert build(str(page)).returncode == 0
    assert page.read_text(encoding="utf-8") == "Text.\n\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n"
    assert build("--check", str(page)).returncode == 0
    page.write_text("```bash\n# not run: needs a GPU\nexit 3\n```\n", encoding="utf-8")  # shown, not run
    assert build("--check", str(page)).returncode == 0
    page.write_text("```python\nx = 1\n```\n\n```bash\necho $((2 + 3))\n```\n\n```python\nraise ValueError('no')\n```\n")
    failing = build("--check", str(page))
    assert failing.returncode == 2 and failing.stderr.startswith(f"error: {page}:9 failed") and "ValueError: no" in failing.stderr


# ---- links -----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=[*(p.name for p in PAGES), "README.md"])
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: link to {target}: no such heading"


# ---- exercises -------------------------------------------------------------------------------------


def test_every_exercise_names_tests_that_exist():
    text = (DOCS / "EXERCISES.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) == 12
    for section in sections:
        checks = section[section.index("\nCheck:") :]
        named = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", checks)
        assert named, f"exercise {section.splitlines()[0]!r} names no checking test"
        for file, name in named:
            tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
            defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert name in defined, f"exercise {section.splitlines()[0]!r}: {file} has no {name}"


# ---- README ----------------------------------------------------------------------------------------


def test_readme_opens_with_a_learn_section_pointing_into_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert "Learn" in sections[:3], sections[:3]
    learn = readme.split("## Learn", 1)[1].split("\n## ", 1)[0]
    for page in ("docs/WALKTHROUGH.md", "docs/walkthrough.ipynb", "docs/MATH.md", "docs/EXERCISES.md"):
        assert f"]({page}" in learn, page
    assert json.loads((DOCS / "walkthrough.ipynb").read_text(encoding="utf-8"))["nbformat"] == 4
