"""Migration 0005 (networks and vNICs) on a database made by the previous schema: every
session, VM, MAC, address, override and adjustment survives, each session has its
``default`` network and each VM its ``eth0`` on it, and a running VM's launch request
names the very objects it had (MAC, addresses, network id).

On SQLite 0005 rebuilds ``vms`` (copy, drop, rename); that the new ``vm_nics`` and
the MACs survive it is the test that foreign keys are off while migrations run
(dropping a table with them on cascades to the rows referring to it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import text

from vnic.manager.results import VmRequest
from vnic.manager.runtime import Runtime
from vnic.manager.service import Service
from vnic.model.launch import LaunchRequest
from vnic.model.network import NicSpec
from vnic.model.profile import parse_assignments
from vnic.model.units import MacAddress
from vnic.plan.names import vm_addresses
from vnic.store import db as dbmod
from vnic.store.db import Database

AT = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
MAC_A = MacAddress.parse("02:76:6e:00:00:07").value
MAC_B = MacAddress.parse("02:76:6e:00:00:09").value


def _previous_schema_rows(database: Database) -> None:
    """A database at 0004 with two sessions, three VMs (one running, one with an override
    profile and patch), an adjustment and an audit entry, written as 0004's tables are."""
    dbmod.upgrade(database.engine, "0004")
    doc = {"name": "slow", "egress": {"rate": "5Mbit"}}
    rows = [
        "INSERT INTO profiles (id, name, description, labels, current_revision, created_at,"
        " updated_at) VALUES (1, 'slow', '', '{}', 1, :at, :at)",
        "INSERT INTO profile_revisions (id, profile_id, revision, document, created_at)"
        " VALUES (1, 1, 1, :doc, :at)",
        "INSERT INTO sessions (id, name, network_id, default_profile_id, overrides_allowed,"
        " owner, created_at) VALUES (1, 'lab', 7, 1, true, 'alice', :at)",
        "INSERT INTO sessions (id, name, network_id, overrides_allowed, created_at)"
        " VALUES (2, 'other', 300, true, :at)",
        "INSERT INTO vms (id, session_id, name, role, labels, needs, override_profile_id,"
        " override_patch, host_index, state, applied, created_at) VALUES"
        " (1, 1, 'a', 'server', '{\"tier\": \"web\"}', '[]', NULL,"
        ' \'{"egress": {"delay": "10ms"}}\', 2, \'running\', :applied, :at)',
        "INSERT INTO vms (id, session_id, name, labels, needs, override_profile_id,"
        " host_index, state, created_at) VALUES (2, 1, 'b', '{}', '[]', 1, 5, 'defined', :at)",
        "INSERT INTO vms (id, session_id, name, labels, needs, host_index, state, created_at)"
        " VALUES (3, 2, 'c', '{}', '[]', 2, 'defined', :at)",
        f"INSERT INTO mac_allocations (mac, vm_id, allocated_at) VALUES ({MAC_A}, 1, :at)",
        f"INSERT INTO mac_allocations (mac, vm_id, allocated_at) VALUES ({MAC_B}, 2, :at)",
        f"INSERT INTO mac_allocations (mac, vm_id, allocated_at) VALUES ({MAC_B + 1}, 3, :at)",
        "INSERT INTO runtime_adjustments (id, vm_id, source, patch, reason, created_at)"
        " VALUES (1, 1, 'user', '{\"ingress\": {\"rate\": \"3Mbit\"}}', 'a test', :at)",
        "INSERT INTO audit_log (id, at, session, vm, source, reason, old, new) VALUES"
        " (1, :at, 'lab', 'a', 'user', 'a test', '{}', '{}')",
    ]
    applied = {"driver": "netns", "revisions": {"slow": 1}, "values": {}}
    with database.engine.begin() as conn:
        for sql in rows:
            conn.execute(
                text(sql), {"at": AT, "doc": json.dumps(doc), "applied": json.dumps(applied)}
            )
        if database.engine.dialect.name == "postgresql":  # ids given: move the sequences on
            for table in ("profiles", "profile_revisions", "sessions", "vms"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)"))
            for table in ("runtime_adjustments", "audit_log"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)"))


def test_upgrade_from_0004_keeps_every_session_vm_mac_address_and_override(db_url: str) -> None:
    database = Database(db_url, migrate=False)
    try:
        _previous_schema_rows(database)
        dbmod.upgrade(database.engine)
        assert dbmod.current_revision(database.engine) == dbmod.SCHEMA_HEAD
        service = Service(database)

        # Each session has default, with its network id and the subnets it had.
        for session, network_id in (("lab", 7), ("other", 300)):
            (net,) = service.list_networks(session)
            assert (net.name, net.network_id) == ("default", network_id)
            v4, v6 = vm_addresses(network_id, 2)
            assert net.ipv4 == str(v4.network) and net.ipv6 == str(v6.network)
        assert service.get_session("lab").owner == "alice"

        a, b = service.list_vms("lab")
        assert (a.name, a.role, dict(a.labels), a.state) == (
            "a",
            "server",
            {"tier": "web"},
            "running",
        )
        assert a.mac == str(MacAddress(MAC_A)) and b.mac == str(MacAddress(MAC_B))
        assert a.ipv4 == str(vm_addresses(7, 2)[0].ip) and a.ipv6 == str(vm_addresses(7, 2)[1].ip)
        assert b.ipv4 == str(vm_addresses(7, 5)[0].ip)
        assert a.override_patch == {"egress": {"delay": "10ms"}} and a.override_profile is None
        assert b.override_profile == "slow" and b.override_patch is None
        assert [(n.name, n.network, n.mac) for n in a.nics] == [("eth0", "default", a.mac)]
        (c,) = service.list_vms("other")
        assert c.mac == str(MacAddress(MAC_B + 1)) and c.ipv4 == str(vm_addresses(300, 2)[0].ip)

        # Resolution sees the same layers: session default, eth0's patch, the adjustment.
        eff = service.explain("lab", "a").effective
        assert str(eff.values["egress.rate"]) == "5Mbit"
        assert str(eff.sources["egress.delay"]) == "vm-patch (override)"
        assert str(eff.values["ingress.rate"]) == "3Mbit"
        assert eff.sources["ingress.rate"].layer == "runtime"

        # The running VM's launch request is what it ran with before the upgrade.
        ((kind, request),) = service.desired()
        assert kind == "netns" and isinstance(request, LaunchRequest)
        assert (request.vm, request.nic, request.unit, request.network_id) == ("a", "eth0", "a", 7)
        assert request.mac.value == MAC_A
        assert (request.ipv4, request.ipv6) == vm_addresses(7, 2)

        # MACs stay unique database-wide and the allocation moved to the vNIC.
        with database.engine.connect() as conn:
            macs = conn.execute(text("SELECT mac, nic_id FROM mac_allocations")).all()
            nics = conn.execute(text("SELECT id, vm_id, name FROM vm_nics")).all()
            adj = conn.execute(text("SELECT vm_id, nic, source FROM runtime_adjustments")).all()
        assert sorted(m for m, _ in macs) == [MAC_A, MAC_B, MAC_B + 1]
        assert {vm_id for _, vm_id, _ in nics} == {1, 2, 3} and {n for *_, n in nics} == {"eth0"}
        assert adj == [(1, "eth0", "user")]
        (entry,) = Runtime(service).audit("lab")
        assert (entry.vm, entry.nic) == ("a", None)

        # A VM added after the upgrade takes the lowest free address of default and a new MAC.
        d = service.add_vm(VmRequest("lab", "d")).vm
        assert d.ipv4 == str(vm_addresses(7, 3)[0].ip)
        assert d.mac not in (a.mac, b.mac, c.mac)
    finally:
        database.dispose()


def test_downgrade_to_0004_keeps_eth0_and_drops_the_other_vnics(db_url: str) -> None:
    database = Database(db_url, migrate=False)
    try:
        _previous_schema_rows(database)
        dbmod.upgrade(database.engine)
        service = Service(database)
        service.add_network("lab", "data")
        service.add_vm(VmRequest("lab", "e", nics=[NicSpec("default"), NicSpec("data")]))
        Runtime(service).adjust(
            "lab", "e", source="user", reason="x", values=parse_assignments(["egress.rate=1Mbit"]),
            nic="eth1",
        )  # fmt: skip
        e = service.get_vm("lab", "e")
        database.dispose()
        dbmod.downgrade(database.engine, "0004")
        with database.engine.connect() as conn:
            vms = conn.execute(
                text("SELECT v.name, v.host_index, v.override_patch, m.mac FROM vms v"
                     " JOIN mac_allocations m ON m.vm_id = v.id ORDER BY v.name")
            ).all()  # fmt: skip
            adjustments = conn.execute(text("SELECT vm_id, source FROM runtime_adjustments")).all()
        assert [(n, h, m) for n, h, _, m in vms] == [
            ("a", 2, MAC_A),
            ("b", 5, MAC_B),
            ("c", 2, MAC_B + 1),
            ("e", 3, MacAddress.parse(str(e.mac)).value),
        ]
        patch = vms[0][2]  # JSON: text on SQLite, decoded on PostgreSQL
        assert (json.loads(patch) if isinstance(patch, str) else patch) == {
            "egress": {"delay": "10ms"}
        }
        assert adjustments == [(1, "user")]  # eth1's went with eth1
        dbmod.upgrade(database.engine)  # and up again
        assert [v.name for v in Service(database).list_vms("lab")] == ["a", "b", "e"]
    finally:
        database.dispose()
