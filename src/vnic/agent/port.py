"""The agent port: everything a manager may ask of a host's agent, in one interface.

The manager reaches agents only through :class:`AgentPort` (an import-linter
contract in ``pyproject.toml`` says so). Two classes implement it: the in-process
agent (:class:`vnic.agent.core.Agent`, ``vnic serve`` on one host) and the HTTP
client of a remote one (:class:`vnic.agent.client.AgentClient`, ``vnic serve
--agent URL``). The data crossing it is plain: launch requests and capabilities
(:mod:`vnic.model.launch`), a command's result (:mod:`vnic.model.command`), desired
VMs, reconcile reports and repair events (here), each with a wire form the agent's HTTP
API carries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vnic.errors import VnicError
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT, ExecResult
from vnic.model.launch import Capabilities, LaunchRequest

VmKey = tuple[str, str]


@dataclass(frozen=True)
class DesiredVm:
    driver: str
    request: LaunchRequest

    @property
    def key(self) -> VmKey:
        return (self.request.session, self.request.vm)


@dataclass
class ReconcileReport:
    """What one reconcile pass found and did."""

    #: VMs rebuilt because they were missing or differed from their request: key -> differences.
    reapplied: dict[str, list[str]] = field(default_factory=dict)
    #: VMs (``session/vm``) and sessions removed because nothing desires them.
    removed: list[str] = field(default_factory=list)
    #: VMs that could not be rebuilt: key -> error.
    failed: dict[str, str] = field(default_factory=dict)
    #: Differences still present after the pass (empty when all is well).
    drift: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reapplied": self.reapplied,
            "removed": self.removed,
            "failed": self.failed,
            "drift": self.drift,
        }


def vm_label(key: VmKey) -> str:
    """``session/vm``: how drift, reports and repairs name a VM."""
    return f"{key[0]}/{key[1]}"


@dataclass(frozen=True)
class RepairEvent:
    """One repair attempt of one VM."""

    session: str
    vm: str
    #: What the drift check found before the repair.
    differences: list[str]
    #: None when the VM is as planned again; else why not.
    error: str | None = None
    #: Wall-clock time of the attempt (Unix seconds).
    at: float = field(default_factory=time.time)
    #: Its number in this agent process's run (1, 2, ...; see :attr:`Repairer.run_id`).
    seq: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "vm": self.vm,
            "differences": list(self.differences),
            "error": self.error,
            "at": self.at,
            "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RepairEvent:
        return cls(
            str(doc["session"]),
            str(doc["vm"]),
            [str(d) for d in doc.get("differences", [])],
            None if doc.get("error") is None else str(doc["error"]),
            float(doc.get("at", 0.0)),
            int(doc.get("seq", 0)),
        )


class Gate(Protocol):
    """A readers-writer lock: many launches at once, or one reconcile alone.

    An in-process agent's is its host lock (a file lock every process on the host
    takes); an HTTP client's covers its own process's threads (the remote agent
    locks its host itself).
    """

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Hold it with the others that hold it shared (reentrant per thread)."""

    def exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Hold it alone (what it yields is of no use to a caller here)."""


class AgentPort(Protocol):
    """What a manager may ask of one host's agent.

    Errors are :class:`~vnic.errors.VnicError` kinds either way: a remote agent's
    answer is turned back into the same kind it raised.
    """

    @property
    def kind(self) -> str:
        """The driver kind a launch naming none gets."""

    def capabilities(self) -> Capabilities:
        """What the default driver honours on this host."""

    def all_capabilities(self) -> list[Capabilities]:
        """What each of the host's drivers honours."""

    def launch(self, request: LaunchRequest, kind: str | None = None) -> None:
        """Start one VM on driver ``kind`` (default: :attr:`kind`); on failure leave
        nothing behind and raise."""

    def reconfigure(self, request: LaunchRequest) -> list[str]:
        """Change a running VM to ``request`` in place; the kernel changes made."""

    def reconfigure_many(
        self, requests: Sequence[LaunchRequest]
    ) -> dict[VmKey, list[str] | VnicError]:
        """:meth:`reconfigure` for each, in one call: changes or the error, by VM."""

    def destroy(self, session: str, vm: str) -> None:
        """Stop the VM and remove everything made for it (idempotent)."""

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        """Remove the session's network and every VM of it (idempotent)."""

    def running(self, session: str) -> list[str]:
        """Names of the session's VMs that exist on this host."""

    def sync(self, vms: Sequence[DesiredVm]) -> ReconcileReport:
        """Make ``vms`` the host's desired state, rebuild what differs, remove the rest."""

    def stats(self, session: str) -> list[dict[str, Any]]:
        """The session's vNICs' counters and rates, one entry per VM and direction."""

    def metrics_text(self) -> str:
        """Prometheus exposition of every vNIC on the host."""

    def repairs(self, after: int = 0) -> tuple[str, list[RepairEvent]]:
        """The agent's run id and its drift repairs numbered above ``after`` (the last
        ones it keeps, oldest first); ``("", [])`` with repair off."""

    def exec(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float = TIMEOUT_DEFAULT,
        max_output: int = OUTPUT_DEFAULT,
    ) -> ExecResult:
        """Run ``argv`` in the VM (a netns VM: in its namespaces; a QEMU guest: through its
        guest agent), without a terminal, its stdout and stderr captured, each cut at
        ``max_output`` bytes; killed after ``timeout`` seconds (then ``timed_out`` and
        ``returncode`` None). The bounds are :func:`vnic.model.command.check_exec`'s
        (InvalidInput past them); :class:`~vnic.errors.Conflict` if the VM does not run."""

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        """Set a QEMU guest's NIC link up or down (the guest sees its carrier go);
        InvalidInput naming ``vm`` for a VM of another driver."""

    def doctor(self) -> dict[str, Any]:
        """What the host can do (``vnic doctor --json``): the kernel probe, the tools
        missing, the fields each driver honours, the delay engine chosen, what the qemu
        driver's guests run with, and the delay engine of each vNIC running."""

    def gate(self) -> Gate:
        """The lock that keeps a reconcile from racing launches (see :class:`Gate`): the
        same object at every call."""
