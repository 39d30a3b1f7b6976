"""The rule engine: samples in, decisions out. Pure; the clock is injected.

Samples, decisions and states are per vNIC: a key is ``(session, vm, nic)``, and a
rule watches each vNIC in its scope (``vms``, ``profile``, ``nic``, ``network``; a
rule naming no ``nic`` nor ``network`` watches eth0 only) on its own.
:class:`Controller` keeps, for every rule and vNIC, a small state machine::

    armed --(condition held for `for`, cooldown over)--> fired   => "apply"
    fired --(metric back past threshold ∓ hysteresis)--> armed   (revert: false)
    fired --(... and stayed there for `for`)----------> armed    => "revert" (revert: true)

* The condition must hold *continuously*: one sample not beyond the threshold
  (or a sample without the metric) starts the wait again.
* A rule fires once per excursion; hysteresis keeps it from firing again while
  the metric wanders around the threshold. With ``repeat: true`` (scale
  actions only) a rule that stays fired steps again each time the condition has
  held another ``for`` and the cooldown is over — e.g. doubling a rate while
  the link stays saturated, up to the ceiling.
* ``cooldown`` is the least time between two firings of a rule for one vNIC;
  reverts are not held back by it.
* A ``scale`` action computes from the vNIC's current effective value, clamps
  to ``[floor, ceiling]`` and to the type's range, and gives no decision (and
  no firing) when the result equals the current value or the field is unset.
* Utilisation missing from a sample is computed from the measured rate and
  the current profile rate when both are known.
* vNICs missing from ``samples`` are forgotten (their rule state is dropped).
  A vNIC that leaves a rule's scope (``vms``, ``profile``, ``network``) is
  forgotten too; if the rule had fired and has ``revert: true``, that gives a
  "revert".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vnic.controller._parse import show_seconds
from vnic.controller.rules import (
    UTILISATION,
    Rule,
    Scale,
    SetFields,
    SwitchProfile,
    scalar_type,
    show_metric_value,
)
from vnic.model.fields import OFF, dump_field
from vnic.model.launch import PRIMARY_NIC
from vnic.model.patch import dump_patch

APPLY: Final = "apply"
REVERT: Final = "revert"
#: Slack when comparing elapsed clock time with a rule's durations (float clocks).
EPSILON: Final = 1e-9

#: ``(session, vm, nic)``: one vNIC.
Key = tuple[str, str, str]


@dataclass(frozen=True)
class Decision:
    """What a rule decided for one vNIC (``nic`` of ``vm``).

    ``kind`` is ``"apply"`` (set the rule's adjustment: ``patch`` and/or
    ``profile``, for ``expires_after`` seconds or until removed) or
    ``"revert"`` (remove the rule's adjustment). ``patch`` maps field paths to
    typed values; ``reason`` says metric, value, threshold and duration.
    """

    session: str
    vm: str
    rule: str
    kind: str
    reason: str
    patch: Mapping[str, Any] = field(default_factory=dict)
    profile: str | None = None
    expires_after: float | None = None
    nic: str = PRIMARY_NIC

    @property
    def source(self) -> str:
        """The adjustment source this decision sets or removes: ``rule:NAME``."""
        return f"rule:{self.rule}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "vm": self.vm,
            "nic": self.nic,
            "rule": self.rule,
            "kind": self.kind,
            "reason": self.reason,
            "patch": dump_patch(self.patch),
            "profile": self.profile,
            "expires_after": self.expires_after,
        }


@dataclass
class _Track:
    """The state of one rule for one vNIC."""

    holding_since: float | None = None
    clear_since: float | None = None
    fired: bool = False
    last_fired: float | None = None
    last_value: float | None = None


class Controller:
    """Evaluates ``rules`` on the samples it is given. ``clock``: monotonic seconds."""

    def __init__(self, rules: Sequence[Rule], clock: Callable[[], float]) -> None:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique, got {names}")
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.clock = clock
        self._tracks: dict[tuple[str, str, str, str], _Track] = {}

    def observe(
        self,
        samples: Mapping[Key, Mapping[str, float]],
        current: Mapping[Key, Mapping[str, Any]],
        profiles: Mapping[Key, Collection[str]] | None = None,
        networks: Mapping[Key, str] | None = None,
    ) -> list[Decision]:
        """Feed the latest metric values per vNIC ``(session, vm, nic)``; return what the
        rules decide.

        ``current``: each vNIC's effective values (typed, as ``Effective.values``),
        used by ``scale`` and to compute utilisation. ``profiles``: the names of
        the profiles each vNIC's effective profile is built from (``Effective.revisions``),
        needed only by rules with ``profile:`` — without it those rules do not apply.
        ``networks``: each vNIC's network, needed only by rules with ``network:`` (the
        same). Decisions come in the order of vNICs (sorted), then rules.
        """
        now = self.clock()
        profiles = profiles or {}
        networks = networks or {}
        live = set(samples)
        for gone_key in [k for k in self._tracks if k[1:] not in live]:
            del self._tracks[gone_key]
        decisions: list[Decision] = []
        for key in sorted(samples):
            session, vm, nic = key
            metrics = samples[key]
            values = current.get(key, {})
            for rule in self.rules:
                tkey = (rule.name, session, vm, nic)
                if not rule.applies_to(vm, profiles.get(key), nic, networks.get(key)):
                    gone = self._tracks.pop(tkey, None)
                    if gone is not None and gone.fired and rule.revert:
                        decisions.append(
                            Decision(
                                session=session,
                                vm=vm,
                                rule=rule.name,
                                kind=REVERT,
                                reason=f"{vm}/{nic} is no longer in the rule's scope: reverted",
                                nic=nic,
                            )
                        )
                    continue
                track = self._tracks.setdefault(tkey, _Track())
                decision = self._step(rule, track, key, metrics, values, now)
                if decision is not None:
                    decisions.append(decision)
        return decisions

    # ------------------------------------------------------------------ one rule, one vNIC

    def _step(
        self,
        rule: Rule,
        track: _Track,
        key: Key,
        metrics: Mapping[str, float],
        values: Mapping[str, Any],
        now: float,
    ) -> Decision | None:
        value = _metric(rule, metrics, values)
        track.last_value = value
        if value is None:
            # No data is not "condition holds" nor "condition over": both waits start again.
            track.holding_since = None
            track.clear_since = None
            return None
        holds = rule.holds(value)
        if holds:
            if track.holding_since is None:
                track.holding_since = now
        else:
            track.holding_since = None
        if track.fired:
            if rule.clear(value):
                if track.clear_since is None:
                    track.clear_since = now
            else:
                track.clear_since = None
            if track.clear_since is not None:
                cleared_for = now - track.clear_since
                if not rule.revert:
                    track.fired = False
                    track.clear_since = None
                elif cleared_for + EPSILON >= rule.for_s:
                    track.fired = False
                    track.clear_since = None
                    return self._revert(rule, key, value, cleared_for)
            if track.fired and not (rule.repeat and holds):
                return None
        if not holds or track.holding_since is None:
            return None
        held = now - track.holding_since
        if held + EPSILON < rule.for_s:
            return None
        if track.last_fired is not None and now - track.last_fired + EPSILON < rule.cooldown_s:
            return None
        decision = self._apply(rule, key, value, held, values)
        if decision is not None:
            track.fired = True
            track.last_fired = now
            track.holding_since = now  # a repeat must hold another `for` after this step
            track.clear_since = None
        return decision

    def _apply(
        self,
        rule: Rule,
        key: Key,
        value: float,
        held: float,
        values: Mapping[str, Any],
    ) -> Decision | None:
        reason = (
            f"{rule.metric} {show_metric_value(rule.kind, value)} {rule.direction} "
            f"{show_metric_value(rule.kind, rule.threshold)} for {show_seconds(held)}"
        )
        action = rule.action
        patch: dict[str, Any] = {}
        profile = None
        if isinstance(action, Scale):
            scaled = scale(action, values.get(action.field))
            if scaled is None:
                return None
            patch = {action.field: scaled}
            reason += f": {action.field} {values[action.field]} -> {scaled}"
        elif isinstance(action, SetFields):
            patch = dict(action.values)
            reason += ": set " + ", ".join(
                f"{p} {dump_field(p, v)}" for p, v in action.values.items()
            )
        elif isinstance(action, SwitchProfile):
            profile = action.name
            reason += f": profile {action.name}"
        session, vm, nic = key
        return Decision(
            session=session,
            vm=vm,
            rule=rule.name,
            kind=APPLY,
            reason=reason,
            patch=patch,
            profile=profile,
            expires_after=rule.expires_s,
            nic=nic,
        )

    @staticmethod
    def _revert(rule: Rule, key: Key, value: float, cleared_for: float) -> Decision:
        past = "at or below" if rule.direction == "above" else "at or above"
        reason = (
            f"{rule.metric} {show_metric_value(rule.kind, value)} {past} "
            f"{show_metric_value(rule.kind, rule.rearm_at)} for {show_seconds(cleared_for)}: "
            "reverted"
        )
        session, vm, nic = key
        return Decision(session=session, vm=vm, rule=rule.name, kind=REVERT, reason=reason, nic=nic)

    # ------------------------------------------------------------------ for the API

    def state(self) -> list[dict[str, Any]]:
        """Every rule's state per vNIC, JSON-able (``vnic``: ``vm/nic``): how long the condition has held,
        whether the rule is armed, how long ago it fired, cooldown left.

        Times are seconds relative to now (the clock is monotonic, its absolute
        values mean nothing outside this process).
        """
        now = self.clock()
        out = []
        for rule in self.rules:
            for (name, session, vm, nic), t in sorted(self._tracks.items()):
                if name != rule.name:
                    continue
                cooldown_left = (
                    max(0.0, rule.cooldown_s - (now - t.last_fired))
                    if t.last_fired is not None
                    else 0.0
                )
                out.append(
                    {
                        "rule": rule.name,
                        "session": session,
                        "vm": vm,
                        "nic": nic,
                        "vnic": f"{vm}/{nic}",
                        "metric": rule.metric,
                        "value": t.last_value,
                        "condition": rule.describe(),
                        "holding_for_s": None
                        if t.holding_since is None
                        else round(now - t.holding_since, 3),
                        "armed": not t.fired,
                        "last_fired_ago_s": None
                        if t.last_fired is None
                        else round(now - t.last_fired, 3),
                        "cooldown_left_s": round(cooldown_left, 3),
                        "clear_for_s": None
                        if t.clear_since is None
                        else round(now - t.clear_since, 3),
                    }
                )
        return out


def _metric(rule: Rule, metrics: Mapping[str, float], values: Mapping[str, Any]) -> float | None:
    value = metrics.get(rule.metric)
    if value is not None:
        return float(value)
    if rule.kind == UTILISATION:
        direction = rule.metric.partition(".")[0]
        rate = metrics.get(f"{direction}.rate")
        limit = values.get(f"{direction}.rate")
        if rate is not None and limit is not None and limit is not OFF and limit.value > 0:
            return float(rate) / float(limit.value)
    return None


def scale(action: Scale, current: Any) -> Any:
    """``current`` × factor, clamped to the action's floor and ceiling and the type's range;
    None when the field is unset or the result is the current value."""
    cls = scalar_type(action.field)
    if current is None or current is OFF or not isinstance(current, cls):
        return None
    target = round(current.value * action.factor)
    if action.floor is not None:
        target = max(target, action.floor.value)
    if action.ceiling is not None:
        target = min(target, action.ceiling.value)
    target = min(max(target, cls.MIN), cls.MAX)
    if target == current.value:
        return None
    return cls(target)
