"""Running the manager (``vnic serve``) and the agent (``vnic agent``) as servers.

The manager also runs the controller (threshold rules, expiry of runtime
adjustments, scenarios) and, with its in-process agent, the feedback
endpoint in every session (see :mod:`vnic.agent.feedback`).

The manager reconciles on start: it sends its agent the VMs the database
says are running (:meth:`~vnic.agent.core.Agent.sync`); the agent rebuilds
those that drifted or vanished and removes vnic objects nobody desires.
A standalone agent reconciles its own desired-state file when it starts,
before it answers anyone. One that follows a manager (``vnic agent --manager``,
:func:`run_follower`) serves no control API: it dials out, registers its host and
follows the host's desired state (:mod:`vnic.agent.follow`).

Both then repair drift on their own (:mod:`vnic.agent.repair`, every
``repair`` seconds of ``intervals``, default 2; 0 turns it off): the manager
writes each repair of its in-process agent to the audit log (source
``agent``), and those of a remote agent, which lists them at
``GET /v1/repairs``, by asking for them every repair interval.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vnic.agent.core import Agent, local_agent
from vnic.agent.fleet import FleetAgent
from vnic.agent.port import ReconcileReport
from vnic.edge.admission import Limits
from vnic.manager.auth import Tokens
from vnic.manager.dispatch import Manager
from vnic.manager.service import Service
from vnic.store.db import Database

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vnic.agent.metrics_http import MetricsServer
    from vnic.agent.upstream import HostInfo, HttpSource

log = logging.getLogger("vnic.server")

#: Seconds: latency probe, drift check (repair off), drift repair (0: off).
Intervals = tuple[float, float, float]
INTERVALS: Intervals = (10.0, 60.0, 2.0)

#: Default ports: the manager's API and a standalone agent's.
MANAGER_PORT = 8470
AGENT_PORT = 8471


@dataclass
class Served:
    """What :func:`build_manager` made: the manager, and the agent it runs in process
    (None when its agent is remote). Kept here, where it was built, because only this
    host's own agent serves feedback, monitors and repairs in this process."""

    manager: Manager
    local: Agent | None = None


def build_manager(
    database_url: str,
    *,
    agent_url: str | None = None,
    agent_key: str | None = None,
    state_dir: Path | None = None,
    driver: str = "netns",
) -> Served:
    """A manager on ``database_url`` with an in-process agent, or the one at ``agent_url``."""
    db = Database(database_url)
    if agent_url:
        from vnic.agent.client import AgentClient

        remote = AgentClient(agent_url, agent_key or "", default=driver)
        return Served(Manager(Service(db), Tokens(db), remote, agent_name=agent_url))
    local = local_agent(driver, state_dir)
    service = Service(db)
    # The own agent, with the stats of VMs on other hosts read from their agents.
    fleet = FleetAgent(local, service.stats_urls)
    return Served(Manager(service, Tokens(db), fleet, agent_name="local"), local)


def describe(report: ReconcileReport) -> list[str]:
    lines = [f"rebuilt {vm}: {'; '.join(why)}" for vm, why in report.reapplied.items()]
    lines += [f"removed {what} (nobody owns it)" for what in report.removed]
    lines += [f"could not rebuild {vm}: {err}" for vm, err in report.failed.items()]
    lines += [f"drift on {vm}: {'; '.join(d)}" for vm, d in report.drift.items()]
    return lines


def guarded(
    app: FastAPI, program: str, host: str, allowed_hosts: Sequence[str], tls: bool = False
) -> FastAPI:
    """``app`` answering the Host names of ``host`` and ``allowed_hosts``; a warning on
    stderr when ``host`` reaches beyond this machine."""
    from vnic.edge.guard import allow_hosts, bind_warning

    allow_hosts(app, host, allowed_hosts)
    warning = bind_warning(program, host, tls)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return app


def run_manager(
    served: Served,
    host: str,
    port: int,
    intervals: Intervals = INTERVALS,
    limits: Limits | None = None,
    allowed_hosts: Sequence[str] = (),
    tls: tuple[Path, Path] | None = None,
) -> None:
    """Serve ``served``'s manager on ``host:port``; ``allowed_hosts``: Host names accepted
    besides the loopback ones and ``host`` (see :mod:`vnic.edge.guard`); ``tls``: the
    certificate (chain) and key files to serve HTTPS with (agents dial in over it)."""
    import uvicorn

    from vnic.api.app import create_app
    from vnic.web import add_web_routes

    manager, local = served.manager, served.local
    app = guarded(
        create_app(manager, limits, [add_web_routes]), "vnic serve", host, allowed_hosts, bool(tls)
    )

    if local is not None:
        # Before the reconcile, which opens the endpoint in every session it keeps.
        local.serve_feedback().attach(manager.live)
    for line in describe(manager.reconcile()):
        print(f"vnic serve: {line}", flush=True)
    if local is not None:
        # This host's agent: each repair is audited as it is made.
        if intervals[2]:
            repairer = local.enable_repair(intervals[2])
            repairer.listeners.append(manager.record_repair)
        local.start_monitor(*intervals)
    elif intervals[2]:
        # A remote agent repairs on its own; its repairs are asked for.
        _collect_repairs(manager, intervals[2])
    manager.live.start()
    print(
        f"vnic serve: listening on {'https' if tls else 'http'}://{host}:{port} "
        f"(agent: {manager.agent_name})",
        flush=True,
    )
    cert, key = tls if tls else (None, None)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
    )


def _collect_repairs(manager: Manager, interval: float) -> None:
    """Audit a remote agent's drift repairs in the background, every ``interval`` s."""

    def loop() -> None:
        while True:
            try:
                manager.collect_repairs()
            except Exception as exc:  # the agent may be down a while: try again
                log.warning("collecting the agent's repairs failed: %s", exc)
            time.sleep(interval)

    threading.Thread(target=loop, name="vnic-repairs", daemon=True).start()


def run_agent(
    agent: Agent,
    key: str,
    host: str,
    port: int,
    intervals: Intervals = INTERVALS,
    allowed_hosts: Sequence[str] = (),
) -> None:
    import uvicorn

    from vnic.agent.api import create_agent_app

    app = guarded(create_agent_app(agent, key), "vnic agent", host, allowed_hosts)

    for line in describe(agent.reconcile()):
        print(f"vnic agent: {line}", flush=True)
    agent.start_monitor(*intervals)
    print(f"vnic agent: listening on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def run_follower(
    agent: Agent,
    source: HttpSource,
    info: HostInfo,
    intervals: Intervals = INTERVALS,
    metrics: MetricsServer | None = None,
    *,
    stop: threading.Event | None = None,
) -> None:
    """Run ``agent`` following the manager behind ``source`` as host ``info``
    (``vnic agent --manager``): no control API; its own reconcile first (the VMs it
    already runs come back before the manager is reached), its monitor and drift
    repair, the :class:`~vnic.agent.follow.Follower`, and ``metrics`` (a
    ``GET /metrics`` server, already bound) if given.

    Returns on SIGTERM or SIGINT (or when ``stop`` is set), once a change in progress
    has ended; the VMs keep running: they are desired state, the manager decides."""
    import signal

    from vnic.agent.follow import Follower

    follow_log = logging.getLogger("vnic.agent.follow")
    if not follow_log.handlers:  # each register, relist, fence and retry: one line
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("vnic agent: %(message)s"))
        follow_log.addHandler(handler)
        follow_log.setLevel(logging.INFO)
        follow_log.propagate = False
    stop = stop or threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    for line in describe(agent.reconcile()):
        print(f"vnic agent: {line}", flush=True)
    agent.start_monitor(*intervals)
    if metrics is not None:
        metrics.start()
    follower = Follower(agent, source, info)
    # The follower runs beside this thread: a long poll holds its thread up to the
    # poll's wait, and a stop must not wait that long.
    threading.Thread(target=follower.run, args=(stop,), name="vnic-follow", daemon=True).start()
    where = f"; metrics at {info.metrics_url}" if info.metrics_url else ""
    print(f"vnic agent: following {source.url} as host {info.host}{where}", flush=True)
    while not stop.wait(1.0):  # a bounded wait: signals are handled between two
        pass
    if not follower.halt():
        print("vnic agent: a change was still in progress; reconcile finishes it", flush=True)
    if metrics is not None:
        metrics.close()
    print("vnic agent: stopped (the VMs keep running)", flush=True)
