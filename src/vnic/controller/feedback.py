"""Feedback limits: what an application inside a VM may ask for, and how often.

In a session's controller settings::

    feedback:
      enabled: true
      fields: [egress.rate, ingress.rate, egress.delay, ingress.delay]
      max: {egress.rate: 50Mbit, ingress.rate: 50Mbit}
      min: {egress.delay: 1ms}
      profiles: [lan, wan]
      max_duration: 10m
      per_minute: 6

A request is ``{"set": {...}}`` or ``{"profile": NAME}``, with an optional
``nic`` (the vNIC of the VM it is about, default ``eth0``; one of the VM's
vNICs, which the caller passes in), an optional ``duration`` (clamped to ``max_duration``; without one a grant lasts
``max_duration``, or until handed back when there is none) and an optional
``why`` (text for the audit log). :meth:`FeedbackPolicy.check` answers with a
:class:`Grant` or a :class:`Refusal` whose reason names the field, the value
and the limit. A malformed request (not a mapping, unknown field, bad value)
is an :class:`~vnic.errors.InvalidInput` instead.

``off`` asked for a field counts as no limit for a rate or peak (above any
maximum) and as zero for anything else (below any minimum).

The limits are the same for every vNIC of a VM, and a grant changes the vNIC
named only. Rate limiting counts *granted* and *malformed* requests per VM (all
its vNICs together: more vNICs do not buy more requests) over the last
60 s of the injected clock (a refusal by the limits does not count); a VM that
has used up ``per_minute`` is refused before its request's fields are parsed (the
endpoint has read its body, at most 16 KiB), so a flood of malformed requests costs
one parse each up to the limit. The policy object
keeps that count, so a caller must keep one policy per session (not parse a
fresh one per request).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vnic.controller._parse import (
    attempt,
    boolean,
    collect,
    dump_span,
    field_value,
    known_keys,
    mapping,
    span,
)
from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.fields import FIELDS, OFF, Loss, dump_field
from vnic.model.launch import PRIMARY_NIC
from vnic.model.network import parse_nic_name
from vnic.model.patch import dump_patch, join, read_patch
from vnic.model.profile import parse_name
from vnic.model.units import ByteSize, Duration, Probability, Rate

POLICY_KEYS: Final = (
    "enabled",
    "fields",
    "max",
    "min",
    "profiles",
    "max_duration",
    "per_minute",
)
REQUEST_KEYS: Final = ("set", "profile", "nic", "duration", "why")
#: Fields a VM may never ask for (its MAC pool is fixed once it runs).
NEVER: Final = ("mac_range",)
ASKABLE: Final = tuple(p for p in FIELDS if p not in NEVER)
DEFAULT_PER_MINUTE: Final = 6
#: Most requests a VM may be granted per minute a policy can allow (one a millisecond).
PER_MINUTE_MAX: Final = 60_000
WINDOW_S: Final = 60.0
_UNLIMITED: Final = ("rate", "peak")


def _key(path: str, value: Any) -> float | None:
    """A number to compare a value of ``path`` with a limit; None = not comparable."""
    if value is OFF:
        return float("inf") if path.partition(".")[2] in _UNLIMITED else 0.0
    if isinstance(value, Rate | ByteSize | Duration | Probability):
        return float(value.value)
    if isinstance(value, Loss):
        return float(value.mean.value)
    return None


def _show(path: str, value: Any) -> str:
    if value is OFF:
        return "off (no limit)" if path.partition(".")[2] in _UNLIMITED else "off"
    dumped = dump_field(path, value)
    return str(dumped) if not isinstance(dumped, dict) else str(value)


@dataclass(frozen=True)
class Grant:
    """A request that may be carried out on vNIC ``nic``: typed ``values`` and/or
    ``profile``, for ``duration`` seconds (None = until handed back). ``clamped``: the
    asked duration was shortened to the session's ``max_duration``."""

    values: Mapping[str, Any] = field(default_factory=dict)
    profile: str | None = None
    duration: float | None = None
    clamped: bool = False
    nic: str = PRIMARY_NIC


@dataclass(frozen=True)
class Refusal:
    """A request the session's limits do not allow: ``reason`` says which field, value
    and limit; ``retry_after`` seconds when it was refused for asking too often."""

    reason: str
    fields: tuple[str, ...] = ()
    retry_after: float | None = None


@dataclass(frozen=True)
class FeedbackPolicy:
    """A session's feedback limits (validated), plus the per-VM request history."""

    enabled: bool = True
    fields: tuple[str, ...] = ()
    maximum: Mapping[str, Any] = field(default_factory=dict)
    minimum: Mapping[str, Any] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()
    max_duration: float | None = None
    per_minute: int = DEFAULT_PER_MINUTE
    _history: dict[str, deque[float]] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )
    _lock: threading.Lock = field(
        default_factory=threading.Lock, compare=False, repr=False, hash=False
    )

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"enabled": self.enabled, "fields": list(self.fields)}
        if self.maximum:
            doc["max"] = dump_patch(self.maximum)
        if self.minimum:
            doc["min"] = dump_patch(self.minimum)
        doc["profiles"] = list(self.profiles)
        if self.max_duration is not None:
            doc["max_duration"] = dump_span(self.max_duration)
        doc["per_minute"] = self.per_minute
        return doc

    # ------------------------------------------------------------------ requests

    def check(
        self, vm: str, request: Any, now: float, nics: Sequence[str] = (PRIMARY_NIC,)
    ) -> Grant | Refusal:
        """Decide on ``vm``'s ``request`` at ``now`` (monotonic seconds); ``nics``: the
        names of the VM's vNICs, the ones the request may name.

        Raises :class:`InvalidInput` for a malformed request (paths ``set.…``,
        ``profile``, ``nic``, ``duration``). A grant and a malformed request count
        towards ``per_minute``; beyond it the request is refused unread.
        """
        if not self.enabled:
            return Refusal("feedback is disabled in this session")
        with self._lock:
            over = self._over(vm, now)
        if over is not None:
            return over
        try:
            values, profile, asked = parse_request(request)
            nic = request_nic(request, vm, nics)
        except InvalidInput:
            self.malformed(vm, now)
            raise
        problems: list[str] = []
        refused: list[str] = []
        for path, value in values.items():
            problem = self._field_problem(path, value)
            if problem:
                problems.append(problem)
                refused.append(path)
        if profile is not None and profile not in self.profiles:
            allowed = ", ".join(self.profiles) if self.profiles else "none"
            problems.append(
                f"profile {profile} may not be asked for in this session (allowed: {allowed})"
            )
            refused.append("profile")
        if problems:
            return Refusal("; ".join(problems), tuple(refused))
        duration, clamped = asked, False
        if self.max_duration is not None and (asked is None or asked > self.max_duration):
            clamped = asked is not None
            duration = self.max_duration
        with self._lock:
            over = self._over(vm, now)
            if over is not None:
                return over
            self._history[vm].append(now)
        return Grant(values=values, profile=profile, duration=duration, clamped=clamped, nic=nic)

    def malformed(self, vm: str, now: float) -> Refusal | None:
        """Count a malformed request of ``vm`` at ``now`` towards ``per_minute`` (the
        feedback endpoint calls this for one it could not even read); a Refusal when
        the VM had already used up the limit (then nothing is counted)."""
        with self._lock:
            over = self._over(vm, now)
            if over is None:
                self._history[vm].append(now)
            return over

    def _over(self, vm: str, now: float) -> Refusal | None:
        """A Refusal when ``vm`` used up ``per_minute`` (call with the lock held)."""
        history = self._history.setdefault(vm, deque())
        while history and history[0] <= now - WINDOW_S:
            history.popleft()
        if len(history) < self.per_minute:
            return None
        wait = history[0] + WINDOW_S - now
        return Refusal(
            f"{vm} asked {len(history)} times in the last minute (granted or malformed); "
            f"this session allows {self.per_minute} requests per VM per minute; try again "
            f"in {wait:.1f} s",
            retry_after=wait,
        )

    def _field_problem(self, path: str, value: Any) -> str | None:
        if path not in self.fields:
            allowed = ", ".join(self.fields) if self.fields else "none"
            return f"{path} may not be asked for in this session (allowed: {allowed})"
        key = _key(path, value)
        high = self.maximum.get(path)
        if high is not None and key is not None and key > (_key(path, high) or 0.0):
            return (
                f"{path} {_show(path, value)} is above this session's feedback maximum "
                f"{_show(path, high)}"
            )
        low = self.minimum.get(path)
        if low is not None and key is not None and key < (_key(path, low) or 0.0):
            return (
                f"{path} {_show(path, value)} is below this session's feedback minimum "
                f"{_show(path, low)}"
            )
        return None

    def forget(self, vm: str) -> None:
        """Drop a VM's request history (it was destroyed)."""
        with self._lock:
            self._history.pop(vm, None)


def parse_request(request: Any) -> tuple[dict[str, Any], str | None, float | None]:
    """``(typed values, profile name, duration in seconds)`` of a feedback request."""
    doc = mapping(request, "", "a request: {set: {...}} or {profile: NAME}, optional duration")
    errors = known_keys(doc, "", REQUEST_KEYS)
    if errors:
        raise InvalidInput(errors)
    given = [k for k in ("set", "profile") if doc.get(k) is not None]
    if len(given) != 1:
        raise InvalidInput.one(
            "" if not given else "profile",
            " and ".join(given) if given else "neither set nor profile",
            "exactly one of set (fields) or profile (a name)",
        )
    values: dict[str, Any] = {}
    profile = None
    if "set" in given:
        values = read_patch(doc["set"], "set")
    else:
        profile = parse_name(doc["profile"], "profile")
    duration = None
    if doc.get("duration") is not None:
        duration = span(doc["duration"], "duration", positive=True)
    why = doc.get("why")
    if why is not None and (not isinstance(why, str) or len(why) > 500):
        raise InvalidInput.one("why", why, "text of at most 500 characters")
    return values, profile, duration


def request_nic(request: Mapping[str, Any], vm: str, nics: Sequence[str]) -> str:
    """The vNIC a request of ``vm`` names (``nic``, default eth0): one of ``nics``."""
    nic = parse_nic_name(request.get("nic", PRIMARY_NIC), "nic")
    if nic not in nics:
        raise InvalidInput.one("nic", nic, f"a vNIC of VM {vm}: {', '.join(nics)}")
    return nic


# --------------------------------------------------------------------------- the policy


def parse_feedback_policy(doc: Any, path: str = "feedback") -> FeedbackPolicy:
    """Read a session's feedback limits; every problem is collected and raised together."""
    doc = mapping(doc, path, "a mapping with enabled, fields, max, min, profiles, ...")
    errors = known_keys(doc, path, POLICY_KEYS)

    def at(key: str) -> str:
        return join(path, key)

    enabled = collect(errors, lambda: boolean(doc.get("enabled", True), at("enabled")), True)
    fields: list[str] = []
    raw_fields = doc.get("fields") or []
    if not isinstance(raw_fields, list):
        errors.append(FieldError(at("fields"), show_value(raw_fields), "a list of field paths"))
        raw_fields = []
    for i, f in enumerate(raw_fields):
        if f not in ASKABLE or f in fields:
            errors.append(
                FieldError(
                    at(f"fields[{i}]"),
                    show_value(f),
                    "a profile field, each once: one of " + ", ".join(ASKABLE),
                )
            )
        else:
            fields.append(f)
    bounds: dict[str, dict[str, Any]] = {}
    for key in ("max", "min"):
        bounds[key] = attempt(errors, _parse_bounds, doc, at(key), key, fields) or {}
    for f, low in bounds["min"].items():
        high = bounds["max"].get(f)
        if high is not None and (_key(f, low) or 0.0) > (_key(f, high) or 0.0):
            errors.append(
                FieldError(at(f"min.{f}"), _show(f, low), f"at most the maximum {_show(f, high)}")
            )
    profiles: list[str] = []
    raw_profiles = doc.get("profiles") or []
    if not isinstance(raw_profiles, list):
        errors.append(FieldError(at("profiles"), show_value(raw_profiles), "a list of names"))
        raw_profiles = []
    for i, name in enumerate(raw_profiles):
        got = attempt(errors, parse_name, name, at(f"profiles[{i}]"))
        if got is not None and got not in profiles:
            profiles.append(got)
    max_duration = None
    if doc.get("max_duration") is not None:
        max_duration = collect(
            errors, lambda: span(doc["max_duration"], at("max_duration"), positive=True), None
        )
    per_minute = doc.get("per_minute", DEFAULT_PER_MINUTE)
    if (
        isinstance(per_minute, bool)
        or not isinstance(per_minute, int)
        or not 1 <= per_minute <= PER_MINUTE_MAX
    ):
        errors.append(
            FieldError(
                at("per_minute"),
                show_value(per_minute),
                f"a whole number of at least 1 and at most {PER_MINUTE_MAX}",
            )
        )
        per_minute = DEFAULT_PER_MINUTE
    if errors:
        raise InvalidInput(errors)
    return FeedbackPolicy(
        enabled=enabled,
        fields=tuple(fields),
        maximum=bounds["max"],
        minimum=bounds["min"],
        profiles=tuple(profiles),
        max_duration=max_duration,
        per_minute=per_minute,
    )


def _parse_bounds(doc: Mapping[str, Any], path: str, key: str, fields: list[str]) -> dict[str, Any]:
    raw = doc.get(key)
    if raw is None:
        return {}
    raw = mapping(raw, path, "a mapping of field paths to limits, e.g. {egress.rate: 50Mbit}")
    errors: list[FieldError] = []
    out: dict[str, Any] = {}
    for f, value in raw.items():
        here = join(path, str(f))
        if f not in fields:
            errors.append(FieldError(here, show_value(value), "a limit of a field in fields"))
            continue
        typed = attempt(errors, field_value, f, value, here)
        if typed is None:
            continue
        if typed is OFF or _key(f, typed) is None:
            errors.append(FieldError(here, show_value(value), f"a value to compare {f} with"))
            continue
        out[f] = typed
    if errors:
        raise InvalidInput(errors)
    return out
