"""The central database through the service layer, on SQLite and on real PostgreSQL."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from vnic.errors import Conflict, Exhausted, InUse, InvalidInput, NotFound
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.documents import parse_documents, read_documents
from vnic.model.fields import OFF
from vnic.model.profile import parse_assignments, parse_profile_document
from vnic.model.session import AssignmentRule
from vnic.model.units import MacAddress, Rate
from vnic.store import db as dbmod
from vnic.store.db import Database
from vnic.store.models import Base, MacAllocationRow, ProfileRevisionRow

TABLES = {
    "networks",
    "vm_nics",
    "profiles",
    "profile_revisions",
    "sessions",
    "assignment_rules",
    "vms",
    "mac_allocations",
    "runtime_adjustments",
}


def spec(name: str, **fields: Any) -> Any:
    return parse_profile_document({"name": name, **fields})


def load_examples(service: Service, examples_dir: Path) -> None:
    service.apply_profiles(parse_documents(read_documents([str(examples_dir)])))


# ----------------------------------------------------------------------------- migrations


def test_migrations_create_every_table_and_go_back_down(db_url: str) -> None:
    database = Database(db_url, migrate=False)
    try:
        assert not TABLES & set(inspect(database.engine).get_table_names())
        dbmod.upgrade(database.engine)
        assert TABLES <= set(inspect(database.engine).get_table_names())
        assert dbmod.current_revision(database.engine) == dbmod.head_revision(database.engine)
        dbmod.downgrade(database.engine, "base")
        assert not TABLES & set(inspect(database.engine).get_table_names())
        dbmod.upgrade(database.engine)
        assert TABLES <= set(inspect(database.engine).get_table_names())
    finally:
        database.dispose()


def test_schema_head_constant_matches_the_migration_scripts(db: Database) -> None:
    assert dbmod.SCHEMA_HEAD == dbmod.head_revision(db.engine)
    assert dbmod.current_revision(db.engine) == dbmod.SCHEMA_HEAD


def test_models_match_migrations(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


# ----------------------------------------------------------------------------- profiles


def test_apply_is_idempotent_and_every_change_is_a_new_revision(service: Service) -> None:
    first = service.apply_profiles([spec("p", egress={"rate": "10Mbit"})])
    assert [(r.action, r.revision) for r in first] == [("created", 1)]
    again = service.apply_profiles([spec("p", egress={"rate": "10Mbit"})])
    assert [(r.action, r.revision) for r in again] == [("unchanged", 1)]
    changed = service.apply_profiles([spec("p", egress={"rate": "20Mbit"})])
    assert [(r.action, r.revision) for r in changed] == [("updated", 2)]
    assert service.get_profile("p").document["egress"] == {"rate": "20Mbit"}
    old = service.get_profile("p", revision=1)
    assert old.revision == 1 and old.document["egress"] == {"rate": "10Mbit"}
    assert [r.revision for r in service.history("p")] == [1, 2]
    with pytest.raises(NotFound, match="revision"):
        service.get_profile("p", revision=7)


def test_export_then_apply_changes_nothing(service: Service, examples_dir: Path) -> None:
    load_examples(service, examples_dir)
    exported = service.export_profiles()
    assert {d["name"] for d in exported} == {"lan", "wan-dsl", "mobile-3g", "satellite"}
    results = service.apply_profiles([parse_profile_document(d) for d in exported])
    assert {r.action for r in results} == {"unchanged"}


def test_stored_document_round_trips_typed_values(service: Service) -> None:
    original = spec(
        "rt",
        egress={"rate": "1.5Gbit", "delay": "250us", "loss": {"mean": "2%", "burst_length": 4}},
        ingress={"jitter": "1ms", "delay": "5ms", "distribution": "pareto", "queue": "100pkt"},
        tcp={"window_scaling": False, "ecn": "passive"},
    )
    service.apply_profiles([original])
    reread = parse_profile_document(dict(service.get_profile("rt").document))
    assert reread.values == original.values
    assert reread.values["egress.rate"] == Rate(1_500_000_000)


def test_overlapping_mac_ranges_are_refused_and_nothing_is_written(service: Service) -> None:
    service.apply_profiles([spec("a", mac_range="02:00:00:aa:00:00-02:00:00:aa:ff:ff")])
    with pytest.raises(InvalidInput) as exc:
        service.apply_profiles(
            [
                spec("fresh", egress={"rate": "1Mbit"}),
                spec("b", mac_range="02:00:00:aa:80:00-02:00:00:ab:00:ff"),
            ]
        )
    assert "[1].mac_range" in exc.value.paths
    assert "'a'" in str(exc.value)
    assert [p.name for p in service.list_profiles()] == ["a"]


def test_mac_range_inside_the_default_pool_is_refused(service: Service) -> None:
    with pytest.raises(InvalidInput) as exc:
        service.apply_profiles([spec("x", mac_range="02:76:6e:00:00:00/40")])
    assert exc.value.paths == ["mac_range"]


def test_profile_in_use_cannot_be_deleted_and_the_error_names_users(
    service: Service, examples_dir: Path
) -> None:
    load_examples(service, examples_dir)
    service.create_session(
        "lab", default_profile="wan-dsl", rules=[AssignmentRule("lan", role="server")]
    )
    service.add_vm(VmRequest("lab", "phone", profile="mobile-3g"))
    for name, who in [
        ("wan-dsl", "session lab (default profile)"),
        ("lan", "session lab (rule #1)"),
        ("mobile-3g", "vm lab/phone (override)"),
    ]:
        with pytest.raises(InUse) as exc:
            service.delete_profile(name)
        assert who in exc.value.users
    service.delete_profile("satellite")
    assert "satellite" not in {p.name for p in service.list_profiles()}
    service.delete_session("lab", force=True)
    service.delete_profile("wan-dsl")


def test_duplicate_names_in_one_apply_are_refused(service: Service) -> None:
    with pytest.raises(InvalidInput) as exc:
        service.apply_profiles([spec("d"), spec("d")])
    assert exc.value.paths == ["[1].name"]


# ----------------------------------------------------------------------------- sessions and VMs


def test_vm_resolution_through_the_store(service: Service, examples_dir: Path) -> None:
    load_examples(service, examples_dir)
    service.create_session(
        "lab", default_profile="wan-dsl", rules=[AssignmentRule("lan", name="srv-*")]
    )
    client = service.add_vm(VmRequest("lab", "client"))
    server = service.add_vm(VmRequest("lab", "srv-1"))
    phone = service.add_vm(
        VmRequest(
            "lab", "phone", profile="mobile-3g", patch=parse_assignments(["egress.rate=256kbit"])
        )
    )
    assert client.effective.sources["egress.rate"].layer == "session-default"
    assert server.effective.sources["egress.rate"].layer == "rule"
    assert server.effective.values["egress.rate"] == Rate.parse("1Gbit")
    assert phone.effective.sources["egress.rate"].layer == "vm-patch"
    assert phone.effective.values["egress.rate"] == Rate.parse("256kbit")
    assert phone.effective.revisions == {"wan-dsl": 1, "mobile-3g": 1}
    # MACs come from each effective profile's range, lowest free first.
    assert client.vm.mac == "02:00:00:10:00:00"
    assert server.vm.mac == "02:00:00:01:00:00"
    assert phone.vm.mac == "02:00:00:30:00:00"
    again = service.explain("lab", "phone")
    assert again.effective.values == phone.effective.values


def test_invalid_effective_profile_writes_nothing(service: Service, examples_dir: Path) -> None:
    load_examples(service, examples_dir)
    service.create_session("lab", default_profile="wan-dsl")
    with pytest.raises(InvalidInput) as exc:
        service.add_vm(VmRequest("lab", "slow", patch=parse_assignments(["egress.rate=100kbit"])))
    assert "qos.egress[0].guaranteed" in exc.value.paths
    assert service.list_vms("lab") == []
    with service.db.transaction() as s:
        assert s.scalars(select(MacAllocationRow)).all() == []


def test_overrides_refused_when_the_policy_forbids_them(
    service: Service, examples_dir: Path
) -> None:
    load_examples(service, examples_dir)
    service.create_session("locked", default_profile="lan", overrides_allowed=False)
    with pytest.raises(InvalidInput) as exc:
        service.add_vm(VmRequest("locked", "vm1", profile="satellite"))
    assert exc.value.paths == ["profile"]
    with pytest.raises(InvalidInput):
        service.add_vm(VmRequest("locked", "vm1", patch={"egress.delay": OFF}))
    assert service.list_vms("locked") == []
    service.add_vm(VmRequest("locked", "vm1"))


def test_names_and_duplicates(service: Service) -> None:
    with pytest.raises(InvalidInput) as exc:
        service.create_session("Bad Name")
    assert exc.value.paths == ["name"]
    service.create_session("s1")
    with pytest.raises(Conflict):
        service.create_session("s1")
    with pytest.raises(
        InvalidInput, match=r"default_profile: got .nope.; expected an existing profile"
    ):
        service.create_session("s2", default_profile="nope")
    service.add_vm(VmRequest("s1", "a"))
    with pytest.raises(Conflict):
        service.add_vm(VmRequest("s1", "a"))
    with pytest.raises(InvalidInput):
        service.add_vm(VmRequest("s1", "UPPER"))
    with pytest.raises(InvalidInput) as exc:
        service.add_vm(VmRequest("s1", "b", role="x" * 65))
    assert exc.value.paths == ["role"]
    with pytest.raises(InvalidInput) as exc:
        service.add_vm(VmRequest("s1", "b", needs=["ok", "not ok"]))
    assert exc.value.paths == ["needs[1]"]
    assert [s.name for s in service.list_sessions()] == ["s1"]


def test_network_ids_are_unique_and_allocated_lowest_first(service: Service) -> None:
    assert service.create_session("a").network_id == 1
    assert service.create_session("b", network_id=5000).network_id == 5000
    assert service.create_session("c").network_id == 2
    with pytest.raises(Conflict):
        service.create_session("d", network_id=5000)
    for bad in (2**24, 0, "²", "12a"):
        with pytest.raises(InvalidInput) as exc:
            service.create_session("e", network_id=bad)  # type: ignore[arg-type]
        assert exc.value.paths == ["network_id"]


def test_session_with_vms_needs_force(service: Service) -> None:
    service.create_session("s")
    service.add_vm(VmRequest("s", "a"))
    with pytest.raises(InUse):
        service.delete_session("s")
    assert service.delete_session("s", force=True) == ["a"]
    with service.db.transaction() as s:
        assert s.scalars(select(MacAllocationRow)).all() == []


def test_mac_range_exhaustion_is_a_clear_error(service: Service) -> None:
    service.apply_profiles([spec("tiny", mac_range="02:00:00:00:00:00/46")])
    service.create_session("s", default_profile="tiny")
    macs = [service.add_vm(VmRequest("s", f"v{i}")).vm.mac for i in range(4)]
    assert macs == [f"02:00:00:00:00:0{i}" for i in range(4)]
    with pytest.raises(Exhausted, match="02:00:00:00:00:00-02:00:00:00:00:03"):
        service.add_vm(VmRequest("s", "v4"))
    service.remove_vm("s", "v1")
    assert service.add_vm(VmRequest("s", "v5")).vm.mac == "02:00:00:00:00:01"


def test_a_vm_with_several_vnics_fills_the_holes_of_its_mac_range_lowest_first(
    service: Service,
) -> None:
    from vnic.model.network import NicSpec

    service.apply_profiles([spec("small", mac_range="02:00:00:00:00:00/45")])  # 8 MACs
    service.create_session("s", default_profile="small")
    for i in range(4):
        service.add_vm(VmRequest("s", f"v{i}"))  # :00 .. :03
    service.remove_vm("s", "v1")
    service.remove_vm("s", "v3")  # holes at :01 and :03
    two = service.add_vm(VmRequest("s", "two", nics=[NicSpec(), NicSpec()]))
    assert [n.mac for n in two.vm.nics] == ["02:00:00:00:00:01", "02:00:00:00:00:03"]
    three = service.add_vm(VmRequest("s", "three", nics=[NicSpec()] * 3))
    assert [n.mac for n in three.vm.nics] == [f"02:00:00:00:00:0{i}" for i in (4, 5, 6)]
    with pytest.raises(Exhausted):
        service.add_vm(VmRequest("s", "more", nics=[NicSpec(), NicSpec()]))  # one MAC left
    assert service.add_vm(VmRequest("s", "last")).vm.mac == "02:00:00:00:00:07"


def test_profile_change_that_breaks_a_vm_is_refused(service: Service, examples_dir: Path) -> None:
    load_examples(service, examples_dir)
    service.create_session("lab", default_profile="wan-dsl")
    service.add_vm(VmRequest("lab", "client", patch=parse_assignments(["ingress.peak=20Mbit"])))
    doc = dict(service.get_profile("wan-dsl").document)
    doc["ingress"] = {**doc["ingress"], "rate": "30Mbit"}  # valid alone, below the VM's peak
    with pytest.raises(InvalidInput) as exc:
        service.apply_profiles([parse_profile_document(doc)])
    assert exc.value.paths == ["ingress.peak"]
    assert "lab/client" in exc.value.errors[0].value
    assert service.get_profile("wan-dsl").revision == 1
    with service.db.transaction() as s:
        assert len(s.scalars(select(ProfileRevisionRow)).all()) == 4
    # Moving the MAC range away from an allocated MAC is refused too.
    doc = dict(service.get_profile("wan-dsl").document)
    doc["mac_range"] = "02:00:00:11:00:00-02:00:00:11:ff:ff"
    with pytest.raises(InvalidInput) as exc:
        service.apply_profiles([parse_profile_document(doc)])
    assert exc.value.paths == ["mac_range"]


# ----------------------------------------------------------------------------- concurrency


def _add_many(url: str, session: str, prefix: str, count: int) -> list[str]:
    database = Database(url, migrate=False)
    try:
        service = Service(database)
        return [
            str(service.add_vm(VmRequest(session, f"{prefix}-{i}")).vm.mac) for i in range(count)
        ]
    finally:
        database.dispose()


def test_parallel_processes_never_allocate_the_same_mac(db_url: str) -> None:
    database = Database(db_url)
    service = Service(database)
    service.apply_profiles([spec("pool", mac_range="02:00:00:0c:00:00/32")])
    service.create_session("race", default_profile="pool")
    database.dispose()
    workers, each = 4, 12
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_add_many, [(db_url, "race", f"w{w}", each) for w in range(workers)])
    macs = [m for batch in results for m in batch]
    assert len(macs) == workers * each
    assert len(set(macs)) == len(macs)
    # Lowest-free allocation under serialisation leaves no gaps.
    values = sorted(MacAddress.parse(m).value for m in macs)
    assert values == list(range(values[0], values[0] + len(values)))
    database = Database(db_url)
    try:
        assert len(Service(database).list_vms("race")) == workers * each
    finally:
        database.dispose()
