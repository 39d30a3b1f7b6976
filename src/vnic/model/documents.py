"""Reading and writing profile files: YAML or JSON, one profile or many.

A file may hold one profile mapping, a list of them, or (YAML) several
documents separated by ``---``. A directory means every ``*.yaml``, ``*.yml``
and ``*.json`` file in it, in name order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vnic.errors import FieldError, InvalidInput
from vnic.model.loading import DocumentError, load_yaml_all, loads_json
from vnic.model.profile import ProfileSpec, parse_profile_document

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Document:
    """One profile document and where it came from (``file`` or ``file[i]``)."""

    origin: str
    body: Any


class DocumentErrors(InvalidInput):
    """Field errors from several documents, each error prefixed by its document's origin."""

    def __init__(self, per_document: Sequence[tuple[str, InvalidInput]]) -> None:
        self.per_document = list(per_document)
        super().__init__(
            [FieldError(e.path, e.value, e.expected) for _, exc in per_document for e in exc.errors]
        )
        self.args = (
            "; ".join(f"{origin}: {e}" for origin, exc in per_document for e in exc.errors),
        )

    def __str__(self) -> str:
        return str(self.args[0])


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    return [path]


def read_documents(sources: Sequence[str]) -> list[Document]:
    """Read every profile document from ``sources`` (paths, directories, or ``-`` for stdin)."""
    docs: list[Document] = []
    for source in sources:
        if source == "-":
            docs += _parse_text(sys.stdin.read(), "<stdin>", json_first=False)
            continue
        path = Path(source)
        if not path.exists():
            raise InvalidInput.one("file", source, "an existing file or directory")
        for file in _files(path):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput.one(
                    "file", str(file), f"a readable UTF-8 file ({exc})"
                ) from None
            docs += _parse_text(text, str(file), json_first=file.suffix.lower() == ".json")
    if not docs:
        raise InvalidInput.one("file", ", ".join(sources), "at least one profile document")
    return docs


def documents_from_text(text: str, origin: str) -> list[Document]:
    """The profile documents in YAML (or JSON) ``text``, as :func:`read_documents` reads a
    file (the web UI's import sends the text it was given)."""
    docs = _parse_text(text, origin, json_first=False)
    if not docs:
        raise InvalidInput.one("file", origin, "at least one profile document")
    return docs


def _parse_text(text: str, origin: str, *, json_first: bool) -> list[Document]:
    # Strict parsers: a key given twice, deep nesting or a YAML alias is refused
    # (see vnic.model.loading), never resolved silently or left to recurse.
    try:
        bodies = (
            [loads_json(text)] if json_first else [d for d in load_yaml_all(text) if d is not None]
        )
    except DocumentError as exc:
        kind = "JSON" if json_first else "YAML"
        raise InvalidInput.one("file", origin, f"valid {kind} ({exc})") from None
    flat: list[Any] = []
    for body in bodies:
        flat += body if isinstance(body, list) else [body]
    if len(flat) == 1:
        return [Document(origin, flat[0])]
    return [Document(f"{origin}[{i}]", body) for i, body in enumerate(flat)]


def parse_documents(docs: Sequence[Document]) -> list[ProfileSpec]:
    """Validate every document; all errors of all documents are raised together."""
    specs: list[ProfileSpec] = []
    failed: list[tuple[str, InvalidInput]] = []
    for doc in docs:
        try:
            specs.append(parse_profile_document(doc.body))
        except InvalidInput as exc:
            name = doc.body.get("name") if isinstance(doc.body, dict) else None
            failed.append((f"{doc.origin} (profile {name!r})" if name else doc.origin, exc))
    if failed:
        if len(docs) == 1:
            raise failed[0][1]
        raise DocumentErrors(failed)
    return specs


def dump_yaml(docs: Sequence[Any]) -> str:
    """Profiles as one YAML list (a single profile as a mapping)."""
    body: Any = docs[0] if len(docs) == 1 else list(docs)
    return yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: keys of ``patch`` replace, ``None`` removes, the rest stays.

    Nested mappings merge; any other value (lists included) replaces whole.
    Neither argument is modified.
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
