"""Resolution: which value every field of a VM's vNIC gets, and where it came from.

For each field of one vNIC, lowest to highest::

    built-in default < default profile (the vNIC's network's own, else the session's)
        < first matching assignment rule (rules may match the vNIC's network)
        < the vNIC's override (a profile, then a per-field patch)
        < the vNIC's runtime adjustments

A layer that leaves a field unset inherits it; ``OFF`` removes what lower
layers set; a value replaces. Fields still unset after all layers get the
derived defaults of :func:`vnic.model.profile.derived_values`. The result is
checked as a complete profile, and every field carries its :class:`Source`.

This module is pure: callers load profiles and pass them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput
from vnic.model.fields import FIELDS, OFF, dump_field
from vnic.model.profile import BUILTIN_VALUES, Profile, build_profile, check_rules, derived_values
from vnic.model.session import Policy, VmFacts

BUILTIN: Final = "builtin"
SESSION_DEFAULT: Final = "session-default"
RULE: Final = "rule"
VM_PROFILE: Final = "vm-profile"
VM_PATCH: Final = "vm-patch"
RUNTIME: Final = "runtime"
DERIVED: Final = "derived"
UNSET: Final = "unset"
#: Layer kinds from lowest to highest precedence.
LAYER_ORDER: Final = (BUILTIN, SESSION_DEFAULT, RULE, VM_PROFILE, VM_PATCH, RUNTIME)


@dataclass(frozen=True)
class Source:
    """Where a field's value came from: the layer kind and which object in it."""

    layer: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.layer} ({self.detail})" if self.detail else self.layer

    def to_dict(self) -> dict[str, str]:
        return {"layer": self.layer, "detail": self.detail}


@dataclass(frozen=True)
class ProfileRef:
    """One revision of a stored profile, as resolution input."""

    name: str
    revision: int
    values: Mapping[str, Any]

    def __str__(self) -> str:
        return f"{self.name} r{self.revision}"


@dataclass(frozen=True)
class Adjustment:
    """A runtime change of some fields, until ``expires_at`` (None = until removed).

    ``profile``: a profile whose values the layer takes first (a switch of
    profile), with ``values`` on top. ``source`` says who made it ("user",
    "rule:NAME", "feedback", "scenario:NAME").
    """

    values: Mapping[str, Any]
    reason: str
    expires_at: datetime | None = None
    profile: ProfileRef | None = None
    source: str = "user"

    def active(self, now: datetime | None) -> bool:
        return self.expires_at is None or now is None or now < self.expires_at


@dataclass(frozen=True)
class Layer:
    kind: str
    detail: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Effective:
    """The resolved profile of one vNIC.

    ``values`` holds every field that has a value (typed); ``sources`` names the
    layer of every field any layer touched, including fields turned off;
    ``revisions`` maps each contributing profile to the revision used.
    """

    profile: Profile
    values: Mapping[str, Any]
    sources: Mapping[str, Source]
    revisions: Mapping[str, int] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str, Source]]:
        """``(field, value as text, source)`` for every field, in the order of FIELDS."""
        out = []
        for path in FIELDS:
            if path in self.values:
                out.append((path, _text(dump_field(path, self.values[path])), self.sources[path]))
            else:
                out.append((path, "-", self.sources.get(path, Source(UNSET))))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "revisions": dict(self.revisions),
            "fields": {
                path: {
                    "value": dump_field(path, self.values[path]) if path in self.values else None,
                    "source": self.sources.get(path, Source(UNSET)).to_dict(),
                }
                for path in FIELDS
            },
        }


def _text(dumped: Any) -> str:
    if isinstance(dumped, list):
        return "; ".join(_text(x) for x in dumped) or "[]"
    if isinstance(dumped, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in dumped.items()) + "}"
    if isinstance(dumped, bool):
        return "true" if dumped else "false"
    return str(dumped)


def merge(layers: Sequence[Layer]) -> tuple[dict[str, Any], dict[str, Source]]:
    """Fold layers (lowest first) field by field. OFF removes; unset inherits."""
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for layer in layers:
        for path, value in layer.values.items():
            sources[path] = Source(layer.kind, layer.detail)
            if value is OFF:
                values.pop(path, None)
            else:
                values[path] = value
    return values, sources


def complete(layers: Sequence[Layer], revisions: Mapping[str, int] | None = None) -> Effective:
    """Merge ``layers`` over the built-in defaults, add derived defaults, validate.

    Raises :class:`InvalidInput` with the offending fields; each error's value
    names the layer the value came from.
    """
    values, sources = merge([Layer(BUILTIN, "", BUILTIN_VALUES), *layers])
    for path, value in derived_values(values).items():
        values[path] = value
        sources[path] = Source(DERIVED, _derived_from(path))
    errors = check_rules(values, complete=True)
    if errors:
        raise InvalidInput(
            [
                FieldError(
                    e.path,
                    f"{e.value} (from {sources.get(e.path.split('[')[0], Source(UNSET))})",
                    e.expected,
                )
                for e in errors
            ]
        )
    return Effective(build_profile(values), values, sources, dict(revisions or {}))


def _derived_from(path: str) -> str:
    d, _, name = path.partition(".")
    return {
        "burst": f"from {d}.rate and mtu",
        "queue": f"from {d}.rate, {d}.delay and {d}.jitter",
        "distribution": f"default for {d}.jitter",
    }.get(name, "")


def resolve(
    *,
    vm: VmFacts,
    policy: Policy,
    profiles: Mapping[str, ProfileRef],
    vm_profile: str | None = None,
    vm_patch: Mapping[str, Any] | None = None,
    adjustments: Sequence[Adjustment] = (),
    now: datetime | None = None,
    network_profile: str | None = None,
) -> Effective:
    """Resolve the effective profile of one vNIC (``vm.network``: its network).

    ``network_profile``: the network's own default profile, which takes the place
    of the session's. ``vm_profile``/``vm_patch``/``adjustments`` are the vNIC's.
    ``profiles`` must hold every profile the policy, ``network_profile`` and
    ``vm_profile`` name (the caller loads them; a missing one is a KeyError, a
    programming error). Expired adjustments (``expires_at <= now``) are ignored.
    """
    layers: list[Layer] = []
    revisions: dict[str, int] = {}

    def use(kind: str, detail: str, ref: ProfileRef) -> None:
        layers.append(Layer(kind, detail, ref.values))
        revisions[ref.name] = ref.revision

    if network_profile:
        ref = profiles[network_profile]
        use(SESSION_DEFAULT, f"network {vm.network}: {ref}", ref)
    elif policy.default_profile:
        ref = profiles[policy.default_profile]
        use(SESSION_DEFAULT, str(ref), ref)
    hit = policy.first_match(vm)
    if hit is not None:
        index, rule = hit
        ref = profiles[rule.profile]
        use(RULE, f"#{index + 1} {rule.describe()} -> {ref}", ref)
    if vm_profile:
        ref = profiles[vm_profile]
        use(VM_PROFILE, str(ref), ref)
    if vm_patch:
        layers.append(Layer(VM_PATCH, "override", vm_patch))
    for adj in adjustments:
        if adj.active(now):
            until = f", until {adj.expires_at.isoformat()}" if adj.expires_at else ""
            values = dict(adj.values)
            switch = ""
            if adj.profile is not None:
                values = {**adj.profile.values, **values}
                revisions[adj.profile.name] = adj.profile.revision
                switch = f" -> {adj.profile}"
            layers.append(Layer(RUNTIME, f"{adj.source}: {adj.reason}{switch}{until}", values))
    return complete(layers, revisions)
