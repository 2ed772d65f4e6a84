"""The structure the architecture relies on, checked from the source: the product packages import
each other without cycles (also not through imports hidden inside functions), and only wire/
reads message headers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wire", "broker", "daemon", "client")
#: the old ways to read a header map field by field (wire.protocol) or to decode one by hand
HEADER_READERS = frozenset({"require", "optional", "reencode", "decode", "check_body", "check_headers", "unpackb"})


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Product modules ``name`` imports anywhere in its body: inside functions and under
    TYPE_CHECKING too, since both are ways of hiding a cycle, not of removing it."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` depends on the module; `from mod import name` on the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_product_code_has_no_import_cycle() -> None:
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ re-exporting its modules is not a dependency of those modules on it
    for name in list(graph):
        if name in PACKAGES:
            for dep in graph[name]:
                graph[dep].discard(name)
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_wire_reads_message_headers() -> None:
    """Outside wire/, no code decodes a raw header or indexes one: records carry the fields."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith("wire"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Attribute, ast.Call)) else ""
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("header", "h", "hdr")
                and isinstance(node.slice, ast.Constant)
            ):
                offenders.append(f"{name}: {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and node.attr == "header":
                offenders.append(f"{name}: {text}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("P", "protocol", "msgpack")
                and node.func.attr in HEADER_READERS
            ):
                offenders.append(f"{name}: {text[:80]}")
    assert not offenders, "\n".join(offenders)
