"""An in-memory driver for service and API tests: it records what it was asked to run.

It honours every profile field and up to :data:`MAX_NICS` vNICs per VM (a
VM's record is its whole request, every vNIC), and touches nothing outside this object, so
tests of the manager, the API and the agent's bookkeeping run without root.
It is never the only test of a feature: the netns tests run the same paths
against the kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from vnic.drivers.base import Driver
from vnic.errors import Conflict, DataplaneError
from vnic.model.command import ExecResult
from vnic.model.fields import FIELDS
from vnic.model.launch import (
    MAX_NICS,
    PRIMARY_NIC,
    Capabilities,
    LaunchRequest,
    check_nic_count,
    check_supported,
)
from vnic.plan.overlay import Overlay


class FakeDriver(Driver):
    kind = "fake"

    def __init__(self, fail_on: Sequence[str] = ()) -> None:
        #: VM names whose launch fails, to test that failures change nothing.
        self.fail_on = set(fail_on)
        self.vms: dict[tuple[str, str], LaunchRequest] = {}
        self.launches = 0
        #: Commands run by :meth:`exec_captured`: ``(session, vm, argv)``.
        self.commands: list[tuple[str, str, tuple[str, ...]]] = []
        self._lock = threading.Lock()

    def capabilities(self) -> Capabilities:
        return Capabilities(
            self.kind,
            frozenset(FIELDS),
            max_nics=MAX_NICS,
            max_nics_why="the fake driver records any vNIC a VM may have",
        )

    def _check(self, request: LaunchRequest) -> None:
        caps = self.capabilities()
        check_nic_count(caps, len(request.nics))
        for nic in request.nics:
            check_supported(caps, nic.values)

    def launch(self, request: LaunchRequest) -> None:
        self._check(request)
        if request.vm in self.fail_on:
            raise DataplaneError(f"fake driver: launch of {request.vm!r} fails on purpose")
        with self._lock:
            key = (request.session, request.vm)
            if key in self.vms:
                raise Conflict(f"VM {request.session}/{request.vm} is already running")
            self.vms[key] = request
            self.launches += 1

    def reconfigure(self, previous: LaunchRequest, request: LaunchRequest) -> list[str]:
        """Take ``request`` in place of ``previous``; return the field paths that changed
        (``eth1: egress.rate changed`` for a vNIC other than eth0)."""
        self._check(request)
        if request.vm in self.fail_on:
            raise DataplaneError(f"fake driver: change of {request.vm!r} fails on purpose")
        with self._lock:
            self.vms[(request.session, request.vm)] = request
        before = {n.name: n.values for n in previous.nics}
        out = []
        for nic in request.nics:
            old, new = before.get(nic.name, {}), nic.values
            changed = set(old) ^ set(new)
            changed |= {p for p in old if new.get(p, p) != old[p]}
            prefix = "" if nic.name == PRIMARY_NIC else f"{nic.name}: "
            out += [f"{prefix}{p} changed" for p in FIELDS if p in changed]
        return out

    def destroy(self, session: str, vm: str) -> None:
        with self._lock:
            self.vms.pop((session, vm), None)

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        with self._lock:
            for key in [k for k in self.vms if k[0] == session]:
                del self.vms[key]

    def running(self, session: str) -> list[str]:
        return sorted(vm for s, vm in self.vms if s == session)

    def inventory(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for s, vm in self.vms:
            out.setdefault(s, set()).add(vm)
        return out

    def exec_captured(
        self, session: str, vm: str, argv: Sequence[str], *, timeout: float, max_output: int
    ) -> ExecResult:
        """Record the command; it "succeeds" with no output (nothing runs)."""
        with self._lock:
            if (session, vm) not in self.vms:
                raise Conflict(f"VM {session}/{vm} is not running")
            self.commands.append((session, vm, tuple(argv)))
        return ExecResult(0)

    def drift(self, request: LaunchRequest) -> list[str]:
        have = self.vms.get((request.session, request.vm))
        if have is None:
            return [f"VM {request.session}/{request.vm} is not running"]
        return [] if have == request else ["the running profile differs from the desired one"]


class FakeOverlays:
    """In-memory stand-in for :func:`vnic.dataplane.overlay.ensure` (an
    :class:`~vnic.agent.core.Agent`'s ``overlays``): holds each session's overlays and
    answers what changed, so an agent on the fake driver touches no kernel at all."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[Overlay]] = {}
        self._lock = threading.Lock()

    def __call__(
        self,
        session: str,
        overlays: Sequence[Overlay],
        underlay: str,
        vnic_mtus: Mapping[str, int],
    ) -> list[str]:
        with self._lock:
            before = self.sessions.get(session, [])
            if list(overlays) == before:
                return []
            if overlays:
                self.sessions[session] = list(overlays)
            else:
                self.sessions.pop(session, None)
        return [f"overlays of session {session}: {len(before)} -> {len(overlays)}"]
