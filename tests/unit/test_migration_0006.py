"""Migration 0006 (hosts, placement, the change log) on a database made by 0005: every
session, VM, vNIC and MAC is kept, every VM is on no host (the manager's own agent, as
before), and ``fleet_state`` holds its one row at revision 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import text

from tests.unit.test_migration_0005 import _previous_schema_rows
from vnic.agent.core import Agent
from vnic.drivers.fake import FakeDriver
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.store import db as dbmod
from vnic.store.db import Database

KEPT = {
    "sessions": "SELECT id, name, network_id, owner FROM sessions ORDER BY id",
    "vms": "SELECT id, session_id, name, state, applied FROM vms ORDER BY id",
    "vm_nics": "SELECT id, vm_id, name, network_id, host_index FROM vm_nics ORDER BY id",
    "macs": "SELECT mac, nic_id FROM mac_allocations ORDER BY mac",
    "networks": "SELECT id, session_id, name FROM networks ORDER BY id",
    "adjustments": "SELECT vm_id, nic, source FROM runtime_adjustments ORDER BY id",
}


def _at_0005(database: Database) -> dict[str, list[Any]]:
    """A database at 0005 with two sessions, three VMs and their vNICs; its rows."""
    _previous_schema_rows(database)
    dbmod.upgrade(database.engine, "0005")
    assert dbmod.current_revision(database.engine) == "0005"
    with database.engine.connect() as conn:
        rows = {k: [tuple(r) for r in conn.execute(text(q)).all()] for k, q in KEPT.items()}
    assert len(rows["vms"]) == 3 and len(rows["vm_nics"]) == 3 and len(rows["macs"]) == 3
    return rows


def test_upgrade_from_0005_keeps_everything_and_puts_every_vm_on_no_host(
    db_url: str, tmp_path: Path
) -> None:
    database = Database(db_url, migrate=False)
    try:
        before = _at_0005(database)
        dbmod.upgrade(database.engine)
        assert dbmod.current_revision(database.engine) == dbmod.SCHEMA_HEAD == "0006"
        with database.engine.connect() as conn:
            after = {k: [tuple(r) for r in conn.execute(text(q)).all()] for k, q in KEPT.items()}
            hosts = conn.execute(text("SELECT host_id FROM vms")).all()
            placement = conn.execute(text("SELECT placement FROM sessions")).all()
            fleet = conn.execute(text("SELECT id, revision, floor FROM fleet_state")).all()
            counts = [
                conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                for t in ("hosts", "host_changes", "vm_status")
            ]
        assert after == before
        assert [h for (h,) in hosts] == [None, None, None]
        assert [p for (p,) in placement] == [None, None]
        assert fleet == [(1, 0, 0)]
        assert counts == [0, 0, 0]

        service = Service(database)
        assert [(v.name, v.state, v.host) for v in service.list_vms("lab")] == [
            ("a", "running", None),
            ("b", "defined", None),
        ]
        ((kind, request),) = service.desired()  # the own agent still runs the running one
        assert (kind, request.vm) == ("netns", "a")
        # The change log works on the migrated database.
        service.add_host("hv1")
        service.register_host("hv1", underlay="10.250.0.11", vnics=4, cpus=1)
        service.host_wait = 0.05
        service.add_vm(VmRequest("other", "d"))
        agent = Agent(tmp_path / "agent", {"fake": FakeDriver()}, default="fake")
        assert service.launch_vm("other", "d", agent).vm.host == "hv1"
        assert service.host_changes("hv1", 0)[0] == 1
    finally:
        database.dispose()


def test_downgrade_to_0005_and_up_again_keeps_the_vms(db_url: str) -> None:
    database = Database(db_url, migrate=False)
    try:
        before = _at_0005(database)
        dbmod.upgrade(database.engine)
        service = Service(database)
        service.add_host("hv1")
        database.dispose()
        dbmod.downgrade(database.engine, "0005")
        with database.engine.connect() as conn:
            after = {k: [tuple(r) for r in conn.execute(text(q)).all()] for k, q in KEPT.items()}
        assert after == before
        dbmod.upgrade(database.engine)
        assert [h.name for h in Service(database).list_hosts()] == []
        assert [v.name for v in Service(database).list_vms("lab")] == ["a", "b"]
    finally:
        database.dispose()
