"""The manager's side of many hosts (``vnic.manager.hosts``, ``changelog``, and the launch,
stop and live-change paths of hosted VMs), on SQLite and on PostgreSQL.

Time that decides leases is the service's injected clock; a thread plays a host's agent
where a launch waits for its report (it follows the change log as an agent does and
reports what it was told to).

Why one module: every test here shares the clock, the fleet and the playing agent, and
they read as one story (admins, the change log, reports, launches, PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from tests.conftest import new_pg_url
from vnic.agent.core import Agent
from vnic.drivers.fake import FakeDriver
from vnic.errors import Conflict, InUse, InvalidInput, NotFound, Unauthenticated
from vnic.manager import changelog
from vnic.manager.auth import hash_secret
from vnic.manager.changelog import Relist, Stale, StatusReport
from vnic.manager.results import VmRequest
from vnic.manager.runtime import Runtime
from vnic.manager.service import Service
from vnic.model.launch import LaunchRequest
from vnic.model.network import NicSpec
from vnic.model.profile import parse_profile_document, values_to_document
from vnic.store.db import Database
from vnic.store.models import FleetStateRow, HostChangeRow, HostRow, SessionRow, VmRow

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
KERNEL = ["eth0: htb class 1:10 rate 20Mbit", "eth0: netem delay 5ms"]


class Clock:
    """The service's clock: still until a test moves it."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Fleet:
    svc: Service
    clock: Clock
    agent: Agent
    driver: FakeDriver

    def ready(self, name: str, vnics: int = 8, **labels: str) -> tuple[str, int]:
        """Add host ``name`` and register its agent; its token and epoch."""
        _, token = self.svc.add_host(name, labels)
        n = sum(map(ord, name)) % 200 + 2
        reg = self.svc.register_host(
            name,
            underlay=f"10.250.0.{n}",
            vnics=vnics,
            cpus=2,
            metrics_url=f"http://10.250.0.{n}:8472/metrics",
        )
        return token, reg.epoch

    def changes(self) -> list[tuple[int, str, str, str]]:
        """Every change row: (revision, host, session, vm)."""
        with self.svc.db.reading() as s:
            rows = s.execute(
                select(HostChangeRow, HostRow.name)
                .join(HostRow, HostRow.id == HostChangeRow.host_id)
                .order_by(HostChangeRow.revision)
            ).all()
            return [(c.revision, h, c.session, c.vm) for c, h in rows]

    def revision(self) -> int:
        with self.svc.db.reading() as s:
            return changelog.current_revision(s)


@pytest.fixture
def fleet(db: Database, tmp_path: Path) -> Fleet:
    clock = Clock()
    svc = Service(db, clock)
    svc.host_wait = 30.0  # a bound: every test that waits for a report gets one first
    driver = FakeDriver()
    agent = Agent(tmp_path / "agent", {"fake": driver}, default="fake")
    svc.create_session("lab")
    return Fleet(svc, clock, agent, driver)


@dataclass
class PlayAgent:
    """A thread playing host ``host``'s agent: it follows the change log from ``after``
    and reports every change (``error`` for VMs to run, when given, else ``lines``)."""

    svc: Service
    host: str
    epoch: int
    after: int = 0
    error: dict[str, Any] | None = None
    lines: Sequence[str] = tuple(KERNEL)
    seen: list[tuple[int, str, str, Any, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        after = self.after
        try:
            while not self.stop.is_set():
                after, found = self.svc.host_changes(self.host, after, wait=0.5)
                reports = [
                    StatusReport(
                        s,
                        v,
                        rev,
                        self.error if d is not None else None,
                        list(self.lines) if d is not None and self.error is None else [],
                    )
                    for rev, s, v, d, _ in found
                ]
                if reports:
                    self.seen.extend(found)
                    self.svc.report_status(self.host, self.epoch, reports)
        except BaseException as exc:  # the test sees it
            self.failure.append(exc)


@pytest.fixture
def play() -> Iterator[Any]:
    started: list[tuple[PlayAgent, threading.Thread]] = []

    def start(svc: Service, host: str, epoch: int, **kw: Any) -> PlayAgent:
        with svc.db.reading() as s:
            after = changelog.current_revision(s)
        player = PlayAgent(svc, host, epoch, after, **kw)
        thread = threading.Thread(target=player.run, daemon=True)
        thread.start()
        started.append((player, thread))
        return player

    yield start
    for player, thread in started:
        player.stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert not player.failure, player.failure


# ----------------------------------------------------------------------------- admins


def test_add_host_shows_its_token_once_and_stores_only_its_hash(fleet: Fleet) -> None:
    info, token = fleet.svc.add_host("hv1", {"rack": "a"})
    assert token.startswith("vnich_") and len(token) > 30
    assert (info.name, info.state, dict(info.labels), info.epoch) == (
        "hv1",
        "new",
        {"rack": "a"},
        0,
    )
    with fleet.svc.db.reading() as s:
        row = s.scalar(select(HostRow))
        assert row is not None and row.secret_hash == hash_secret(token)
        assert token not in (row.secret_hash, row.name, str(row.labels))
    assert "token" not in str(fleet.svc.get_host("hv1"))  # shown only by add_host
    assert fleet.svc.host_of_token(token) == "hv1"

    with pytest.raises(InvalidInput) as err:
        fleet.svc.add_host("hv1")
    assert err.value.paths == ["name"] and "not in use" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        fleet.svc.add_host("HV_2")
    assert err.value.paths == ["name"]
    with pytest.raises(InvalidInput) as err:
        fleet.svc.add_host("hv2", {"rack": "a b"})
    assert err.value.paths == ["labels.rack"]
    assert [h.name for h in fleet.svc.list_hosts()] == ["hv1"]  # the refused added nothing


def test_a_wrong_or_missing_host_token_is_unauthenticated(fleet: Fleet) -> None:
    _, token = fleet.svc.add_host("hv1")
    for wrong in (token + "x", "vnich_nope", "", None):
        with pytest.raises(Unauthenticated):
            fleet.svc.host_of_token(wrong)
    fleet.svc.remove_host("hv1")
    with pytest.raises(Unauthenticated, match="not known"):
        fleet.svc.host_of_token(token)


def test_registration_raises_the_epoch_and_the_lease_runs_by_the_clock(fleet: Fleet) -> None:
    svc, clock = fleet.svc, fleet.clock
    svc.add_host("hv1", {"rack": "a"})
    assert svc.get_host("hv1").state == "new"
    first = svc.register_host("hv1", underlay="10.250.0.11", vnics=16, cpus=4, labels={"gpu": "no"})
    assert (first.host, first.epoch, first.lease_seconds) == ("hv1", 1, svc.lease_seconds)
    info = svc.get_host("hv1")
    assert (info.state, info.epoch, info.underlay, info.vnics, info.cpus) == (
        "ready",
        1,
        "10.250.0.11",
        16,
        4,
    )
    assert dict(info.labels) == {"rack": "a", "gpu": "no"}  # the admin's kept, the agent's added
    assert info.lease_until == T0 + timedelta(seconds=svc.lease_seconds)

    clock.advance(svc.lease_seconds / 2)
    assert svc.renew_lease("hv1", 1) == svc.lease_seconds
    clock.advance(svc.lease_seconds * 0.9)
    assert svc.get_host("hv1").state == "ready"  # renewed: past the first lease, in the second
    second = svc.register_host("hv1", underlay="10.250.0.11", vnics=16, cpus=4)
    assert second.epoch == 2
    with pytest.raises(Stale) as stale:
        svc.renew_lease("hv1", 1)
    assert stale.value.to_dict()["stale"] is True and "epoch 1, its epoch is 2" in str(stale.value)

    clock.advance(svc.lease_seconds + 1)
    assert svc.get_host("hv1").state == "unknown"
    with pytest.raises(Stale, match="lease of host hv1 ran out"):
        svc.renew_lease("hv1", 2)
    assert svc.register_host("hv1", underlay="10.250.0.11", vnics=16, cpus=4).epoch == 3
    assert svc.get_host("hv1").state == "ready"


def test_a_bad_registration_names_the_field_and_changes_nothing(fleet: Fleet) -> None:
    svc = fleet.svc
    svc.add_host("hv1")
    good: dict[str, Any] = {"underlay": "10.250.0.11", "vnics": 8, "cpus": 2}
    for bad, path in (
        ({"underlay": "10.250.0"}, "underlay"),
        ({"vnics": 0}, "capacity.vnics"),
        ({"vnics": True}, "capacity.vnics"),
        ({"cpus": 5000}, "capacity.cpus"),
        ({"metrics_url": "ftp://x/metrics"}, "metrics_url"),
        ({"labels": {"Rack": "a"}}, "labels.Rack"),
    ):
        with pytest.raises(InvalidInput) as err:
            svc.register_host("hv1", **{**good, **bad})
        assert err.value.paths == [path]
    info = svc.get_host("hv1")
    assert (info.state, info.epoch, info.underlay) == ("new", 0, None)
    with pytest.raises(NotFound, match="known: hv1"):
        svc.register_host("hv9", **good)


def test_cordon_keeps_new_vms_off_a_host(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    fleet.ready("hv2")
    svc.host_wait = 0.05  # nobody reports here: the launches return desired
    assert svc.cordon_host("hv1").cordoned is True
    for name in ("a", "b"):
        svc.add_vm(VmRequest("lab", name))
        assert svc.launch_vm("lab", name, fleet.agent).vm.host == "hv2"
    svc.cordon_host("hv1", False)
    svc.add_vm(VmRequest("lab", "c"))
    assert svc.launch_vm("lab", "c", fleet.agent).vm.host == "hv1"
    with pytest.raises(NotFound):
        svc.cordon_host("hv9")


def test_remove_host_is_refused_while_a_running_vm_is_placed_there(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.host_wait = 0.05
    svc.add_vm(VmRequest("lab", "a"))
    svc.launch_vm("lab", "a", fleet.agent)
    with pytest.raises(InUse) as err:
        svc.remove_host("hv1")
    assert "lab/a" in str(err.value)
    assert [h.name for h in svc.list_hosts()] == ["hv1"]
    svc.destroy_vm("lab", "a", fleet.agent)
    svc.remove_host("hv1")
    assert svc.list_hosts() == [] and svc.get_vm("lab", "a").host is None
    assert fleet.changes() == []  # its changes went with it


def test_capacity_used_counts_the_vnics_of_running_vms(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1", vnics=3)
    svc.host_wait = 0.05
    svc.add_network("lab", "data")
    svc.add_vm(VmRequest("lab", "two", nics=[NicSpec("default"), NicSpec("data")]))
    svc.add_vm(VmRequest("lab", "one"))
    svc.add_vm(VmRequest("lab", "more"))
    assert svc.get_host("hv1").used == 0
    svc.launch_vm("lab", "two", fleet.agent)
    assert (svc.get_host("hv1").used, svc.get_host("hv1").vms) == (2, 1)
    svc.launch_vm("lab", "one", fleet.agent)
    assert svc.get_host("hv1").used == 3
    with pytest.raises(Conflict, match=r"hv1 full \(3 of 3 vNICs used, 1 more asked\)"):
        svc.launch_vm("lab", "more", fleet.agent)
    assert svc.get_vm("lab", "more").state == "defined" and svc.get_vm("lab", "more").host is None
    svc.destroy_vm("lab", "two", fleet.agent)
    assert (svc.get_host("hv1").used, svc.get_host("hv1").vms) == (1, 1)
    assert svc.launch_vm("lab", "more", fleet.agent).vm.host == "hv1"


def test_prometheus_targets_are_the_ready_hosts_with_metrics(fleet: Fleet) -> None:
    svc, clock = fleet.svc, fleet.clock
    svc.add_host("hv0")  # never registered
    svc.add_host("hv1", {"rack": "a", "zone.x": "eu"})
    svc.register_host(
        "hv1", underlay="10.0.0.1", vnics=8, cpus=2, metrics_url="http://10.0.0.1:8472/metrics"
    )
    svc.add_host("hv2")
    svc.register_host("hv2", underlay="10.0.0.2", vnics=8, cpus=2)  # serves no metrics
    assert svc.prometheus_targets() == [
        {
            "targets": ["10.0.0.1:8472"],
            "labels": {
                "host": "hv1",
                "__metrics_path__": "/metrics",
                "label_rack": "a",
                "label_zone_x": "eu",
            },
        }
    ]
    clock.advance(svc.lease_seconds + 1)
    assert svc.prometheus_targets() == []  # unknown: not scraped


# ----------------------------------------------------------------------------- the change log


def test_a_launch_places_the_vm_and_writes_one_change(fleet: Fleet, play: Any) -> None:
    svc = fleet.svc
    _, epoch = fleet.ready("hv1")
    fleet.ready("hv2")
    hv1 = play(svc, "hv1", epoch)
    svc.add_vm(VmRequest("lab", "a"))
    before = fleet.revision()
    result = svc.launch_vm("lab", "a", fleet.agent, host="hv1")
    assert result.vm.host == "hv1" and result.vm.state == "running"
    assert fleet.changes() == [(before + 1, "hv1", "lab", "a")]
    assert fleet.revision() == before + 1
    assert hv1.seen and hv1.seen[0][:3] == (before + 1, "lab", "a")
    assert svc.vm_status("lab", "a").changes == KERNEL  # type: ignore[union-attr]
    assert fleet.driver.vms == {}  # the manager's own agent ran nothing

    revision, epoch_now, vms, _ = svc.host_snapshot("hv1")
    assert (revision, epoch_now) == (before + 1, 1)
    ((session, vm, desired),) = vms
    assert (session, vm) == ("lab", "a") and desired is not None
    kind, request = desired
    assert kind == "netns" and isinstance(request, LaunchRequest)
    assert (request.session, request.vm, str(request.mac)) == ("lab", "a", result.vm.mac)
    assert svc.host_snapshot("hv2")[2] == []

    rev, found = svc.host_changes("hv1", before)
    ((crev, cs, cv, cdesired, _),) = found
    assert (rev, crev, cs, cv) == (before + 1, before + 1, "lab", "a")
    assert cdesired is not None and cdesired[1] == request
    assert svc.host_changes("hv2", before) == (before, [])
    assert svc.host_changes("hv1", rev) == (rev, [])

    svc.destroy_vm("lab", "a", fleet.agent)  # waits for hv1's report of the stop
    _, found = svc.host_changes("hv1", rev)
    assert [(r, s, v, d) for r, s, v, d, _ in found] == [(rev + 1, "lab", "a", None)]
    assert svc.vm_status("lab", "a").revision == rev + 1  # type: ignore[union-attr]
    assert svc.host_snapshot("hv1")[2] == []
    assert svc.get_vm("lab", "a").host == "hv1"  # stays assigned until launched again


def test_the_change_is_in_the_same_transaction_as_the_launch(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.add_vm(VmRequest("lab", "a"))
    real = changelog.append
    seen: list[tuple[str, int | None]] = []

    def failing(s: Any, host_id: int, session: str, vm: str, now: datetime) -> int:
        # Inside the launch's transaction the VM is already running on hv1 (flushed) ...
        row = s.scalar(select(VmRow).where(VmRow.name == vm))
        seen.append((row.state, row.host_id))
        real(s, host_id, session, vm, now)
        raise RuntimeError("the database went away mid-launch")

    monkeypatch.setattr(changelog, "append", failing)
    with pytest.raises(RuntimeError):
        svc.launch_vm("lab", "a", fleet.agent)
    assert seen and seen[0][0] == "running" and seen[0][1] is not None
    # ... and the failure undid both: not running, not placed, no change, no revision.
    vm = svc.get_vm("lab", "a")
    assert (vm.state, vm.host) == ("defined", None)
    assert fleet.changes() == [] and fleet.revision() == 0


def test_a_watcher_behind_the_pruned_log_must_relist(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.host_wait = 0.05
    for name in ("a", "b", "c"):
        svc.add_vm(VmRequest("lab", name))
        svc.launch_vm("lab", name, fleet.agent)
    assert [r for r, *_ in fleet.changes()] == [1, 2, 3]
    with svc.db.transaction() as s:
        assert changelog.prune(s, keep=1) == 2
    assert [r for r, *_ in fleet.changes()] == [3]
    for behind in (0, 1):
        with pytest.raises(Relist) as err:
            svc.host_changes("hv1", behind)
        assert err.value.to_dict()["relist"] is True and err.value.http_status == 410
    rev, found = svc.host_changes("hv1", 2)  # the floor itself is still served
    assert rev == 3 and [(r, v) for r, _, v, _, _ in found] == [(3, "c")]
    with pytest.raises(InvalidInput) as bad:
        svc.host_changes("hv1", -1)
    assert bad.value.paths == ["after"]


def test_a_long_poll_returns_when_another_thread_appends(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.host_wait = 0.05
    svc.add_vm(VmRequest("lab", "a"))
    got: list[Any] = []
    polling = threading.Event()

    def poll() -> None:
        polling.set()
        got.append(svc.host_changes("hv1", 0, wait=changelog.WAIT_MAX))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    assert polling.wait(10)
    svc.launch_vm("lab", "a", fleet.agent)
    # A bound far past a wake-up and well short of the poll's own WAIT_MAX seconds.
    thread.join(timeout=changelog.WAIT_MAX / 2)
    assert not thread.is_alive()
    ((rev, found),) = got
    assert rev == 1 and [(r, v) for r, _, v, _, _ in found] == [(1, "a")]


def test_a_poll_with_nothing_new_returns_its_revision_after_the_wait(fleet: Fleet) -> None:
    fleet.ready("hv1")
    assert fleet.svc.host_changes("hv1", 0, wait=0.05) == (0, [])


# ----------------------------------------------------------------------------- reports


def test_reports_are_fenced_by_epoch_and_lease_and_kept_in_order(fleet: Fleet) -> None:
    svc, clock = fleet.svc, fleet.clock
    _, epoch = fleet.ready("hv1")
    _, other = fleet.ready("hv2")
    svc.host_wait = 0.05
    svc.add_vm(VmRequest("lab", "a"))
    svc.launch_vm("lab", "a", fleet.agent, host="hv1")
    assert svc.vm_status("lab", "a") is None
    assert svc.report_status("hv1", epoch, [StatusReport("lab", "a", 5, None, ["x"])]) == 1
    # An older revision does not overwrite a newer one.
    assert svc.report_status("hv1", epoch, [StatusReport("lab", "a", 3, None, ["old"])]) == 0
    status = svc.vm_status("lab", "a")
    assert status is not None and (status.host, status.revision, status.changes) == (
        "hv1",
        5,
        ["x"],
    )
    # Another host's report of this VM, and one of a VM that does not exist, are ignored.
    assert svc.report_status("hv2", other, [StatusReport("lab", "a", 9, None, ["no"])]) == 0
    assert svc.report_status("hv1", epoch, [StatusReport("lab", "zz", 9)]) == 0
    assert svc.vm_status("lab", "a").revision == 5  # type: ignore[union-attr]
    with pytest.raises(Stale):
        svc.report_status("hv1", epoch + 1, [StatusReport("lab", "a", 6)])
    clock.advance(svc.lease_seconds + 1)
    with pytest.raises(Stale, match="lease"):
        svc.report_status("hv1", epoch, [StatusReport("lab", "a", 6)])
    assert svc.vm_status("lab", "a").revision == 5  # type: ignore[union-attr]


def test_a_launch_returns_once_the_agent_reports_it_ran(fleet: Fleet, play: Any) -> None:
    svc = fleet.svc
    _, epoch = fleet.ready("hv1")
    agent = play(svc, "hv1", epoch)
    svc.add_vm(VmRequest("lab", "a"))
    result = svc.launch_vm("lab", "a", fleet.agent)
    assert (result.vm.state, result.vm.host) == ("running", "hv1")
    status = svc.vm_status("lab", "a")
    assert status is not None and status.error is None and status.changes == KERNEL
    assert [(s, v) for _, s, v, _, _ in agent.seen] == [("lab", "a")]


def test_a_failure_the_agent_reports_undoes_the_launch(fleet: Fleet, play: Any) -> None:
    svc = fleet.svc
    _, epoch = fleet.ready("hv1")
    error = {
        "kind": "invalid",
        "message": "egress.delay: got '5ms'; expected a kernel with netem",
        "fields": [{"field": "egress.delay", "value": "'5ms'", "expected": "a kernel with netem"}],
    }
    # As the API stores it (api/hosts.py _report): "kind" becomes the body's "error".
    from vnic.api.hosts import _report

    stored = _report({"session": "lab", "vm": "a", "revision": 0, "error": error}, "r").error
    agent = play(svc, "hv1", epoch, error=stored)
    svc.add_vm(VmRequest("lab", "a"))
    with pytest.raises(InvalidInput) as err:
        svc.launch_vm("lab", "a", fleet.agent)
    assert err.value.paths == ["egress.delay"] and "netem" in str(err.value)
    vm = svc.get_vm("lab", "a")
    assert vm.state == "defined"
    # The host was told to stop it again (desired None), after the launch's change.
    assert [(r, v) for r, _, v, _, _ in fleet.svc.host_changes("hv1", 0)[1]] == [(1, "a"), (2, "a")]
    assert fleet.svc.host_changes("hv1", 1)[1][0][3] is None
    assert agent.seen[0][3] is not None

    # add_and_launch: the new VM is not kept.
    with pytest.raises(InvalidInput):
        svc.add_and_launch(VmRequest("lab", "b"), fleet.agent)
    assert [v.name for v in svc.list_vms("lab")] == ["a"]


def test_no_report_in_time_leaves_the_vm_desired(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.host_wait = 0.1
    svc.add_vm(VmRequest("lab", "a"))
    result = svc.launch_vm("lab", "a", fleet.agent)
    assert (result.vm.state, result.vm.host) == ("running", "hv1")
    assert svc.vm_status("lab", "a") is None
    assert [v for _, v, _ in svc.host_snapshot("hv1")[2]] == ["a"]  # its agent runs it later


def test_a_live_change_of_a_hosted_vm_goes_through_its_host(fleet: Fleet, play: Any) -> None:
    svc = fleet.svc
    _, epoch = fleet.ready("hv1")
    lines = ["eth0: htb class 1:10 rate 2Mbit"]
    agent = play(svc, "hv1", epoch, lines=lines)
    svc.add_vm(VmRequest("lab", "a"))
    svc.launch_vm("lab", "a", fleet.agent)
    before = fleet.revision()
    result, changes = svc.update_vm_live(
        "lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}}, fleet.agent
    )
    assert result.vm.host == "hv1" and result.vm.override_patch == {"egress": {"rate": "2Mbit"}}
    assert [c.kernel for c in changes] == [lines] and not any(c.error for c in changes)
    assert "egress.rate" in changes[0].fields
    assert fleet.changes()[-1] == (before + 1, "hv1", "lab", "a")
    desired = svc.host_snapshot("hv1")[2][0][2]
    assert desired is not None and str(desired[1].nics[0].profile.egress.rate) == "2Mbit"
    # Nothing left to apply: what the host reported is what runs now.
    assert svc.reapply(fleet.agent, session="lab") == []
    assert len(agent.seen) == 2  # the launch, the live change
    assert fleet.driver.vms == {}


def test_a_live_change_no_host_reports_is_an_error_and_stays_desired(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.host_wait = 0.1
    svc.add_vm(VmRequest("lab", "a"))
    svc.launch_vm("lab", "a", fleet.agent)
    (change,) = svc.reapply(fleet.agent, session="lab") or [None]  # nothing to change yet
    assert change is None
    svc.update_vm("lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}})
    (change,) = svc.reapply(fleet.agent, session="lab")
    assert change.error and "no report from the VM's host" in change.error
    desired = svc.host_snapshot("hv1")[2][0][2]
    assert desired is not None and str(desired[1].nics[0].profile.egress.rate) == "2Mbit"


def test_session_down_tells_every_host_to_stop_its_vms(fleet: Fleet, play: Any) -> None:
    svc = fleet.svc
    _, e1 = fleet.ready("hv1")
    _, e2 = fleet.ready("hv2")
    one, two = play(svc, "hv1", e1), play(svc, "hv2", e2)
    for name in ("a", "b", "c"):
        svc.add_vm(VmRequest("lab", name))
        svc.launch_vm("lab", name, fleet.agent)
    placed = {v.name: v.host for v in svc.list_vms("lab")}
    assert set(placed.values()) == {"hv1", "hv2"}  # spread
    before = fleet.revision()
    assert sorted(svc.session_down("lab", fleet.agent)) == ["a", "b", "c"]
    after = [(h, v) for r, h, _, v in fleet.changes() if r > before]
    assert sorted(x for x in after if x[1]) == sorted((h, v) for v, h in placed.items())
    # The session spanned both hosts: each also gets a change of its overlays (none now).
    assert sorted(x for x in after if not x[1]) == [("hv1", ""), ("hv2", "")]
    for host in ("hv1", "hv2"):
        _, found = svc.host_changes(host, before)
        assert found and all(d is None for *_, d, _ in found)
        assert svc.host_snapshot(host)[2] == []
    assert {v.state for v in svc.list_vms("lab")} == {"defined"}
    assert all(seen[3] is None for seen in one.seen[-1:] + two.seen[-1:])


def test_with_no_hosts_everything_runs_on_the_own_agent(fleet: Fleet) -> None:
    svc = fleet.svc
    svc.add_vm(VmRequest("lab", "a"))
    result = svc.launch_vm("lab", "a", fleet.agent)
    assert (result.vm.state, result.vm.host) == ("running", None)
    assert ("lab", "a") in fleet.driver.vms
    svc.update_vm_live("lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}}, fleet.agent)
    svc.destroy_vm("lab", "a", fleet.agent)
    svc.launch_vm("lab", "a", fleet.agent)
    svc.session_down("lab", fleet.agent)
    assert fleet.driver.vms == {}
    assert fleet.changes() == [] and fleet.revision() == 0
    with pytest.raises(NotFound, match="host 'hv1' does not exist"):
        svc.launch_vm("lab", "a", fleet.agent, host="hv1")


def test_a_session_placement_constraint_packs_and_filters(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1", rack="a")
    fleet.ready("hv2", rack="a")
    fleet.ready("hv3", rack="b")
    svc.host_wait = 0.05
    with svc.db.transaction() as s:  # no API sets a session's placement yet
        s.execute(
            update(SessionRow).values(placement={"strategy": "pack", "labels": {"rack": "a"}})
        )
    for name in ("a", "b", "c"):
        svc.add_vm(VmRequest("lab", name))
        svc.launch_vm("lab", name, fleet.agent)
    assert {v.host for v in svc.list_vms("lab")} == {"hv1"}


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_db(pg_server: Any) -> Iterator[Database]:
    database = Database(new_pg_url(pg_server))
    try:
        yield database
    finally:
        database.dispose()


def test_concurrent_appenders_commit_revisions_in_order(pg_db: Database) -> None:
    """Two writers, each in its own transaction: the second blocks on the fleet_state row
    until the first commits, so a reader never sees revision N+1 without N."""
    svc = Service(pg_db)
    svc.add_host("hv1")
    with pg_db.reading() as s:
        host_id = s.scalar(select(HostRow.id))
    first_appended, release = threading.Event(), threading.Event()
    got: dict[str, int] = {}
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with pg_db.transaction() as s:
                got["first"] = changelog.append(s, host_id, "lab", "a", T0)
                first_appended.set()
                assert release.wait(60)
        except BaseException as exc:
            errors.append(exc)

    def second() -> None:
        try:
            with pg_db.transaction() as s:
                got["second"] = changelog.append(s, host_id, "lab", "b", T0)
        except BaseException as exc:
            errors.append(exc)

    t1 = threading.Thread(target=first, daemon=True)
    t1.start()
    assert first_appended.wait(30)
    t2 = threading.Thread(target=second, daemon=True)
    t2.start()
    # Readiness: the second writer waits on a lock (PostgreSQL says so), not a guess.
    with pg_db.engine.connect() as conn:
        for _ in range(600):
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ).scalar()
            conn.rollback()  # pg_stat_activity is a snapshot per transaction
            if waiting or "second" in got:
                break
            threading.Event().wait(0.05)
        assert waiting == 1
    assert "second" not in got
    with pg_db.reading() as s:  # nothing is visible yet: not N, not N+1
        assert changelog.changes_after(s, host_id, 0) == []
    release.set()
    t1.join(30)
    t2.join(30)
    assert not errors, errors
    assert (got["first"], got["second"]) == (1, 2)
    with pg_db.reading() as s:
        assert [(c.revision, c.vm) for c in changelog.changes_after(s, host_id, 0)] == [
            (1, "a"),
            (2, "b"),
        ]
        assert s.scalar(select(FleetStateRow.revision)) == 2
        assert s.scalar(select(func.count()).select_from(HostChangeRow)) == 2


def test_removing_a_vm_still_running_on_a_host_tells_its_host(fleet: Fleet) -> None:
    svc = fleet.svc
    fleet.ready("hv1")
    svc.host_wait = 0.05
    svc.create_session("lab2")
    for session, name in (("lab", "a"), ("lab", "b"), ("lab2", "c"), ("lab2", "d")):
        svc.add_vm(VmRequest(session, name))
    for session, name in (("lab", "a"), ("lab2", "c"), ("lab2", "d")):
        svc.launch_vm(session, name, fleet.agent)
    before = fleet.revision()
    svc.remove_vm("lab", "a")  # `vnic vm remove` of a running VM: no stop first
    svc.remove_vm("lab", "b")  # never launched: nothing to tell
    svc.delete_session("lab2", force=True)
    _, found = svc.host_changes("hv1", before)
    assert [(r, s, v, d) for r, s, v, d, _ in found] == [
        (before + 1, "lab", "a", None),
        (before + 2, "lab2", "c", None),
        (before + 3, "lab2", "d", None),
    ]
    assert svc.host_snapshot("hv1")[2] == []


def test_a_write_waiting_for_a_hosts_report_lets_the_own_agents_gate_go(fleet: Fleet) -> None:
    """A launch and a live change of a hosted VM wait for their host's report without
    holding the gate of the manager's own agent: a reconcile of that agent (exclusive; a
    replica starting) gets it while they wait, not after (issue #18's restart time)."""
    svc = fleet.svc
    _, epoch = fleet.ready("hv1")
    svc.add_vm(VmRequest("lab", "a"))

    def acquired_while_waiting(write: Any) -> None:
        before = fleet.revision()
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(write()), daemon=True)
        thread.start()
        try:
            deadline = threading.Event()
            while fleet.revision() == before and thread.is_alive():
                deadline.wait(0.01)  # the write is in its wait once its change is logged
            with fleet.agent.gate().exclusive():
                assert thread.is_alive() and not done  # still waiting for the report
        finally:
            _, found = svc.host_changes("hv1", before)
            reports = [StatusReport(s, v, r, None, ["ok"]) for r, s, v, _, _ in found]
            svc.report_status("hv1", epoch, reports)
            thread.join(timeout=60)
        assert done and not thread.is_alive()

    acquired_while_waiting(lambda: svc.launch_vm("lab", "a", fleet.agent))
    assert svc.get_vm("lab", "a").state == "running"
    acquired_while_waiting(
        lambda: svc.update_vm_live(
            "lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}}, fleet.agent
        )
    )
    acquired_while_waiting(lambda: svc.session_down("lab", fleet.agent))
    assert svc.get_vm("lab", "a").state == "defined"


def test_every_write_a_live_change_follows_logs_its_hosted_vms_in_its_own_transaction(
    fleet: Fleet, play: Any
) -> None:
    """A profile, a session's policy, a VM's override and a runtime adjustment (set and
    cleared) each log a change for the hosted VMs they reach in the write's own
    transaction; the live change after it waits for that row's report (its kernel lines
    are the answer) instead of logging a second one."""
    svc = fleet.svc
    runtime = Runtime(svc)
    _, epoch = fleet.ready("hv1")
    lines = ["eth0: htb class 1:10 rate changed"]
    agent = play(svc, "hv1", epoch, lines=lines)
    svc.apply_profiles([parse_profile_document({"name": "p", "egress": {"rate": "10Mbit"}})])
    for name in ("a", "b"):
        svc.add_vm(VmRequest("lab", name))
        svc.launch_vm("lab", name, fleet.agent)

    def logged_by(write: Any, vms: set[str]) -> None:
        before = fleet.revision()
        write()  # the write alone, no live change yet
        assert {(h, s, v) for r, h, s, v in fleet.changes() if r > before} == {
            ("hv1", "lab", vm) for vm in vms
        }
        logged = fleet.revision()
        changes = svc.reapply(fleet.agent, session="lab")
        assert fleet.revision() == logged  # waited for the write's rows, logged none
        assert {c.vm for c in changes} == vms and all(c.kernel == lines for c in changes)
        assert svc.reapply(fleet.agent, session="lab") == []

    logged_by(lambda: svc.update_session("lab", {"default_profile": "p"}), {"a", "b"})
    logged_by(
        lambda: svc.apply_profiles(
            [parse_profile_document({"name": "p", "egress": {"rate": "20Mbit"}})]
        ),
        {"a", "b"},
    )
    logged_by(lambda: svc.update_vm("lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}}), {"a"})
    logged_by(
        lambda: runtime.adjust("lab", "b", source="user", reason="t", values=_rate("3Mbit")),
        {"b"},
    )
    logged_by(lambda: runtime.clear("lab", "b", "user"), {"b"})
    # A refused write logs nothing; one that changes nothing effective logs nothing.
    before = fleet.revision()
    with pytest.raises(InvalidInput):
        svc.update_vm("lab", "a", {"patch": {"egress": {"rate": "fast"}}})
    svc.update_session("lab", {"owner": "alice"})
    assert fleet.revision() == before
    # A write that logs none (its rows lost, as from a release before this one): the
    # live change logs it itself.
    with svc.db.transaction() as s:
        svc._vm_row(s, "lab", "a").nics[0].override_patch = values_to_document(_rate("5Mbit"))
    (change,) = svc.reapply(fleet.agent, session="lab")
    assert change.vm == "a" and change.kernel == lines and fleet.revision() == before + 1
    assert len(agent.seen) == 2 + 2 + 2 + 1 + 1 + 1 + 1  # launches, writes, the last


def _rate(text: str) -> dict[str, Any]:
    return dict(parse_profile_document({"name": "x", "egress": {"rate": text}}).values)


def test_a_live_change_its_agent_reported_as_failed_is_tried_again(fleet: Fleet, play: Any) -> None:
    svc = fleet.svc
    _, epoch = fleet.ready("hv1")
    agent = play(svc, "hv1", epoch)
    svc.add_vm(VmRequest("lab", "a"))
    svc.launch_vm("lab", "a", fleet.agent)
    agent.error = {"error": "dataplane", "message": "tc refused it"}
    svc.update_vm("lab", "a", {"patch": {"egress": {"rate": "2Mbit"}}})
    (change,) = svc.reapply(fleet.agent, session="lab")
    # (A fast agent may have reported the failure before the live change looked: then
    # that live change tried it once more already, and failed the same.)
    assert change.error and "tc refused it" in change.error
    failed = fleet.revision()
    agent.error = None
    (change,) = svc.reapply(fleet.agent, session="lab")  # not the stored error again
    assert change.error is None and change.kernel == KERNEL
    assert fleet.revision() == failed + 1
    assert svc.reapply(fleet.agent, session="lab") == []
