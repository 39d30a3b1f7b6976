"""Profile patches written by hand: nested (``{egress: {rate: 5Mbit}}``) or with dotted paths
(``{egress.rate: 5Mbit}``), read into typed values (``"egress.rate" -> Rate``, ``OFF``).

The one reader of such patches: the API's runtime adjustments
(:func:`typed_patch`, ``set`` of ``PUT .../adjustments/{source}``) and the
controller's documents (:func:`read_patch`: rules, scenario steps, feedback
limits). A field given both ways (``{"egress": {"rate": ...}, "egress.rate":
...}``) or twice is refused, not resolved by key order. Errors are
:class:`~vnic.errors.InvalidInput` naming the path they were given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.profile import parse_patch, values_to_document


def join(path: str, key: str) -> str:
    """``key`` under field path ``path``: ``a.b``, ``a[0]`` for an index, ``key`` at the top."""
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def read_patch(raw: Any, path: str) -> dict[str, Any]:
    """A patch of at least one field, nested or dotted, as typed values (``OFF`` for
    ``off``); errors name ``path`` and the field."""
    if not isinstance(raw, Mapping):
        raise InvalidInput.one(path, raw, "a mapping of profile fields, e.g. {egress.rate: 50Mbit}")
    if not raw:
        raise InvalidInput.one(path, raw, "at least one profile field")
    nested = _nested(raw, path)  # its errors name their whole path already
    try:
        return dict(parse_patch(nested))
    except InvalidInput as exc:
        raise exc.under(path) from None


def typed_patch(doc: Mapping[str, Any] | None, path: str = "set") -> dict[str, Any]:
    """As :func:`read_patch`, but none (``None`` or ``{}``) is the empty patch."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise InvalidInput.one(path, doc, "a mapping of profile fields")
    if not doc:
        return {}
    return read_patch(doc, path)


def _nested(doc: Mapping[Any, Any], path: str) -> dict[str, Any]:
    """``doc`` with its dotted keys folded into sections; a field given twice (dotted and
    nested, or dotted twice) or a dotted key under a section that is no mapping is refused."""
    nested: dict[str, Any] = {}
    errors: list[FieldError] = []
    for key, value in doc.items():
        head, dot, tail = str(key).partition(".")
        if dot:
            section = nested.setdefault(head, {})
            if not isinstance(section, dict):
                errors.append(FieldError(join(path, head), show_value(section), "a mapping"))
                continue
            if tail in section:
                errors.append(FieldError(join(path, str(key)), "given twice", "each field once"))
                continue
            section[tail] = value
        elif isinstance(value, Mapping) and isinstance(nested.get(key), dict):
            for sub, sub_value in value.items():
                if sub in nested[key]:
                    errors.append(
                        FieldError(join(path, f"{key}.{sub}"), "given twice", "each field once")
                    )
                nested[key][sub] = sub_value
        else:
            nested[str(key)] = dict(value) if isinstance(value, Mapping) else value
    if errors:
        raise InvalidInput(errors)
    return nested


def dump_patch(values: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical document of a patch: dotted paths, canonical values, in FIELDS order."""
    out: dict[str, Any] = {}
    for head, value in values_to_document(values).items():
        if isinstance(value, dict):
            for tail, sub in value.items():
                out[f"{head}.{tail}"] = sub
        else:
            out[head] = value
    return out
