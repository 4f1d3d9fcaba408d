"""The import contract of DESIGN §8: imports point down the layers, never sideways between stream/
and trainer/, never in a circle, and no private name crosses a module boundary.

    hymirec CLI / demo, bench/                                  (top)
    stream/ (Kafka side)        trainer/ (fit, evaluate, publish, online)
    serving/ (retrieval: runtime, reader, metrics)
    model/ (torch modules, artifact)       store/ (schemas, tables, registry, events, logs)
    hymirec.settings, hymirec.errors, hymirec.procs              (base)

Every import counts, at module level or inside a function: a function-level import is no way
around the contract.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hymirec", "bench", "stream", "trainer", "serving", "model", "store")
BASE = {"hymirec.settings", "hymirec.errors", "hymirec.procs"}
RANK = {"model": 1, "store": 1, "serving": 2, "stream": 3, "trainer": 3, "bench": 4, "hymirec": 4}
MAX_LINES = 600


def layer(module: str) -> int:
    return 0 if module in BASE or module == "hymirec" else RANK[module.split(".")[0]]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(our modules ``path`` imports, private names it takes from another module)."""
    targets, private = set(), []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    targets.add(full)
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"{node.module}.{alias.name}")
            if node.module in known:
                targets.add(node.module)
        elif isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name in known}
    return targets, private


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], list[str]]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_imports_point_down_and_stream_and_trainer_stay_apart(graph):
    wrong = []
    for name, (targets, _) in graph.items():
        for target in targets - {name}:
            mine, theirs = name.split(".")[0], target.split(".")[0]
            if mine != theirs and layer(target) > layer(name):
                wrong.append(f"{name} -> {target} (upward)")
            elif {mine, theirs} == {"stream", "trainer"}:
                wrong.append(f"{name} -> {target} (stream and trainer)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_private_name_crosses_a_module(graph):
    assert not [f"{name} imports {p}" for name, (_, private) in graph.items() for p in private]


def test_no_import_circles(graph):
    edges = {name: targets - {name} for name, (targets, _) in graph.items()}
    circles = []
    for start in edges:
        # a path back to ``start`` through other modules is a circle (names below start: found once)
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt > start and nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, "\n".join(circles)


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {str(path.relative_to(ROOT)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
