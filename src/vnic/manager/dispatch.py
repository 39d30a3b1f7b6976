"""How the manager reaches its agent: the agent interface, and the gate that keeps a
reconcile from racing launches."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vnic.agent.core import DesiredVm, ReconcileReport
from vnic.drivers.base import Driver
from vnic.manager.auth import Tokens
from vnic.manager.runtime import Runtime
from vnic.manager.service import Service, VmChange

if TYPE_CHECKING:
    from vnic.controller.runner import LiveControl


class AgentLike(Driver, Protocol):
    """What the manager needs of an agent (in-process :class:`~vnic.agent.core.Agent`
    or :class:`~vnic.agent.client.AgentClient`): the driver interface plus these."""

    def reconfigure(self, request: Any) -> list[str]: ...

    def reconfigure_many(self, requests: Sequence[Any]) -> dict[tuple[str, str], Any]: ...

    def all_capabilities(self) -> Sequence[Any]: ...

    def metrics_text(self) -> str: ...

    def stats(self, session: str) -> list[dict[str, Any]]: ...

    def sync(self, vms: Sequence[DesiredVm]) -> ReconcileReport: ...


class Gate:
    """Many dispatches at once, or one reconcile alone (a readers-writer lock).

    A reconcile sends the agent the database's running VMs; a launch between
    its agent call and its database write would look like an orphan to it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class Manager:
    service: Service
    tokens: Tokens
    agent: AgentLike
    agent_name: str = "local"
    gate: Gate = field(default_factory=Gate)

    @functools.cached_property
    def runtime(self) -> Runtime:
        """Runtime adjustments, the audit log and controller settings."""
        return Runtime(self.service)

    @functools.cached_property
    def live(self) -> LiveControl:
        """The controller: rules, feedback and scenarios (started by ``vnic serve``)."""
        from vnic.controller.runner import LiveControl

        return LiveControl(self)

    def reapply(self, **scope: Any) -> list[VmChange]:
        """:meth:`Service.reapply` through this manager's agent (``scope``: its keywords)."""
        with self.gate.shared():
            return self.service.reapply(self.agent, **scope)

    def reconcile(self) -> ReconcileReport:
        """Send the agent the VMs the database says run; it rebuilds, reaps and reports."""
        with self.gate.exclusive():
            desired = [DesiredVm(kind, request) for kind, request in self.service.desired()]
            return self.agent.sync(desired)
