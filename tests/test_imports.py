"""The package's import graph: no cycles, and every arrow in the direction the layout promises.

    scripts/ -> everything;  kernels/ -> llama/;  llama/ -> weights/;  weights/ -> nothing of ours
    inside llama/: core <- quantization <- training, serving; loading and pipeline on top

Read from the source with ast (every import statement, also those inside functions), so the test
sees what a reader sees, whatever happens to be imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("llama", "kernels", "weights")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The project modules (and outside top-level packages) `name` imports, resolved to modules."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` is an import of the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {name: {m for m in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def test_every_module_is_found():
    assert {"llama.core.model", "llama.core.config", "kernels.fused", "weights.hf", "llama.serving.app"} <= set(MODULES)


def test_no_import_cycles():
    """Tarjan's strongly connected components: every component must be a single module. A package's
    __init__ importing its own submodules is not a cycle unless a submodule imports the __init__."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def imported_by(prefix: str) -> dict[str, set[str]]:
    return {name: imports_of(name) for name in MODULES if name == prefix or name.startswith(prefix + ".")}


def offenders(prefix: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for name, imports in imported_by(prefix).items():
        bad = sorted(m for m in imports if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            found[name] = bad
    return found


def test_layers_import_downwards_only():
    assert offenders("weights", ("llama", "kernels", "scripts")) == {}
    assert offenders("llama", ("kernels", "scripts")) == {}
    assert offenders("kernels", ("scripts",)) == {}
    # The core model knows nothing of what is built on it.
    core_may_not = ("llama.training", "llama.serving", "llama.quantization", "llama.loading", "llama.pipeline")
    assert offenders("llama.core", core_may_not) == {}
    assert offenders("llama.quantization", ("llama.training", "llama.serving", "llama.loading", "llama.pipeline")) == {}


def test_no_reference_implementations_in_the_package():
    for package in PACKAGES:
        assert offenders(package, ("transformers", "peft", "llama_models", "fairscale")) == {}, package


def test_no_private_names_across_modules():
    """`from .x import _name` couples modules through what x keeps private."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("", *PACKAGES):
                found += [f"{name}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
    assert found == []
