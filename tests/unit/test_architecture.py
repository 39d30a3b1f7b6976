"""Rules of the layout that import-linter cannot check (it checks the imports; see the
``[tool.importlinter]`` contracts in pyproject.toml and docs/architecture.md):

- no capability probing by name: ``getattr(x, "name")`` / ``hasattr(x, "name")`` with a
  literal name asks an object whether it happens to have a method; the interfaces
  (the agent port, the driver base) say what each object has;
- no god modules: a module over ``LINES_MAX`` lines says why in its docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vnic"
#: Lines a module may have without a reason in its docstring.
LINES_MAX = 600
#: How a long module's docstring gives its reason.
LONG_REASON = "Why one module:"


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "migrations" not in p.parts)


def test_no_capability_probing_by_name() -> None:
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
                found.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
    assert found == [], "capability probing by name:\n" + "\n".join(found)


def test_long_modules_say_why() -> None:
    long = []
    for path in _modules():
        text = path.read_text()
        lines = text.count("\n")
        if lines <= LINES_MAX:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if LONG_REASON not in doc:
            long.append(f"{path.relative_to(SRC.parent)}: {lines} lines")
    assert long == [], f"modules over {LINES_MAX} lines without '{LONG_REASON}':\n" + "\n".join(
        long
    )
