"""The upgrade to networks and vNICs, with VMs running: a database of the previous schema
(0004: one network per session, one vNIC per VM) and an agent state file of the previous
release (requests without ``nics``), with their VMs up on the real kernel. After the
upgrade (migration 0005, the new agent reading the old file) the VMs are not rebuilt:
same namespaces, same init processes, no drift; the manager describes each as ``eth0``
on ``default`` with its MAC and address; and a live change reaches the running VM,
measured with iperf3.

The VMs are brought up by this release's driver from one-vNIC requests: their objects
are named exactly as the previous release named them (``eth0`` keeps the VM's own
names, see ``test_one_vnic_vm_keeps_the_names_it_had``)."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from tests.netns.conftest import leftovers
from vnic.agent.core import Agent
from vnic.agent.port import DesiredVm
from vnic.dataplane import vminit
from vnic.dataplane.namespaces import RUN_DIR
from vnic.drivers.netns import NetnsDriver
from vnic.lab.measure import TCP_GOODPUT, iperf3
from vnic.manager.service import Service
from vnic.model.launch import LaunchRequest
from vnic.model.profile import build_profile, document_to_values
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names
from vnic.store import db as dbmod
from vnic.store.db import Database

AT = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
NETWORK_ID = 7
PROFILES = {
    "p10": {"egress": {"rate": "10Mbit"}, "ingress": {"rate": "10Mbit"}},
    "wide": {"egress": {"rate": "1Gbit"}, "ingress": {"rate": "1Gbit"}},
}
#: The VMs of the old database: name -> (host index, MAC, override profile id or None).
VMS = {"a": (2, "02:76:6e:00:07:02", None), "b": (3, "02:76:6e:00:07:03", 2)}


def old_database(url: str, session: str) -> None:
    """A database at 0004 with the session and its two running VMs, as 0004's tables are."""
    database = Database(url, migrate=False)
    try:
        dbmod.upgrade(database.engine, "0004")
        with database.engine.begin() as conn:
            for pid, (name, doc) in enumerate(PROFILES.items(), start=1):
                conn.execute(
                    text(
                        "INSERT INTO profiles (id, name, description, labels, current_revision,"
                        " created_at, updated_at) VALUES (:id, :name, '', '{}', 1, :at, :at)"
                    ),
                    {"id": pid, "name": name, "at": AT},
                )
                conn.execute(
                    text(
                        "INSERT INTO profile_revisions (id, profile_id, revision, document,"
                        " created_at) VALUES (:id, :id, 1, :doc, :at)"
                    ),
                    {"id": pid, "doc": json.dumps({"name": name, **doc}), "at": AT},
                )
            conn.execute(
                text(
                    "INSERT INTO sessions (id, name, network_id, default_profile_id,"
                    " overrides_allowed, created_at) VALUES (1, :s, :n, 1, true, :at)"
                ),
                {"s": session, "n": NETWORK_ID, "at": AT},
            )
            for vid, (vm, (host, mac, override)) in enumerate(VMS.items(), start=1):
                profile = "wide" if override else "p10"
                applied = {"driver": "netns", "revisions": {profile: 1}, "values": {}}
                conn.execute(
                    text(
                        "INSERT INTO vms (id, session_id, name, labels, needs,"
                        " override_profile_id, host_index, state, applied, created_at) VALUES"
                        " (:id, 1, :vm, '{}', '[]', :o, :h, 'running', :applied, :at)"
                    ),
                    {
                        "id": vid,
                        "vm": vm,
                        "o": override,
                        "h": host,
                        "applied": json.dumps(applied),
                        "at": AT,
                    },
                )
                conn.execute(
                    text(
                        "INSERT INTO mac_allocations (mac, vm_id, allocated_at)"
                        " VALUES (:mac, :id, :at)"
                    ),
                    {"mac": MacAddress.parse(mac).value, "id": vid, "at": AT},
                )
    finally:
        database.dispose()


def old_request(session: str, vm: str) -> LaunchRequest:
    """What the previous release sent for ``vm``: its profile over the built-in defaults."""
    host, mac, override = VMS[vm]
    layers = [Layer("session-default", "p10 r1", document_to_values(PROFILES["p10"], []))]
    if override:
        layers.append(Layer("vm-profile", "wide r1", document_to_values(PROFILES["wide"], [])))
    eff = complete(layers, {"p10": 1, **({"wide": 1} if override else {})})
    ipv4, ipv6 = names.vm_addresses(NETWORK_ID, host)
    return LaunchRequest.single(
        session=session,
        vm=vm,
        network_id=NETWORK_ID,
        mac=MacAddress.parse(mac),
        ipv4=ipv4,
        ipv6=ipv6,
        profile=build_profile(eff.values),
        values=dict(eff.values),
        revisions=dict(eff.revisions),
    )


def previous_release_state(state_dir: Path) -> None:
    """Rewrite the agent's state file as the previous release wrote it: no ``nics``."""
    path = state_dir / "desired.json"
    doc: Any = json.loads(path.read_text())

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "nics"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    stripped = strip(doc)
    assert "nics" not in json.dumps(stripped) and "nics" in json.dumps(doc)
    path.write_text(json.dumps(stripped))


def identity(session: str, vm: str) -> tuple[int | None, int]:
    """The VM's init pid and its namespace's inode: both change if the VM is rebuilt."""
    ns = Path(RUN_DIR) / names.vm_netns(session, vm)
    return vminit.init_pid(session, vm), os.stat(ns).st_ino


def test_running_vms_keep_running_across_the_upgrade(tmp_path: Path) -> None:
    session = f"u{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'vnic.db'}"
    state_dir = tmp_path / "agent"
    old_database(url, session)
    requests = {vm: old_request(session, vm) for vm in VMS}
    try:
        old = Agent(state_dir, {"netns": NetnsDriver()})
        for request in requests.values():
            old.launch(request)
        previous_release_state(state_dir)
        before = {vm: identity(session, vm) for vm in VMS}
        assert all(pid is not None for pid, _ in before.values())

        # The upgrade: this release's database (migrating to the head) and agent.
        database = Database(url)
        service = Service(database)
        agent = Agent(state_dir, {"netns": NetnsDriver()})
        assert {d.request.vm: d.request for d in agent.state.all()} == requests
        for vm, (_host, mac, _) in VMS.items():
            info = service.get_vm(session, vm)
            assert info.state == "running" and info.mac == mac
            assert [(n.name, n.network, n.mac) for n in info.nics] == [("eth0", "default", mac)]
            assert info.ipv4 == str(requests[vm].ipv4.ip)
        desired = [DesiredVm(kind, r) for kind, r in service.desired()]
        assert sorted(d.request.vm for d in desired) == sorted(VMS)
        for d in desired:  # what the manager now asks is what runs
            assert d.request.nics == requests[d.request.vm].nics
        report = agent.sync(desired)
        assert (report.reapplied, report.failed, report.drift) == ({}, {}, {}), report
        assert {vm: identity(session, vm) for vm in VMS} == before  # not rebuilt

        # A live change reaches the running VM in place.
        _, changes = service.update_vm_live(
            session, "a", {"patch": {"egress": {"rate": "20Mbit"}}}, agent
        )
        assert [c.error for c in changes] == [None]
        assert any(names.VmLinks.of("a").ifb in line for c in changes for line in c.kernel)
        got = iperf3(session, "a", "b", str(requests["b"].ipv4.ip), seconds=2)
        ratio = got.bits_per_second / TCP_GOODPUT / 20e6
        assert 0.9 <= ratio <= 1.05, ratio
        assert identity(session, "a") == before["a"]
        database.dispose()
    finally:
        NetnsDriver().teardown_session(session)
        assert leftovers(session) == []
