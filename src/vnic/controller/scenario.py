"""Scenarios: a timeline of changes to a session's VMs, or a Mahimahi trace replayed as rates.

A timeline::

    name: degrade
    vms: [a, b]          # default: every VM of the session (the caller's choice)
    nic: eth1            # the vNIC of each VM it changes (default eth0)
    loop: false
    duration: 120s       # optional: length of one run (the period when looping);
                         # default: the time of the last step
    steps:
      - at: 0s
        profile: lan     # switch the scenario's layer to this profile (resolved by the caller)
      - at: 30s
        set: {egress.loss: 5%}
      - at: 60s
        set: {egress.delay: 300ms, ingress.delay: 300ms}
      - at: 90s
        clear: true      # empty the scenario's layer

A trace replay::

    name: lte
    trace: [1, 1, 2, 5, ...]   # or the trace text; or a file name, read by the caller's reader
    field: egress.rate         # or fields: [egress.rate, ingress.rate]
    window: 100ms              # rate resolution (default 100ms)
    loop: true

Steps accumulate into one *layer* (the scenario's runtime adjustment): ``set``
adds fields, ``profile`` starts the layer afresh from that profile (the caller
resolves the name), ``clear`` empties it. Each loop cycle starts afresh too,
with its first step. A trace becomes one step per window whose rate differs
from the previous one; a window without delivery opportunities gets the
smallest rate, 1 bit/s.

:class:`ScenarioRun` plays a scenario against an injected monotonic clock; it
does nothing by itself: a scheduler asks :meth:`~ScenarioRun.due` for the
steps whose time has come and sleeps :meth:`~ScenarioRun.next_due_in`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from vnic.controller._parse import (
    attempt,
    boolean,
    collect,
    dump_span,
    known_keys,
    mapping,
    span,
    span_ns,
)
from vnic.controller.trace import Trace, parse_trace, window_ms
from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.launch import PRIMARY_NIC
from vnic.model.network import parse_nic_name
from vnic.model.patch import dump_patch, join, read_patch
from vnic.model.profile import parse_name
from vnic.model.units import Rate

SCENARIO_KEYS: Final = (
    "name",
    "description",
    "vms",
    "nic",
    "loop",
    "duration",
    "steps",
    "trace",
    "field",
    "fields",
    "window",
)
STEP_KEYS: Final = ("at", "profile", "set", "clear")
TRACE_FIELDS: Final = ("egress.rate", "ingress.rate")
DEFAULT_WINDOW: Final = 0.1
#: Shortest trace window, gap between two steps, and loop period, in seconds (20 ms):
#: every step is a live change of each VM it reaches (database, agent, kernel), and an
#: owner's 1 ms trace on three VMs kept 85 % of a core busy. 20 ms is below any
#: trace a user replays (Mahimahi's own resolution is 1 ms, but its links are read at
#: tens of ms) and keeps a scenario to 50 changes per second per VM.
MIN_SPACING: Final = 0.02
#: Most steps a scenario may have (a trace gives one per window that changes).
MAX_STEPS: Final = 100_000

IDLE: Final = "idle"
RUNNING: Final = "running"
PAUSED: Final = "paused"
STOPPED: Final = "stopped"
FINISHED: Final = "finished"
STATES: Final = (IDLE, RUNNING, PAUSED, STOPPED, FINISHED)
#: Slack when comparing the timeline position with a step's time (float clocks).
EPSILON: Final = 1e-9


@dataclass(frozen=True)
class Step:
    """One point of the timeline: at ``at`` seconds, ``clear`` the layer, or switch it
    to ``profile`` and/or set ``values`` (typed, ``OFF`` removes) on it."""

    at: float
    profile: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    clear: bool = False

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"at": dump_span(self.at)}
        if self.clear:
            doc["clear"] = True
        if self.profile is not None:
            doc["profile"] = self.profile
        if self.values:
            doc["set"] = dump_patch(self.values)
        return doc


@dataclass(frozen=True)
class ScenarioLayer:
    """What the scenario's adjustment should hold: a profile (name, or None) with
    ``values`` on top. Empty = the scenario's adjustment removed."""

    profile: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.profile is None and not self.values

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "set": dump_patch(self.values)}


@dataclass(frozen=True)
class Scenario:
    """A validated scenario. ``duration`` is the length of one run in seconds (the
    period when ``loop``); ``trace``/``fields``/``window`` are set for a trace replay,
    whose ``steps`` are computed from it. ``nic``: the vNIC of each VM whose layer the
    scenario writes."""

    name: str
    steps: tuple[Step, ...]
    duration: float
    vms: tuple[str, ...] = ()
    loop: bool = False
    description: str = ""
    trace: Trace | None = None
    fields: tuple[str, ...] = ()
    window: float = DEFAULT_WINDOW
    nic: str = PRIMARY_NIC

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name}
        if self.description:
            doc["description"] = self.description
        if self.vms:
            doc["vms"] = list(self.vms)
        if self.nic != PRIMARY_NIC:
            doc["nic"] = self.nic
        doc["loop"] = self.loop
        if self.trace is not None:
            doc["trace"] = list(self.trace.timestamps_ms)
            doc["fields"] = list(self.fields)
            doc["window"] = dump_span(self.window)
        else:
            doc["duration"] = dump_span(self.duration)
            doc["steps"] = [s.to_document() for s in self.steps]
        return doc


# --------------------------------------------------------------------------- parsing


def parse_scenario(
    doc: Any, path: str = "", read_file: Callable[[str], str] | None = None
) -> Scenario:
    """Read a scenario document; every problem is collected and raised together.

    A ``trace`` given as a file name is read with ``read_file`` (the caller
    decides which files a request may name); without one, only inline traces
    (a list, or text with one timestamp per line) are taken.
    """
    doc = mapping(doc, path, "a scenario: a mapping with name and steps (or trace)")
    errors = known_keys(doc, path, SCENARIO_KEYS)

    def at(key: str) -> str:
        return join(path, key)

    name = collect(errors, lambda: parse_name(doc.get("name"), at("name")), "")
    description = doc.get("description") or ""
    if not isinstance(description, str) or len(description) > 1000:
        errors.append(
            FieldError(at("description"), show_value(description), "text of 1000 characters")
        )
        description = ""
    vms: list[str] = []
    raw_vms = doc.get("vms")
    if raw_vms is not None:
        if not isinstance(raw_vms, list):
            errors.append(FieldError(at("vms"), show_value(raw_vms), "a list of VM names"))
        else:
            for i, vm in enumerate(raw_vms):
                got = attempt(errors, parse_name, vm, at(f"vms[{i}]"))
                if got is not None and got in vms:
                    errors.append(FieldError(at(f"vms[{i}]"), show_value(vm), "each VM once"))
                elif got is not None:
                    vms.append(got)
    nic = collect(
        errors, lambda: parse_nic_name(doc.get("nic", PRIMARY_NIC), at("nic")), PRIMARY_NIC
    )
    loop = collect(errors, lambda: boolean(doc.get("loop", False), at("loop")), False)
    has_steps, has_trace = "steps" in doc, "trace" in doc
    steps: tuple[Step, ...] = ()
    trace: Trace | None = None
    fields: tuple[str, ...] = ()
    window = DEFAULT_WINDOW
    duration = 0.0
    explicit = doc.get("duration") is not None
    if has_steps == has_trace:
        errors.append(
            FieldError(
                path,
                "both steps and trace" if has_steps else "neither steps nor trace",
                "exactly one of steps (a timeline) or trace (a Mahimahi trace)",
            )
        )
    elif has_steps:
        steps = collect(errors, lambda: _parse_steps(doc["steps"], at("steps")), ())
        if steps:
            duration = steps[-1].at
        if explicit:
            given = collect(errors, lambda: span(doc["duration"], at("duration")), duration)
            if steps and given < steps[-1].at:
                errors.append(
                    FieldError(
                        at("duration"),
                        show_value(doc["duration"]),
                        f"at least the time of the last step ({dump_span(steps[-1].at)})",
                    )
                )
            duration = given
        if loop and duration < MIN_SPACING and steps:
            errors.append(
                FieldError(
                    at("duration"),
                    show_value(doc.get("duration", "none")),
                    f"a duration of at least {dump_span(MIN_SPACING)} for a loop "
                    "(the period it repeats with)",
                )
            )
        for key in ("field", "fields", "window"):
            if key in doc:
                errors.append(FieldError(at(key), "given", f"{key} only with a trace"))
    else:
        if explicit:
            errors.append(
                FieldError(at("duration"), "given", "no duration with a trace (its period)")
            )
        fields = collect(errors, lambda: _parse_trace_fields(doc, path), ())
        window = collect(errors, lambda: _parse_window(doc.get("window"), at("window")), window)
        trace = collect(errors, lambda: _read_trace(doc["trace"], at("trace"), read_file), None)
        if trace is not None and fields:
            steps = _trace_steps(trace, fields, window)
            duration = trace.period
            if len(steps) > MAX_STEPS:
                errors.append(
                    FieldError(
                        at("window"),
                        show_value(doc.get("window", "100ms")),
                        f"a window giving at most {MAX_STEPS} steps ({len(steps)} now)",
                    )
                )
    if errors:
        raise InvalidInput(errors)
    return Scenario(
        name=name,
        steps=steps,
        duration=duration,
        vms=tuple(vms),
        loop=loop,
        description=description,
        trace=trace,
        fields=fields,
        window=window,
        nic=nic,
    )


def _parse_steps(raw: Any, path: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidInput.one(path, raw, "a non-empty list of steps {at, profile|set|clear}")
    if len(raw) > MAX_STEPS:
        raise InvalidInput.one(path, f"{len(raw)} steps", f"at most {MAX_STEPS} steps")
    errors: list[FieldError] = []
    steps: list[Step] = []
    previous: tuple[int, float] | None = None
    for i, doc in enumerate(raw):
        here = f"{path}[{i}]"
        step = attempt(errors, _parse_step, doc, here)
        if step is None:
            continue
        if previous is not None and step.at < previous[1] + MIN_SPACING - 1e-9:
            errors.append(
                FieldError(
                    f"{here}.at",
                    show_value(doc.get("at")),
                    f"a time at least {dump_span(MIN_SPACING)} after step {previous[0]}'s "
                    f"{dump_span(previous[1])} (times strictly increase, {dump_span(MIN_SPACING)} apart)",
                )
            )
        previous = (i, step.at)
        steps.append(step)
    if errors:
        raise InvalidInput(errors)
    return tuple(steps)


def _parse_step(raw: Any, path: str) -> Step:
    doc = mapping(raw, path, "a step: a mapping with at and one of profile, set, clear")
    errors = known_keys(doc, path, STEP_KEYS)
    when = 0.0
    if "at" not in doc:
        errors.append(FieldError(join(path, "at"), "nothing", "a time such as 30s"))
    else:
        when = collect(errors, lambda: span_ns(doc["at"], join(path, "at")) / 1e9, 0.0)
    profile = None
    if doc.get("profile") is not None:
        profile = collect(errors, lambda: parse_name(doc["profile"], join(path, "profile")), None)
    values: dict[str, Any] = {}
    if doc.get("set") is not None:
        values = collect(errors, lambda: read_patch(doc["set"], join(path, "set")), {})
    clear = False
    if "clear" in doc:
        if doc["clear"] is not True:
            errors.append(
                FieldError(join(path, "clear"), show_value(doc["clear"]), "true (or leave it out)")
            )
        elif "profile" in doc or "set" in doc:
            errors.append(
                FieldError(join(path, "clear"), "with profile or set", "clear alone in its step")
            )
        else:
            clear = True
    if not errors and not clear and profile is None and not values:
        errors.append(FieldError(path, "no change", "one of profile, set, clear"))
    if errors:
        raise InvalidInput(errors)
    return Step(at=when, profile=profile, values=values, clear=clear)


def _parse_trace_fields(doc: Mapping[str, Any], path: str) -> tuple[str, ...]:
    expected = "one of " + ", ".join(TRACE_FIELDS)
    if ("field" in doc) == ("fields" in doc):
        raise InvalidInput.one(
            path, "both field and fields" if "field" in doc else "no field", "field or fields"
        )
    if "field" in doc:
        if doc["field"] not in TRACE_FIELDS:
            raise InvalidInput.one(join(path, "field"), doc["field"], expected)
        return (doc["field"],)
    raw = doc["fields"]
    if not isinstance(raw, list) or not raw:
        raise InvalidInput.one(join(path, "fields"), raw, "a list of " + expected)
    errors = [
        FieldError(join(path, f"fields[{i}]"), show_value(f), expected + ", each once")
        for i, f in enumerate(raw)
        if f not in TRACE_FIELDS or raw.index(f) != i
    ]
    if errors:
        raise InvalidInput(errors)
    return tuple(raw)


def _parse_window(raw: Any, path: str) -> float:
    if raw is None:
        return DEFAULT_WINDOW
    ns = span_ns(raw, path, positive=True)
    if ns % 10**6:
        raise InvalidInput.one(path, raw, "a whole number of milliseconds such as 100ms")
    if ns < MIN_SPACING * 1e9:
        raise InvalidInput.one(path, raw, f"at least {dump_span(MIN_SPACING)}")
    return ns / 1e9


def _read_trace(raw: Any, path: str, read_file: Callable[[str], str] | None) -> Trace:
    if isinstance(raw, list):
        return parse_trace(raw, path)
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput.one(path, raw, "a trace: a list of timestamps, trace text or a file")
    text = raw.strip()
    if "\n" in text or is_digit_line(text):
        return parse_trace(raw, path)
    if read_file is None:
        raise InvalidInput.one(
            path,
            raw,
            "the trace itself (a list of millisecond timestamps, or its text): "
            "this caller reads no files",
        )
    try:
        content = read_file(text)
    except (OSError, ValueError, LookupError) as exc:
        raise InvalidInput.one(path, raw, f"a readable trace file ({exc})") from None
    return parse_trace(content, f"{path} {text}")


def is_digit_line(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _trace_steps(trace: Trace, fields: tuple[str, ...], window: float) -> tuple[Step, ...]:
    steps: list[Step] = []
    previous: int | None = None
    step_ms = window_ms(window)
    for i, rate in enumerate(trace.rates(window)):
        rate = max(Rate.MIN, rate)
        if rate == previous:
            continue
        previous = rate
        steps.append(Step(at=i * step_ms / 1000, values={f: Rate(rate) for f in fields}))
    return tuple(steps)
