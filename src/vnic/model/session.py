"""Sessions, their policy, and the facts about a VM that assignment rules match on."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.limits import NEEDS_MAX, check_count
from vnic.model.profile import parse_labels, parse_name
from vnic.model.units import is_ascii_digits

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
SESSION_NAME_EXPECTED: Final = (
    "1-32 characters a-z, 0-9 and '-', starting and ending with a letter or digit"
)
VM_NAME_EXPECTED: Final = SESSION_NAME_EXPECTED
#: Network ids are VXLAN network identifiers: 24 bits, 0 reserved.
NETWORK_ID_MIN: Final = 1
NETWORK_ID_MAX: Final = 2**24 - 1


def parse_session_name(value: Any, path: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput.one(path, value, f"a session name of {SESSION_NAME_EXPECTED}")
    return value


def parse_vm_name(value: Any, path: str = "vm") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput.one(path, value, f"a VM name of {VM_NAME_EXPECTED}")
    return value


_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WORD_EXPECTED: Final = "1-64 characters: letters, digits, '.', '_', '-'"


def parse_role(value: Any, path: str = "role") -> str | None:
    """A VM role (None = no role)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _WORD.fullmatch(value):
        raise InvalidInput.one(path, value, f"a role of {WORD_EXPECTED}")
    return value


def parse_needs(values: Any, path: str = "needs") -> tuple[str, ...]:
    """Declared application needs: a list of short words."""
    if values is None:
        return ()
    if isinstance(values, str) or not isinstance(values, list | tuple):
        raise InvalidInput.one(path, values, "a list of need names")
    check_count(values, path, NEEDS_MAX, "needs")
    errors = [
        FieldError(f"{path}[{i}]", show_value(v), f"a need name of {WORD_EXPECTED}")
        for i, v in enumerate(values)
        if not isinstance(v, str) or not _WORD.fullmatch(v)
    ]
    if errors:
        raise InvalidInput(errors)
    return tuple(values)


def parse_network_id(value: Any, path: str = "network_id") -> int:
    if isinstance(value, str) and is_ascii_digits(value.strip()):
        value = int(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not NETWORK_ID_MIN <= value <= NETWORK_ID_MAX
    ):
        raise InvalidInput.one(
            path, value, f"an integer {NETWORK_ID_MIN}..{NETWORK_ID_MAX} (a VXLAN VNI)"
        )
    return value


@dataclass(frozen=True)
class VmFacts:
    """What rules may match a vNIC on: its VM's name, role, labels and declared
    application needs, and the vNIC's network (None: matched as ``default``)."""

    name: str
    role: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    network: str | None = None


@dataclass(frozen=True)
class AssignmentRule:
    """Assign ``profile`` to VMs that match every given condition.

    ``name`` is a shell glob on the VM name; ``role`` must equal the VM's role;
    every ``labels`` pair must be on the VM; every ``needs`` entry must be among
    the VM's declared needs; ``network`` must be the vNIC's network. A rule with no
    condition matches every vNIC of every VM.
    """

    profile: str
    name: str | None = None
    role: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    network: str | None = None

    def matches(self, vm: VmFacts) -> bool:
        if self.name is not None and not fnmatch.fnmatchcase(vm.name, self.name):
            return False
        if self.network is not None and (vm.network or "default") != self.network:
            return False
        if self.role is not None and vm.role != self.role:
            return False
        if any(vm.labels.get(k) != v for k, v in self.labels.items()):
            return False
        return all(n in vm.needs for n in self.needs)

    def describe(self) -> str:
        parts = []
        if self.name is not None:
            parts.append(f"name={self.name}")
        if self.role is not None:
            parts.append(f"role={self.role}")
        if self.network is not None:
            parts.append(f"network={self.network}")
        parts += [f"label.{k}={v}" for k, v in sorted(self.labels.items())]
        parts += [f"needs={n}" for n in self.needs]
        return ",".join(parts) or "any"

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"profile": self.profile}
        if self.name is not None:
            doc["name"] = self.name
        if self.role is not None:
            doc["role"] = self.role
        if self.network is not None:
            doc["network"] = self.network
        if self.labels:
            doc["labels"] = dict(sorted(self.labels.items()))
        if self.needs:
            doc["needs"] = list(self.needs)
        return doc

    @classmethod
    def from_document(cls, doc: Any, path: str = "rule") -> AssignmentRule:
        if not isinstance(doc, dict):
            raise InvalidInput.one(path, doc, "a rule mapping with profile and match keys")
        errors: list[FieldError] = []
        allowed = {"profile", "name", "role", "network", "labels", "needs"}
        for key in sorted(set(doc) - allowed):
            errors.append(
                FieldError(f"{path}.{key}", "unknown key", "one of " + ", ".join(sorted(allowed)))
            )
        profile = ""
        try:
            profile = parse_name(doc.get("profile"), f"{path}.profile")
        except InvalidInput as exc:
            errors.extend(exc.errors)
        for key in ("name", "role"):
            v = doc.get(key)
            if v is not None and (not isinstance(v, str) or not v or len(v) > 64):
                errors.append(FieldError(f"{path}.{key}", show_value(v), "text of 1-64 characters"))
        network = doc.get("network")
        if network is not None and (not isinstance(network, str) or not _NAME.fullmatch(network)):
            errors.append(
                FieldError(
                    f"{path}.network", show_value(network), f"a network name of {VM_NAME_EXPECTED}"
                )
            )
        labels: dict[str, str] = {}
        try:
            labels = parse_labels(doc.get("labels"), f"{path}.labels")
        except InvalidInput as exc:
            errors.extend(exc.errors)
        needs: Any = doc.get("needs") or []
        if isinstance(needs, str):
            needs = [needs]
        try:
            needs = list(parse_needs(needs, f"{path}.needs"))
        except InvalidInput as exc:
            errors.extend(exc.errors)
            needs = []
        if errors:
            raise InvalidInput(errors)
        return cls(
            profile=profile,
            name=doc.get("name"),
            role=doc.get("role"),
            labels=labels,
            needs=tuple(needs),
            network=network,
        )

    @classmethod
    def parse_cli(cls, text: str, path: str = "--rule") -> AssignmentRule:
        """Read ``profile=P,name=GLOB,role=R,network=NET,label.K=V,needs=N`` (CLI form)."""
        doc: dict[str, Any] = {}
        for part in (p for p in text.split(",") if p.strip()):
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not eq:
                raise InvalidInput.one(
                    path,
                    text,
                    "profile=P followed by name=GLOB, role=R, network=NET, label.K=V, needs=N",
                )
            if key.startswith("label."):
                doc.setdefault("labels", {})[key[6:]] = value
            elif key == "needs":
                doc.setdefault("needs", []).append(value)
            else:
                doc[key] = value
        return cls.from_document(doc, path)


@dataclass(frozen=True)
class Policy:
    """A session's profile policy: default profile, ordered rules, overrides allowed."""

    default_profile: str | None = None
    rules: tuple[AssignmentRule, ...] = ()
    overrides_allowed: bool = True

    def first_match(self, vm: VmFacts) -> tuple[int, AssignmentRule] | None:
        """The first rule (0-based index, rule) that matches ``vm``."""
        for i, rule in enumerate(self.rules):
            if rule.matches(vm):
                return i, rule
        return None

    def profile_names(self) -> Iterable[str]:
        if self.default_profile:
            yield self.default_profile
        for rule in self.rules:
            yield rule.profile
