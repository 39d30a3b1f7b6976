"""Reading user JSON and YAML strictly: the one place documents from users are parsed.

Compared with ``json.loads`` and ``yaml.safe_load`` this refuses:

* a key given twice in one mapping (both parsers keep the last one silently, so
  ``{"rate": "1Gbit", "rate": "1kbit"}`` would mean something its reader did not see);
* nesting deeper than :data:`~vnic.model.limits.DEPTH_MAX` (10 000 ``[`` made the
  parsers recurse until ``RecursionError``, a 500 with a plain-text body);
* YAML aliases (``*name``): they let a small file expand into a huge document
  ("billion laughs") once anything walks it, and no vnic document needs them.

Every refusal is a :class:`DocumentError`, a ``ValueError`` whose text says what
and where; callers turn it into the field error of their input (``file``,
``body``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node
from yaml.scanner import ScannerError

from vnic.model.limits import DEPTH_MAX

_T = TypeVar("_T")


class DocumentError(ValueError):
    """A document that is not valid JSON/YAML, or that breaks one of the rules above."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DocumentError(f"key {key!r} given twice in one object")
        out[key] = value
    return out


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON-like data (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > DEPTH_MAX:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_depth(value: Any) -> Any:
    """``value``, if it nests at most :data:`DEPTH_MAX` levels."""
    if depth(value) > DEPTH_MAX:
        raise DocumentError(f"nested deeper than {DEPTH_MAX} levels")
    return value


def loads_json(text: str | bytes) -> Any:
    """Parse JSON text: duplicate keys, ``NaN``/``Infinity`` and deep nesting refused."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise DocumentError(f"nested deeper than {DEPTH_MAX} levels") from None
    except DocumentError:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DocumentError(str(exc)) from None
    return check_depth(value)


def _no_constant(name: str) -> Any:
    raise DocumentError(f"{name} is not a JSON number")


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys, aliases and deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    # The scanner keeps per-level state it walks for every token, so deep nesting is
    # quadratic there already (with only the composer bounded, 10 000 "[" still took
    # 0.45 s; plain safe_load took 11.8 s on a busy machine, then RecursionError):
    # refuse it at the scanner, as soon as the level is reached.
    def fetch_flow_collection_start(self, token_class: type[yaml.Token]) -> None:
        if self.flow_level >= DEPTH_MAX:
            self._too_deep()
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= DEPTH_MAX:
            self._too_deep()
        return super().add_indent(column)

    def _too_deep(self) -> None:
        raise ScannerError(None, None, f"nested deeper than {DEPTH_MAX} levels", self.get_mark())

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise ComposerError(
                None, None, "aliases (*name) are not accepted in vnic documents", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > DEPTH_MAX:
                raise ComposerError(
                    None,
                    None,
                    f"nested deeper than {DEPTH_MAX} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class refuses it with its own message
            if duplicate:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found key {key!r} twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_error(exc: yaml.YAMLError) -> DocumentError:
    return DocumentError(str(exc).replace("\n", " "))


def load_yaml(text: str) -> Any:
    """Parse one YAML (or JSON) document strictly (see the module docstring)."""
    return _strictly(text, lambda loader: loader.get_single_data())


def load_yaml_all(text: str) -> list[Any]:
    """Every document of a YAML stream (``---`` separated), parsed strictly."""

    def every(loader: StrictLoader) -> list[Any]:
        docs: list[Any] = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            docs.append(loader.get_data())
        return docs

    return _strictly(text, every)


def _strictly(text: str, read: Callable[[StrictLoader], _T]) -> _T:
    """``read`` a :class:`StrictLoader` on ``text``, its failures as DocumentErrors."""
    loader = StrictLoader(text)
    try:
        return read(loader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc) from None
    except ValueError as exc:  # a constructor's int() or date(): 5000 digits, 2026-13-45
        raise DocumentError(f"a value YAML cannot read: {exc}") from None
    except RecursionError:  # pragma: no cover - the depth bound comes first
        raise DocumentError(f"nested deeper than {DEPTH_MAX} levels") from None
    finally:
        loader.dispose()
