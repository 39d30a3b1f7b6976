"""The manager's own agent, with the stats of the other hosts' agents added.

With many hosts (docs/hosts.md) the manager drives hosted VMs through the change log,
not through calls; but ``vnic top``, the live view and the controller read a session's
per-vNIC stats through the agent port (:meth:`AgentPort.stats`). :class:`FleetAgent`
is the manager's agent with that one read extended: the own agent's entries, then those
of every host that runs VMs of the session, read from its agent's read-only
``GET /stats?session=S`` (:mod:`vnic.agent.metrics_http`). A host that does not answer
within :data:`TIMEOUT` seconds, or answers more than :data:`MAX_BYTES`, adds nothing
(logged): the others' stats still come. Everything else goes to the own agent.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from vnic.agent.port import AgentPort, DesiredVm, Gate, ReconcileReport, RepairEvent, VmKey
from vnic.errors import VnicError
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT, ExecResult
from vnic.model.launch import Capabilities, LaunchRequest

#: Seconds a host's stats may take.
TIMEOUT = 2.0
#: Bytes one host's stats may be at most (a hostile host must not exhaust the manager).
MAX_BYTES = 4 << 20
#: Entries one host's stats may have at most.
MAX_ENTRIES = 20_000

log = logging.getLogger("vnic.agent.fleet")


class FleetAgent(AgentPort):
    """``local`` (an :class:`AgentPort`), whose :meth:`stats` also reads the stats
    endpoints ``hosts(session)`` names (``http://addr:port/stats`` URLs)."""

    def __init__(self, local: AgentPort, hosts: Callable[[str], Sequence[str]]) -> None:
        self.local = local
        self.hosts = hosts
        self._http = httpx.Client(timeout=TIMEOUT, follow_redirects=False, trust_env=False)

    def stats(self, session: str) -> list[dict[str, Any]]:
        out = list(self.local.stats(session))
        urls = list(self.hosts(session))
        if not urls:
            return out
        with concurrent.futures.ThreadPoolExecutor(min(8, len(urls))) as pool:
            for entries in pool.map(lambda u: self._host_stats(u, session), urls):
                out += entries
        return out

    def _host_stats(self, url: str, session: str) -> list[dict[str, Any]]:
        try:
            with self._http.stream("GET", url, params={"session": session}) as r:
                if r.status_code != 200:
                    raise ValueError(f"HTTP {r.status_code}")
                body = b""
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise ValueError(f"answer over {MAX_BYTES} bytes")
            doc = json.loads(body)
            if not isinstance(doc, list) or len(doc) > MAX_ENTRIES:
                raise ValueError("not a list of stats entries")
            return [e for e in doc if isinstance(e, dict)]
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("stats of %s from %s: %s", session, url, exc)
            return []

    # Everything else is the own agent's.

    @property
    def kind(self) -> str:
        return self.local.kind

    def capabilities(self) -> Capabilities:
        return self.local.capabilities()

    def all_capabilities(self) -> list[Capabilities]:
        return self.local.all_capabilities()

    def launch(self, request: LaunchRequest, kind: str | None = None) -> None:
        self.local.launch(request, kind)

    def reconfigure(self, request: LaunchRequest) -> list[str]:
        return self.local.reconfigure(request)

    def reconfigure_many(
        self, requests: Sequence[LaunchRequest]
    ) -> dict[VmKey, list[str] | VnicError]:
        return self.local.reconfigure_many(requests)

    def destroy(self, session: str, vm: str) -> None:
        self.local.destroy(session, vm)

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        self.local.teardown_session(session, vms)

    def running(self, session: str) -> list[str]:
        return self.local.running(session)

    def sync(self, vms: Sequence[DesiredVm]) -> ReconcileReport:
        return self.local.sync(vms)

    def metrics_text(self) -> str:
        return self.local.metrics_text()

    def repairs(self, after: int = 0) -> tuple[str, list[RepairEvent]]:
        return self.local.repairs(after)

    def exec(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float = TIMEOUT_DEFAULT,
        max_output: int = OUTPUT_DEFAULT,
    ) -> ExecResult:
        return self.local.exec(session, vm, argv, timeout=timeout, max_output=max_output)

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        self.local.set_link(session, vm, up, nic)

    def doctor(self) -> dict[str, Any]:
        return self.local.doctor()

    def gate(self) -> Gate:
        return self.local.gate()
