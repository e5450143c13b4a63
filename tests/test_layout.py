"""The package's layout (docs/design.md): the root holds the op layer only, every module stays
small, and no two modules import each other (directly or through others), lazily or not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "distill_ops"
ROOT_MODULES = {
    "__init__", "autograd", "dense_kd", "dispatch", "fused_linear", "modules", "reduction",
    "reference", "sampling", "sparse_kd", "topk", "validation",
}
SUBPACKAGES = {"backends", "bench", "cli", "demo", "distributed", "integrations", "store"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["distill_ops", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its body (lazy imports too)."""
    tree = ast.parse(modules[name].read_text())
    here = name if _is_package(name, modules) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("distill_ops"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub == "distill_ops._C":  # the compiled extension: imports nothing back
                    continue
                if sub in modules:
                    found.add(sub)
                elif target in modules:
                    found.add(target)
    found.discard(name)
    return found


def test_the_root_holds_the_op_layer_only():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == ROOT_MODULES, f"root modules changed: {sorted(root ^ ROOT_MODULES)}"
    assert len(root) <= 12
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == SUBPACKAGES


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_over_600_lines(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {m: _imports(m, modules) for m in modules}
    # Tarjan's strongly connected components: any with two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_sees_a_lazy_cycle(tmp_path, monkeypatch):
    """The check above would catch the topk <-> vocab_parallel cycle this layout removed."""
    modules = _modules()
    fake = tmp_path / "vp.py"
    fake.write_text("def f():\n    from ..topk import topk_logprobs\n")
    modules["distill_ops.distributed.fake"] = fake
    assert "distill_ops.topk" in _imports("distill_ops.distributed.fake", modules)


REPO = PACKAGE.parents[1]


def _doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door_and_the_docs_are_behind_it():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("guide", "api", "backends", "store", "cli", "design", "benchmarks"):
        assert (REPO / "docs" / f"{page}.md").exists(), page
        assert f"docs/{page}.md" in readme, f"README does not link docs/{page}.md"


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: p.name)
def test_every_relative_link_in_the_docs_resolves(doc):
    import re

    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_the_api_reference_names_every_public_name_and_option():
    import inspect

    import distill_ops

    api = (REPO / "docs" / "api.md").read_text()
    for name in distill_ops.__all__:
        if name != "__version__":
            assert f"{name}" in api, f"docs/api.md does not mention {name}"
    for fn in (distill_ops.kd_loss, distill_ops.sparse_kd_loss, distill_ops.topk_logprobs,
               distill_ops.sample_targets, distill_ops.fused_linear_kd_loss,
               distill_ops.fused_linear_topk):
        for param in inspect.signature(fn).parameters:
            assert param in api, f"docs/api.md does not document {fn.__name__}({param}=)"


def test_the_cli_reference_names_every_flag():
    import argparse

    from distill_ops import cli

    doc = (REPO / "docs" / "cli.md").read_text()
    commands = next(a for a in cli.build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert f"## {name}" in doc
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in doc, f"docs/cli.md does not document {name} {flag}"
