"""Running the manager (``vnic serve``) and the agent (``vnic agent``) as servers.

The manager also runs the controller (threshold rules, expiry of runtime
adjustments, scenarios) and, with its in-process agent, the feedback
endpoint in every session (see :mod:`vnic.agent.feedback`).

The manager reconciles on start: it sends its agent the VMs the database
says are running (:meth:`~vnic.agent.core.Agent.sync`); the agent rebuilds
those that drifted or vanished and removes vnic objects nobody desires.
A standalone agent reconciles its own desired-state file when it starts,
before it answers anyone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vnic.agent.core import Agent, ReconcileReport, local_agent
from vnic.manager.auth import Tokens
from vnic.manager.dispatch import AgentLike, Manager
from vnic.manager.service import Service
from vnic.store.db import Database

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("vnic.serve")

#: Default ports: the manager's API and a standalone agent's.
MANAGER_PORT = 8470
AGENT_PORT = 8471


def build_manager(
    database_url: str,
    *,
    agent_url: str | None = None,
    agent_key: str | None = None,
    state_dir: Path | None = None,
    driver: str = "netns",
) -> Manager:
    """A manager on ``database_url`` with an in-process agent, or the one at ``agent_url``."""
    db = Database(database_url)
    agent: AgentLike
    if agent_url:
        from vnic.agent.client import AgentClient

        agent = AgentClient(agent_url, agent_key or "", default=driver)
        name = agent_url
    else:
        agent = local_agent(driver, state_dir)
        name = "local"
    return Manager(Service(db), Tokens(db), agent, agent_name=name)


def describe(report: ReconcileReport) -> list[str]:
    lines = [f"rebuilt {vm}: {'; '.join(why)}" for vm, why in report.reapplied.items()]
    lines += [f"removed {what} (nobody owns it)" for what in report.removed]
    lines += [f"could not rebuild {vm}: {err}" for vm, err in report.failed.items()]
    lines += [f"drift on {vm}: {'; '.join(d)}" for vm, d in report.drift.items()]
    return lines


def guarded(app: FastAPI, program: str, host: str, allowed_hosts: Sequence[str]) -> FastAPI:
    """``app`` answering the Host names of ``host`` and ``allowed_hosts``; a warning on
    stderr when ``host`` reaches beyond this machine."""
    from vnic.manager.http_guard import allow_hosts, bind_warning

    allow_hosts(app, host, allowed_hosts)
    warning = bind_warning(program, host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return app


def run_manager(
    manager: Manager,
    host: str,
    port: int,
    intervals: tuple[float, float] = (10.0, 60.0),
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Serve ``manager`` on ``host:port``; ``allowed_hosts``: Host names accepted besides
    the loopback ones and ``host`` (see :mod:`vnic.manager.http_guard`)."""
    import uvicorn

    from vnic.manager.api import create_app

    app = guarded(create_app(manager), "vnic serve", host, allowed_hosts)

    if isinstance(manager.agent, Agent):
        # Before the reconcile, which opens the endpoint in every session it keeps.
        manager.agent.serve_feedback().attach(manager.live)
    for line in describe(manager.reconcile()):
        print(f"vnic serve: {line}", flush=True)
    if isinstance(manager.agent, Agent):
        manager.agent.start_monitor(*intervals)
    manager.live.start()
    print(
        f"vnic serve: listening on http://{host}:{port} (agent: {manager.agent_name})", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def run_agent(
    agent: Agent,
    key: str,
    host: str,
    port: int,
    intervals: tuple[float, float] = (10.0, 60.0),
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
