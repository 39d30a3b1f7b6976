"""SIGKILL at any moment loses no database state and leaves nothing that a restart
does not clean: the agent (standalone) or the manager with its in-process agent is
killed part-way through a series of launches, restarted, and then the database, the
agent's desired state and the kernel must agree, with no drift and no orphans."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Client, Server, admin_token
from vnic.agent.state import DesiredState
from vnic.dataplane import delayd
from vnic.drivers.netns import NetnsDriver
from vnic.manager.service import Service
from vnic.store.db import Database

VMS = [f"v{i}" for i in range(6)]


def launch_all(client: Client, session: str, errors: list[Any]) -> None:
    for vm in VMS:
        try:
            r = client.http.post(f"/v1/sessions/{session}/vms/{vm}/launch")
        except httpx.HTTPError as exc:  # the manager itself was killed
            errors.append((vm, str(exc)))
            return
        if r.status_code != 200:
            errors.append((vm, r.status_code))
            return  # the agent is gone; the rest stay defined


@pytest.mark.parametrize("killed", ["agent", "serve"])
def test_sigkill_mid_launch_then_restart_reconciles(
    home: Path, session_name: str, killed: str
) -> None:
    rng = random.Random(5)
    key_file = home / "agent.key"
    agent = Server(home, "agent", "--key-file", str(key_file), "--drift-interval", "600")
    agent_args = ("--agent", agent.url, "--agent-key-file", str(key_file))
    serve = Server(home, "serve", *(agent_args if killed == "agent" else ()))
    token = admin_token(home)
    if killed == "agent":
        agent.start()
    serve.start()
    admin = Client(serve.url, token)
    db = Database(f"sqlite:///{home / 'vnic.db'}")
    driver = NetnsDriver()
    try:
        doc = {
            "name": "d",
            "egress": {"rate": "50Mbit", "delay": "2ms"},
            "ingress": {"rate": "50Mbit"},
        }
        admin("POST", "/v1/profiles", 201, json=doc)
        admin("POST", "/v1/sessions", 201, json={"name": session_name, "default_profile": "d"})
        for vm in VMS:
            admin("POST", f"/v1/sessions/{session_name}/vms", 201, json={"name": vm})
        for round_ in range(3):
            errors: list[Any] = []
            worker = threading.Thread(target=launch_all, args=(admin, session_name, errors))
            worker.start()
            time.sleep(rng.uniform(0.05, 0.6))  # somewhere inside a launch
            (agent if killed == "agent" else serve).kill()
            worker.join(timeout=120)
            # Restart: the agent reconciles its own desired state; the manager sends it
            # the database's running VMs when it starts, or when an admin asks.
            if killed == "agent":
                agent.start()
                report = admin("POST", "/v1/reconcile")
                assert report["failed"] == {} and report["drift"] == {}, report
            else:
                serve.start()
                admin = Client(serve.url, token)

            running = {v.name for v in Service(db).list_vms(session_name) if v.state == "running"}
            desired = {d.request.vm for d in DesiredState(home / "agent").all()}
            present = driver.inventory().get(session_name, set())
            assert desired == running, (round_, desired, running)
            assert present == running, (round_, present, running)
            for _, request in Service(db).desired():
                assert driver.drift(request) == [], request.vm
            # what was not launched is still defined, and a further launch works
            for vm in sorted(set(VMS) - running)[:1]:
                admin("POST", f"/v1/sessions/{session_name}/vms/{vm}/launch")
            admin("POST", f"/v1/sessions/{session_name}/down")
            assert driver.inventory().get(session_name, set()) == set()
    finally:
        try:
            admin.http.post(f"/v1/sessions/{session_name}/down")
        finally:
            serve.kill()
            agent.kill()
            driver.teardown_session(session_name)
            db.dispose()
    assert not delayd.run_files().get(session_name)
