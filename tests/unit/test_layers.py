"""The import graph of nmi/: no cycles, no upward imports, emulators never imported.

Read from the source with ``ast`` (every ``import``, also those inside
functions), so a new cycle or a shortcut to a higher layer fails here the
moment it is written, not when it becomes a maintenance problem.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nmi", "iptables")

# Lowest first.  A module may import modules of its own layer or of a lower one.
LAYERS: list[tuple[str, ...]] = [
    ("iptables",),
    (
        "nmi",
        "nmi.config",
        "nmi.flags",
        "nmi.loop",
        "nmi.ratelimit",
        "nmi.ops.logs",
        "nmi.jwt_claims",
    ),
    ("nmi.kube",),
    ("nmi.ops",),
    ("nmi.identity",),
    ("nmi.tokens",),
    ("nmi.azure",),
    ("nmi.node",),
    ("nmi.imds",),
    ("nmi.explain",),
    ("nmi.mic",),
    ("nmi.app", "nmi.controller"),
    ("nmi.cli", "nmi.__main__"),
]
# The one guarded import of what is not part of the distribution: `nmi sandbox`.
ALLOWED_OUTSIDE = {("nmi.cli", "nmi_sandbox.sandbox")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Absolute names of the modules ``name`` imports (relative imports resolved;
    ``from package import module`` is an import of that module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                prefix = ".".join(base[:keep])
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in known else target


def graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for target in imports(name, path, names):
            if (target in known and target != name) or target.startswith("nmi_sandbox"):
                targets.add(target)
        edges[name] = targets
    return edges


def layer_of(name: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")
    return rank


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_upward_imports() -> None:
    upward = []
    for source, targets in graph().items():
        for target in targets:
            if target.startswith("nmi_sandbox"):
                if (source, target) not in ALLOWED_OUTSIDE:
                    upward.append(f"{source} -> {target} (emulators are not runtime code)")
            elif layer_of(target) > layer_of(source):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = strongly_connected(edges)
    assert not cycles, f"import cycles: {cycles}"


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(edges.get(node, ()))
    return seen


@pytest.mark.parametrize(
    "entry",
    ["nmi.imds.routes", "nmi.imds.connection", "nmi.imds.listener", "nmi.imds.token_route"],
)
def test_the_request_path_imports_nothing_of_the_command_line(entry: str) -> None:
    reached = reachable(entry, graph())
    assert not {m for m in reached if m.startswith(("nmi.cli", "nmi.explain", "nmi.app"))}


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The test above can fail: a cycle and an upward edge are found in a made-up graph."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer_of("nmi.kube.informer") < layer_of("nmi.imds.routes")
