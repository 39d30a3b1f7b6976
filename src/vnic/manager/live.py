"""The controller at work in the manager: threshold rules on live samples, feedback
requests from inside VMs, and scenarios on a timeline, each turned into runtime
adjustments (audited) and applied live to the running VMs.

The decisions are made by the pure parts (:mod:`vnic.controller.engine`,
:mod:`~vnic.controller.feedback`, :mod:`~vnic.controller.scenario`); this
module feeds them samples and time and carries their decisions out through
:class:`~vnic.manager.runtime.Runtime` and
:meth:`~vnic.manager.dispatch.Manager.reapply`. Clocks are injected: ``clock``
(monotonic seconds) for durations, the service's clock for expiry times.

Everything here is per vNIC: a rule watches each vNIC in its scope (its samples
are that vNIC's, from the ``nics`` of the agent's stats document of its VM) and
adjusts that vNIC; a feedback request and a scenario name the vNIC they change
(``nic``, default eth0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from vnic.agent.port import AgentPort
from vnic.controller.engine import Controller, Decision
from vnic.controller.feedback import (
    FeedbackPolicy,
    Grant,
    parse_feedback_policy,
    request_nic,
)
from vnic.controller.rules import parse_rules
from vnic.controller.scenario import parse_scenario
from vnic.controller.scenario_run import ScenarioRun
from vnic.errors import Conflict, InvalidInput, NotFound, VnicError
from vnic.manager.results import VmChange
from vnic.manager.runtime import Runtime
from vnic.manager.service import Service
from vnic.model.launch import PRIMARY_NIC
from vnic.model.profile import values_to_document

log = logging.getLogger("vnic.controller")

#: Seconds between two controller rounds (samples, rules, expiry).
INTERVAL = 1.0

#: ``(session, vm, nic)``: one vNIC.
Key = tuple[str, str, str]


def sample_metrics(
    sample: Mapping[str, Any], previous: Mapping[str, Any] | None, dt: float
) -> dict[str, float]:
    """The rule metrics of one vNIC from an agent stats sample (see ``vnic top``).

    ``drops`` is packets per second over ``dt`` from the drop totals of two
    samples (0 on the first).
    """
    out: dict[str, float] = {}
    for direction in ("egress", "ingress"):
        d = sample.get(direction) or {}
        rate = d.get("rate_bps")
        if rate is None:
            continue
        out[f"{direction}.rate"] = float(rate)
        limit = d.get("profile_rate_bps")
        if limit:
            out[f"{direction}.utilisation"] = float(rate) / float(limit)
    if sample.get("latency_seconds") is not None:
        out["latency"] = float(sample["latency_seconds"])
    if previous is not None and dt > 0:
        dropped = _drops(sample) - _drops(previous)
        out["drops"] = max(0, dropped) / dt
    return out


def nic_samples(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every vNIC's sample of an agent's stats document of one VM: its ``nics`` (each
    with ``nic``); a document without them (an agent of the previous release) is
    eth0's sample itself."""
    nics = doc.get("nics")
    if isinstance(nics, list) and nics:
        return [n for n in nics if isinstance(n, Mapping)]
    return [doc]


def _drops(sample: Mapping[str, Any]) -> int:
    total = 0
    for direction in ("egress", "ingress"):
        drops = (sample.get(direction) or {}).get("drops") or {}
        total += sum(int(n) for n in drops.values())
    return total


@dataclass
class _ScenarioTask:
    session: str
    name: str
    vms: Sequence[str]
    run: ScenarioRun
    nic: str
    thread: threading.Thread | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    slips: list[float] = field(default_factory=list)
    applied: int = 0
    error: str | None = None


class Dispatch(Protocol):
    """What the controller needs of its manager (:class:`vnic.manager.dispatch.Manager`
    is one; this module does not import it, which builds the controller: an import
    circle)."""

    @property
    def service(self) -> Service:
        """The database's use cases (effective profiles, the clock)."""

    @property
    def agent(self) -> AgentPort:
        """The agent the samples come from."""

    @property
    def runtime(self) -> Runtime:
        """Runtime adjustments and the audit log."""

    def reapply(self, **scope: Any) -> list[VmChange]:
        """Send changed effective profiles to the agent (``scope``: session, vm, ...)."""


class LiveControl:
    """Rules, feedback and scenarios of every session, for one manager."""

    def __init__(
        self,
        manager: Dispatch,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.interval = interval
        self.events: list[dict[str, Any]] = []  # newest last, bounded
        self._controllers: dict[str, tuple[Any, Controller]] = {}
        # One policy per session (it counts each VM's requests), rebuilt when its document changes.
        self._policies: dict[str, tuple[Any, FeedbackPolicy]] = {}
        self._previous: dict[Key, tuple[float, Mapping[str, Any]]] = {}
        self._scenarios: dict[tuple[str, str], _ScenarioTask] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vnic-controller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for task in list(self._scenarios.values()):
            task.run.stop()
            task.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a failed round must not end the controller
                log.exception("controller round failed")

    def tick(self) -> list[Decision]:
        """One round: expire adjustments, then evaluate every session's rules."""
        runtime = self.manager.runtime
        for session in sorted({s for s, _ in runtime.expire()}):
            self.manager.reapply(session=session)
        decisions: list[Decision] = []
        for session, doc in runtime.controllers().items():
            if not doc.get("rules"):
                self._controllers.pop(session, None)
                continue
            controller = self._controller(session, doc)
            samples, current, profiles, networks = self._observe(session)
            for decision in controller.observe(samples, current, profiles, networks):
                self._carry_out(decision)
                decisions.append(decision)
        return decisions

    def _controller(self, session: str, doc: Mapping[str, Any]) -> Controller:
        have = self._controllers.get(session)
        if have is None or have[0] != doc.get("rules"):
            rules = parse_rules(doc.get("rules") or [], "rules")
            have = (doc.get("rules"), Controller(rules, self.clock))
            self._controllers[session] = have
        return have[1]

    def _observe(
        self, session: str
    ) -> tuple[dict[Key, dict[str, float]], dict[Key, Any], dict[Key, set[str]], dict[Key, str]]:
        """Rule metrics, effective values, profiles in use and networks of every vNIC of
        the session's running VMs."""
        now = self.clock()
        samples: dict[Key, dict[str, float]] = {}
        seen: set[Key] = set()
        for doc in self.manager.agent.stats(session):
            for sample in nic_samples(doc):
                key = (session, str(doc["vm"]), str(sample.get("nic") or PRIMARY_NIC))
                before = self._previous.get(key)
                dt = now - before[0] if before else 0.0
                samples[key] = sample_metrics(sample, before[1] if before else None, dt)
                self._previous[key] = (now, sample)
                seen.add(key)
        # A vNIC gone from the samples starts afresh (no drops rate across a rebuild).
        for key in [k for k in self._previous if k[0] == session and k not in seen]:
            del self._previous[key]
        current: dict[Key, Any] = {}
        profiles: dict[Key, set[str]] = {}
        networks: dict[Key, str] = {}
        running = self.manager.service.running_effective(session)
        for (vm, nic), (network, effective) in running.items():
            current[(session, vm, nic)] = dict(effective.values)
            profiles[(session, vm, nic)] = set(effective.revisions)
            networks[(session, vm, nic)] = network
        return samples, current, profiles, networks

    def _carry_out(self, d: Decision) -> None:
        runtime = self.manager.runtime
        source = f"rule:{d.rule}"
        try:
            if d.kind == "revert":
                runtime.clear(d.session, d.vm, source, d.reason, nic=d.nic)
            else:
                expires = (
                    self.manager.service.clock() + timedelta(seconds=d.expires_after)
                    if d.expires_after
                    else None
                )
                runtime.adjust(
                    d.session,
                    d.vm,
                    source=source,
                    reason=d.reason,
                    values=d.patch or None,
                    profile=d.profile,
                    expires_at=expires,
                    driver=self.manager.agent,
                    nic=d.nic,
                )
            changes = self.manager.reapply(session=d.session, vm=d.vm)
            error = _errors(changes)
            self._event(d.session, d.vm, source, d.kind, d.reason, error=error, nic=d.nic)
        except VnicError as exc:
            self._event(d.session, d.vm, source, d.kind, d.reason, error=str(exc), nic=d.nic)

    def _event(
        self,
        session: str,
        vm: str | None,
        source: str,
        kind: str,
        reason: str,
        error: str | None = None,
        nic: str | None = None,
    ) -> None:
        """Keep an event; ``nic``: the vNIC it is about (None: the scenario or session)."""
        with self._lock:
            self.events.append(
                {
                    "at": self.manager.service.clock(),
                    "session": session,
                    "vm": vm,
                    "nic": nic,
                    "source": source,
                    "kind": kind,
                    "reason": reason,
                    "error": error,
                }
            )
            del self.events[:-500]

    def state(self, session: str) -> dict[str, Any]:
        """What the session's controller is doing: rule states, recent events, scenarios."""
        have = self._controllers.get(session)
        return {
            "rules": have[1].state() if have else [],
            "events": [e for e in self.events if e["session"] == session][-100:],
            "scenarios": [
                self._scenario_json(t) for (s, _), t in self._scenarios.items() if s == session
            ],
        }

    # ------------------------------------------------------------------ feedback

    def feedback(
        self, session: str, vm: str, method: str, body: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Answer a request from VM ``vm`` (known by its address) of ``session``, about
        its vNIC ``body["nic"]`` (default eth0): a GET shows every vNIC's effective
        profile (``effective``: the named vNIC's), a DELETE hands that vNIC's grant back,
        a POST asks for one on it."""
        claimed = body.get("vm")
        if claimed is not None and claimed != vm:
            return 403, {
                "error": "forbidden",
                "message": f"this request comes from VM {vm}; a VM may only change itself, not {claimed!r}",
            }
        runtime = self.manager.runtime
        policy = self._policy(session, runtime.controller(session).get("feedback"))
        if method == "GET":
            explained = self.manager.service.explain(session, vm)
            try:
                nic = request_nic(body, vm, list(explained.nics))
            except InvalidInput as exc:
                return 422, exc.to_dict()
            networks = {n.name: n.network for n in explained.vm.nics}
            return 200, {
                "vm": vm,
                "session": session,
                "nic": nic,
                "effective": values_to_document(explained.nics[nic].values),
                "nics": [
                    {
                        "nic": name,
                        "network": networks.get(name),
                        "effective": values_to_document(eff.values),
                    }
                    for name, eff in explained.nics.items()
                ],
                "limits": policy.to_document() if policy else None,
            }
        if policy is None or not policy.enabled:
            return 403, {
                "error": "forbidden",
                "message": f"session {session!r} does not accept feedback (no feedback limits in its controller)",
            }
        nics = [n.name for n in self.manager.service.get_vm(session, vm).nics]
        if method == "DELETE":
            try:
                nic = request_nic(body, vm, nics)
            except InvalidInput as exc:
                return 422, exc.to_dict()
            changed = runtime.clear(session, vm, "feedback", f"handed back by {vm}", nic=nic)
            self.manager.reapply(session=session, vm=vm)
            return 200, {"vm": vm, "nic": nic, "changed": _fields(changed)}
        request = {k: v for k, v in body.items() if k != "vm"}
        try:
            decision = policy.check(vm, request, self.clock(), nics)
        except InvalidInput as exc:
            return 422, exc.to_dict()
        if not isinstance(decision, Grant):
            # A request refused unread (too many) may name anything: only a vNIC of the VM.
            asked = body.get("nic", PRIMARY_NIC)
            named = asked if asked in nics else None
            self._event(session, vm, "feedback", "refused", decision.reason, nic=named)
            answer: dict[str, Any] = {"error": "forbidden", "message": decision.reason}
            if decision.retry_after is not None:
                answer["retry_after"] = round(decision.retry_after, 3)
            return 403, answer
        expires = (
            self.manager.service.clock() + timedelta(seconds=decision.duration)
            if decision.duration
            else None
        )
        reason = f"asked by {vm}" + (f": {body['why']}" if isinstance(body.get("why"), str) else "")
        try:
            changed = runtime.adjust(
                session,
                vm,
                source="feedback",
                reason=reason,
                values=decision.values or None,
                profile=decision.profile,
                expires_at=expires,
                driver=self.manager.agent,
                nic=decision.nic,
            )
            changes = self.manager.reapply(session=session, vm=vm, strict=True)
        except VnicError as exc:
            return exc.http_status, exc.to_dict()
        error = _errors(changes)
        self._event(session, vm, "feedback", "apply", reason, error=error, nic=decision.nic)
        return 200, {
            "vm": vm,
            "nic": decision.nic,
            "granted": True,
            "expires_at": expires.isoformat() if expires else None,
            "changed": _fields(changed),
        }

    def malformed(self, session: str, vm: str, reason: str) -> None:
        """Count a request of ``vm`` the feedback endpoint could not read (bad HTTP,
        not a JSON object, over a bound) against the session's ``per_minute``."""
        policy = self._policy(session, self.manager.runtime.controller(session).get("feedback"))
        if policy is None or not policy.enabled:
            return
        if policy.malformed(vm, self.clock()) is None:  # audited while within the limit
            self._event(session, vm, "feedback", "malformed", reason[:200])

    def _policy(self, session: str, doc: Any) -> FeedbackPolicy | None:
        if not doc:
            self._policies.pop(session, None)
            return None
        with self._lock:
            have = self._policies.get(session)
            if have is None or have[0] != doc:
                have = (doc, parse_feedback_policy(doc, "feedback"))
                self._policies[session] = have
            return have[1]

    # ------------------------------------------------------------------ scenarios

    def start_scenario(self, session: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Start a scenario (a timeline or a trace) on the session's VMs (its ``vms``, or
        every VM that has its ``nic``); returns its state."""
        scenario = parse_scenario(doc)
        service = self.manager.service
        nic = scenario.nic
        known = {v.name: [n.name for n in v.nics] for v in service.list_vms(session)}
        vms = list(scenario.vms) or sorted(vm for vm, nics in known.items() if nic in nics)
        for i, vm in enumerate(vms):
            if vm not in known:
                raise InvalidInput.one(f"vms[{i}]", vm, f"a VM of session {session!r}")
            if nic not in known[vm]:
                raise InvalidInput.one(
                    "nic", nic, f"a vNIC of every VM it changes ({vm} has {', '.join(known[vm])})"
                )
        if not vms and nic != PRIMARY_NIC:
            raise InvalidInput.one("nic", nic, f"a vNIC of a VM of session {session!r}")
        key = (session, scenario.name)
        with self._lock:
            old = self._scenarios.get(key)
            if old is not None and old.run.state in ("running", "paused"):
                raise Conflict(f"scenario {scenario.name!r} already runs in session {session!r}")
            task = _ScenarioTask(
                session, scenario.name, vms, ScenarioRun(scenario, self.clock), nic
            )
            self._scenarios[key] = task
        task.run.start()
        task.thread = threading.Thread(
            target=self._play, args=(task,), name=f"vnic-scenario-{scenario.name}", daemon=True
        )
        task.thread.start()
        where = f"on {', '.join(vms)}" + ("" if nic == PRIMARY_NIC else f" ({nic})")
        self._event(session, None, f"scenario:{scenario.name}", "start", where)
        return self._scenario_json(task)

    def scenario(self, session: str, name: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume`` or ``stop`` a scenario, or read it (``show``)."""
        task = self._scenarios.get((session, name))
        if task is None:
            raise NotFound(
                f"scenario in session {session!r}",
                name,
                [n for s, n in self._scenarios if s == session],
            )
        if action == "pause":
            task.run.pause()
        elif action == "resume":
            task.run.resume()
        elif action == "stop":
            task.run.stop()
        elif action != "show":
            raise InvalidInput.one("action", action, "pause, resume, stop or show")
        task.wake.set()
        if action != "show":
            self._event(
                session, None, f"scenario:{name}", action, f"at {task.run.position():.3f} s"
            )
        if action == "stop" and task.thread is not None:
            task.thread.join(timeout=5)
        return self._scenario_json(task)

    def scenarios(self, session: str) -> list[dict[str, Any]]:
        return [
            self._scenario_json(t) for (s, _), t in sorted(self._scenarios.items()) if s == session
        ]

    def _play(self, task: _ScenarioTask) -> None:
        source = f"scenario:{task.name}"
        run = task.run
        try:
            while run.state in ("running", "paused") and not self._stop.is_set():
                if run.state == "paused":
                    task.wake.wait(1.0)
                    task.wake.clear()
                    continue
                due = run.due()
                if due:
                    task.slips.extend(max(0.0, step.late) for step in due)
                    self._apply_layer(task, source)
                wait = run.next_due_in()
                if wait is None:
                    break
                if wait > 0:
                    task.wake.wait(wait)
                    task.wake.clear()
        except Exception as exc:  # reported in the scenario's state, and logged
            task.error = str(exc)
            log.exception("scenario %s failed", task.name)
        finally:
            if run.state == "stopped" or task.error:
                for vm in task.vms:
                    try:
                        self.manager.runtime.clear(
                            task.session, vm, source, "scenario stopped", nic=task.nic
                        )
                    except VnicError:
                        continue
                self.manager.reapply(session=task.session)
            self._event(task.session, None, source, "end", run.state)

    def _apply_layer(self, task: _ScenarioTask, source: str) -> None:
        layer = task.run.layer()
        runtime = self.manager.runtime
        reason = f"at {task.run.position():.3f} s"
        # A trace changes the rate every window: its start and end are audited, not each step.
        audit = task.run.scenario.trace is None or task.applied == 0
        for vm in task.vms:
            if layer.values or layer.profile:
                runtime.adjust(
                    task.session,
                    vm,
                    source=source,
                    reason=reason,
                    values=dict(layer.values) or None,
                    profile=layer.profile,
                    audit=audit,
                    driver=self.manager.agent,
                    nic=task.nic,
                )
            else:
                runtime.clear(task.session, vm, source, reason, nic=task.nic)
        self.manager.reapply(session=task.session)
        task.applied += 1

    @staticmethod
    def _scenario_json(task: _ScenarioTask) -> dict[str, Any]:
        slips = sorted(task.slips)
        return {
            "session": task.session,
            "name": task.name,
            "vms": list(task.vms),
            "nic": task.nic,
            "state": task.run.state,
            "position_s": round(task.run.position(), 3),
            "steps_applied": task.applied,
            "slip_p99_ms": round(slips[min(len(slips) - 1, int(0.99 * len(slips)))] * 1000, 3)
            if slips
            else None,
            "error": task.error,
        }


def _fields(changed: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
    return {p: {"old": o, "new": n} for p, (o, n) in changed.items()}


def _errors(changes: Sequence[Any]) -> str | None:
    errors = [f"{c.vm}: {c.error}" for c in changes if c.error]
    return "; ".join(errors) or None
