"""The agent following its manager (list, then watch) against an in-memory source and the
fake driver: snapshot, changes applied idempotently, live changes, relist, fencing, the
lease by the agent's own clock, one VM's error kept to it, bounded backoff."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from vnic.agent.core import Agent
from vnic.agent.follow import BACKOFF_CAP, REFUSED_CAP, Backoff, Follower, jitter
from vnic.agent.port import DesiredVm, VmKey
from vnic.agent.upstream import (
    Change,
    Fenced,
    HostInfo,
    Refused,
    Registration,
    Relist,
    Snapshot,
    Unreachable,
    VmStatus,
)
from vnic.drivers.fake import FakeDriver, FakeOverlays
from vnic.errors import InvalidInput
from vnic.model.launch import LaunchRequest
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan.overlay import Overlay

INFO = HostInfo("hv1", "10.250.0.11", vnics=64, cpus=2, labels={"rack": "a"})


def request(vm: str, rate: str = "20Mbit", session: str = "lab") -> LaunchRequest:
    eff = complete([Layer("vm-patch", "", parse_assignments([f"egress.rate={rate}"]))])
    n = sum(map(ord, vm)) % 200 + 2
    return LaunchRequest.single(
        session=session,
        network_id=7,
        vm=vm,
        mac=MacAddress.parse(f"02:00:00:00:00:{n:02x}"),
        ipv4=ipaddress.IPv4Interface(f"10.0.7.{n}/24"),
        ipv6=ipaddress.IPv6Interface(f"fd76:6e00:7::{n:x}/64"),
        profile=build_profile(eff.values),
        values=dict(eff.values),
        revisions={"p": 1},
    )


def desired(vm: str, rate: str = "20Mbit", session: str = "lab") -> DesiredVm:
    return DesiredVm("fake", request(vm, rate, session))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """The manager's side in memory: a host's desired VMs, a change log, epochs, leases.

    ``calls`` records every call by name, in order; ``fail`` holds one exception to
    raise at the next call of a method; ``during_changes`` runs inside a long poll."""

    def __init__(self, clock: Clock, lease: float = 10.0) -> None:
        self.clock = clock
        self.lease = lease
        self.epoch = 0
        self.revision = 0
        self.vms: dict[VmKey, DesiredVm] = {}
        self.log: list[Change] = []
        self.oldest = 0  # a watch after a revision below this: 410
        self.reports: list[tuple[int, list[VmStatus]]] = []
        self.calls: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.during_changes: Callable[[], None] | None = None
        self.down = False  # every call fails as a manager that does not answer
        self.invalid: dict[VmKey, InvalidInput] = {}  # snapshot documents that did not parse
        self.overlays: dict[str, list[Overlay]] = {}
        self.overlay_errors: dict[str, InvalidInput] = {}

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise Unreachable("connection refused")
        if name in self.fail:
            raise self.fail.pop(name)

    # What the manager's user does.

    def put(self, vm: DesiredVm) -> None:
        self.revision += 1
        self.vms[vm.key] = vm
        self.log.append(Change(self.revision, *vm.key, vm))

    def put_overlays(self, session: str, overlays: list[Overlay]) -> None:
        self.revision += 1
        if overlays:
            self.overlays[session] = overlays
        else:
            self.overlays.pop(session, None)
        self.log.append(Change(self.revision, session, "", None, overlays=list(overlays)))

    def delete(self, session: str, vm: str) -> None:
        self.revision += 1
        self.vms.pop((session, vm), None)
        self.log.append(Change(self.revision, session, vm, None))

    # The DesiredSource protocol.

    def register(self, info: HostInfo) -> Registration:
        self._enter("register")
        self.epoch += 1
        return Registration(info.host, self.epoch, self.lease, self.revision)

    def renew(self, epoch: int) -> float:
        self._enter("renew")
        if epoch != self.epoch:
            raise Fenced(f"epoch {epoch} is not {self.epoch}")
        return self.lease

    def snapshot(self) -> Snapshot:
        self._enter("snapshot")
        vms = [v for k, v in self.vms.items() if k not in self.invalid]
        return Snapshot(
            self.revision,
            vms,
            dict(self.invalid),
            epoch=self.epoch,
            overlays=dict(self.overlays),
            overlay_errors=dict(self.overlay_errors),
        )

    def changes(self, after: int, wait: float) -> tuple[int, list[Change]]:
        self._enter("changes")
        if after < self.oldest:
            raise Relist(f"revision {after} is older than {self.oldest}")
        if self.during_changes is not None:
            self.during_changes()
        return self.revision, [c for c in self.log if c.revision > after]

    def report(self, epoch: int, statuses: list[VmStatus]) -> None:
        self._enter("report")
        if epoch != self.epoch:
            raise Fenced(f"epoch {epoch} is not {self.epoch}")
        self.reports.append((epoch, list(statuses)))

    def last_statuses(self) -> dict[str, VmStatus]:
        return {f"{s.session}/{s.vm}": s for s in self.reports[-1][1]}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(clock: Clock) -> FakeSource:
    return FakeSource(clock)


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver(fail_on=["bad"])


@pytest.fixture
def follower(tmp_path: Path, source: FakeSource, driver: FakeDriver, clock: Clock) -> Follower:
    agent = Agent(tmp_path / "agent", {"fake": driver}, default="fake")
    return Follower(agent, source, INFO, resync=60.0, clock=clock, spread=lambda: 1.0)


def test_the_snapshot_is_applied_and_every_vm_reported(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    source.put(desired("a"))
    source.put(desired("b", session="other"))
    # Something nobody desires any more, in a session this agent owns: removed.
    follower.agent.launch(request("stale"), "fake")
    assert follower.turn() == 0.0
    assert source.calls == ["register", "snapshot", "report"]
    assert set(driver.vms) == {("lab", "a"), ("other", "b")}
    assert driver.vms[("lab", "a")] == request("a")
    statuses = source.last_statuses()
    assert set(statuses) == {"lab/a", "other/b", "lab/stale"}
    assert statuses["lab/a"].error is None and statuses["lab/a"].revision == 2
    assert statuses["lab/stale"].changes == ["removed"]
    assert follower.revision == 2 and source.reports[-1][0] == 1


def test_changes_launch_reconfigure_live_and_destroy(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    follower.turn()
    source.put(desired("a"))
    follower.turn()
    assert source.calls[-2:] == ["changes", "report"]
    assert driver.vms[("lab", "a")] == request("a")
    assert source.last_statuses()["lab/a"].changes == ["launched on the fake driver"]

    source.put(desired("a", "5Mbit"))
    follower.turn()
    assert str(driver.vms[("lab", "a")].profile.egress.rate) == "5Mbit"
    assert driver.launches == 1  # changed in place, not rebuilt
    assert "egress.rate changed" in source.last_statuses()["lab/a"].changes

    source.delete("lab", "a")
    follower.turn()
    assert driver.vms == {} and follower.agent.desired() == []
    assert source.last_statuses()["lab/a"].changes == [
        "removed from the fake driver",
        "removed session lab",
    ]
    assert "lab" not in follower.agent.state.owned_sessions()
    assert follower.revision == source.revision


def test_a_duplicate_change_does_no_harm(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    follower.turn()
    source.put(desired("a"))
    source.log.append(source.log[-1])  # delivered twice (at least once)
    follower.turn()
    first, again = source.reports[-1][1]
    assert first.changes == ["launched on the fake driver"] and first.error is None
    assert again.changes == [] and again.error is None
    # And once more from an older revision, as after a reconnect that resumes.
    follower.revision = 0
    follower.turn()
    assert driver.launches == 1
    assert all(s.error is None and s.changes == [] for s in source.reports[-1][1])


def test_one_vms_error_is_its_status_and_the_others_are_applied(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    follower.turn()
    source.put(desired("bad"))
    source.put(desired("good"))
    source.revision += 1  # a document that did not parse, as the HTTP source hands it on
    error = InvalidInput.one("request.nics[0].mac", "zz", "a MAC address")
    source.log.append(Change(source.revision, "lab", "broken", None, error))
    follower.turn()
    statuses = source.last_statuses()
    assert statuses["lab/bad"].error is not None
    assert statuses["lab/bad"].error["kind"] == "dataplane"
    assert "fails on purpose" in statuses["lab/bad"].error["message"]
    assert statuses["lab/broken"].error == {
        "kind": "invalid",
        "message": str(error),
        "fields": [{"field": "request.nics[0].mac", "value": "'zz'", "expected": "a MAC address"}],
    }
    assert statuses["lab/good"].error is None
    assert set(driver.vms) == {("lab", "good")}  # the failed launch left nothing
    assert follower.revision == source.revision


def test_410_relists_and_the_snapshot_wins(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    source.put(desired("a"))
    follower.turn()
    # Changes the agent never sees: the log was trimmed past its revision.
    source.delete("lab", "a")
    source.put(desired("b"))
    source.put(desired("c", "5Mbit"))
    source.oldest = source.revision
    assert follower.turn() == 0.0  # the first relist is at once
    assert source.calls[-1] == "changes"
    follower.turn()
    assert source.calls[-2:] == ["snapshot", "report"]
    assert set(driver.vms) == {("lab", "b"), ("lab", "c")}
    assert follower.revision == source.revision


def test_a_full_reconcile_changes_a_running_vm_live(
    follower: Follower, source: FakeSource, driver: FakeDriver, clock: Clock
) -> None:
    source.put(desired("a"))
    follower.turn()
    # A profile change missed (say, while disconnected), then the periodic full reconcile.
    source.vms[("lab", "a")] = desired("a", "5Mbit")
    clock.now += 61
    source.renew(source.epoch)  # the lease thread kept the lease meanwhile
    follower.renew_once()
    follower.turn()
    assert source.calls[-2:] == ["snapshot", "report"]
    assert str(driver.vms[("lab", "a")].profile.egress.rate) == "5Mbit"
    assert driver.launches == 1
    assert "egress.rate changed" in source.last_statuses()["lab/a"].changes


def test_fenced_lease_registers_again_before_the_next_apply(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    follower.turn()
    assert follower.registration is not None and follower.registration.epoch == 1
    source.epoch += 1  # another registration took the host (epoch 2)
    source.put(desired("a"))
    follower.renew_once()
    # The lease thread registered again at once (epoch 3), before anything was applied.
    assert source.calls[-2:] == ["renew", "register"]
    assert follower.registration.epoch == 3 and driver.vms == {}
    follower.turn()
    assert source.calls[-2:] == ["snapshot", "report"]  # a relist, not the watch
    assert set(driver.vms) == {("lab", "a")}
    assert source.reports[-1][0] == 3


def test_a_status_refused_as_stale_fences_and_relists(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    follower.turn()
    source.put(desired("a"))
    source.epoch += 1  # the manager moved on while the agent watched
    follower.turn()  # applied, but its status is refused
    assert source.calls[-2:] == ["changes", "report"] and source.reports[-1][1] == []
    source.put(desired("b"))
    follower.turn()
    calls = source.calls[-3:]
    assert calls == ["register", "snapshot", "report"]
    assert set(source.last_statuses()) == {"lab/a", "lab/b"}


def test_a_lease_run_out_by_the_clock_registers_and_relists_before_acting(
    follower: Follower, source: FakeSource, driver: FakeDriver, clock: Clock
) -> None:
    follower.turn()
    source.put(desired("a"))

    def paused() -> None:
        clock.now += 11  # SIGSTOP during the long poll, past the 10 s lease

    source.during_changes = paused
    follower.turn()
    source.during_changes = None
    # What the long poll brought was not applied under the lapsed lease.
    assert driver.vms == {} and source.calls[-1] == "changes"
    assert follower.revision == 0
    follower.turn()
    assert source.calls[-3:] == ["register", "snapshot", "report"]
    assert set(driver.vms) == {("lab", "a")}
    assert follower.registration is not None and follower.registration.epoch == 2


def test_the_lease_is_renewed_and_its_time_counts_from_the_request(
    follower: Follower, source: FakeSource, clock: Clock
) -> None:
    assert follower.renew_once() == 0.5  # nothing to renew before the first registration
    follower.turn()
    clock.now += 9
    assert follower.renew_once() == pytest.approx(10 / 3)
    clock.now += 9  # 18 s after the registration, 9 after the renewal
    follower.turn()
    assert source.calls.count("register") == 1
    source.fail["renew"] = Unreachable("no route")
    assert follower.renew_once() == 0.2  # tried again soon, backing off
    source.fail["renew"] = Unreachable("no route")
    assert follower.renew_once() == 0.4
    clock.now += 2  # and now the lease lapsed: the lease thread registers again
    assert follower.renew_once() == pytest.approx(10 / 3)
    assert source.calls[-1] == "register"


def test_every_wait_between_calls_is_spread_so_a_fleet_does_not_call_in_step(
    follower: Follower, source: FakeSource
) -> None:
    factors = iter([0.75, 0.8])
    follower.spread = lambda: next(factors)
    follower.turn()
    assert follower.renew_once() == pytest.approx(10 / 3 * 0.75)
    source.fail["renew"] = Unreachable("no route")
    assert follower.renew_once() == pytest.approx(0.2 * 0.8)
    draws = [jitter() for _ in range(2000)]
    assert 0.75 <= min(draws) < 0.8 and 0.95 < max(draws) <= 1.0


def test_no_answer_backs_off_bounded_then_relists(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    follower.turn()
    source.down = True
    delays = [follower.turn() for _ in range(8)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]
    # The first failure was the watch; every retry after it was a relist, not a watch.
    assert source.calls[3:] == ["changes"] + ["snapshot"] * 7
    source.down = False
    source.put(desired("a"))
    assert follower.turn() == 0.0
    assert source.calls[-2:] == ["snapshot", "report"] and set(driver.vms) == {("lab", "a")}
    source.fail["changes"] = Unreachable("again")
    assert follower.turn() == 0.2  # reset by the success


def test_a_manager_that_refuses_connections_is_tried_again_sooner(
    follower: Follower, source: FakeSource
) -> None:
    """Nothing listening (a replica restarting) costs the manager nothing: retried at
    most every REFUSED_CAP s, so the agent follows it within that of its start."""
    follower.turn()
    delays = []
    for _ in range(6):
        source.fail["snapshot" if delays else "changes"] = Refused("connection refused")
        delays.append(follower.turn())
    assert delays == [0.2, 0.4, REFUSED_CAP, REFUSED_CAP, REFUSED_CAP, REFUSED_CAP]
    source.fail["snapshot"] = Unreachable("a 503")
    assert follower.turn() == BACKOFF_CAP  # other failures keep the full backoff


def test_backoff_doubles_to_its_cap() -> None:
    b = Backoff()
    assert [b.next() for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    b.reset()
    assert b.next() == 0.2


def test_a_refused_registration_is_retried_and_nothing_is_touched(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    from vnic.errors import Unauthenticated

    follower.agent.launch(request("mine"), "fake")
    source.fail["register"] = Unauthenticated("manager refused the host token")
    assert follower.turn() == 0.2
    assert set(driver.vms) == {("lab", "mine")}  # still running: the manager decides
    assert follower.turn() == 0.0 and driver.vms == {}  # the manager desires nothing


def test_a_snapshot_of_another_epoch_fences(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    source.put(desired("a"))
    real = source.snapshot

    def other_epoch() -> Snapshot:
        snap = real()
        return Snapshot(snap.revision, snap.vms, epoch=snap.epoch + 5)

    source.snapshot = other_epoch  # type: ignore[method-assign]
    follower.turn()
    assert driver.vms == {}  # nothing applied for a registration that is not current
    source.snapshot = real  # type: ignore[method-assign]
    follower.turn()
    assert source.calls[-3:] == ["register", "snapshot", "report"]
    assert set(driver.vms) == {("lab", "a")}


def test_live_changes_go_in_batches_and_keep_their_order(
    follower: Follower, source: FakeSource, driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in "abc":
        source.put(desired(name))
    follower.turn()
    batches: list[list[str]] = []
    real = follower.agent.reconfigure_many

    def spy(requests: list[LaunchRequest]) -> dict[VmKey, list[str] | Exception]:
        batches.append([f"{r.vm}@{r.profile.egress.rate}" for r in requests])
        return dict(real(requests))

    monkeypatch.setattr(follower.agent, "reconfigure_many", spy)
    source.put(desired("a", "5Mbit"))
    source.put(desired("b", "5Mbit"))
    source.put(desired("a", "7Mbit"))  # the same VM again: a batch of its own, after
    source.delete("lab", "c")  # not a live change: it ends the batch
    source.put(desired("b", "7Mbit"))
    follower.turn()
    assert batches == [["a@5Mbit", "b@5Mbit"], ["a@7Mbit"], ["b@7Mbit"]]
    assert [(s.vm, s.revision) for s in source.reports[-1][1]] == [
        ("a", 4), ("b", 5), ("a", 6), ("c", 7), ("b", 8),
    ]  # fmt: skip
    assert all(s.error is None for s in source.reports[-1][1])
    assert {k: str(r.profile.egress.rate) for k, r in driver.vms.items()} == {
        ("lab", "a"): "7Mbit",
        ("lab", "b"): "7Mbit",
    }
    assert driver.launches == 3 and follower.revision == 8


def test_a_failed_live_change_is_its_vms_and_the_batch_goes_on(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    source.put(desired("x"))
    source.put(desired("y"))
    follower.turn()
    driver.fail_on.add("x")  # its next change fails in the driver
    source.put(desired("x", "5Mbit"))
    source.put(desired("y", "5Mbit"))
    follower.turn()
    statuses = source.last_statuses()
    assert (
        statuses["lab/x"].error is not None and "on purpose" in statuses["lab/x"].error["message"]
    )
    assert statuses["lab/y"].error is None and "egress.rate changed" in statuses["lab/y"].changes
    # x still runs what it ran, and says so in its desired state.
    assert str(driver.vms[("lab", "x")].profile.egress.rate) == "20Mbit"
    assert follower.agent.desired_vm("lab", "x") == desired("x")
    assert str(driver.vms[("lab", "y")].profile.egress.rate) == "5Mbit"


def test_a_snapshot_entry_the_agent_cannot_follow_keeps_what_runs(
    follower: Follower, source: FakeSource, driver: FakeDriver
) -> None:
    source.put(desired("a"))
    source.put(desired("b"))
    follower.turn()
    source.vms[("lab", "a")] = DesiredVm("qemu", request("a", "5Mbit"))  # not loaded here
    source.invalid[("lab", "b")] = InvalidInput.one("request.nics[0].mac", "zz", "a MAC address")
    source.oldest = source.revision + 1  # a relist
    follower.turn()
    follower.turn()
    statuses = source.last_statuses()
    assert statuses["lab/a"].error is not None
    assert statuses["lab/a"].error["fields"] == [
        {"field": "driver", "value": "'qemu'", "expected": "one of fake"}
    ]
    assert statuses["lab/b"].error is not None and statuses["lab/b"].error["kind"] == "invalid"
    assert driver.vms == {("lab", "a"): request("a"), ("lab", "b"): request("b")}


def test_run_renews_the_lease_in_its_thread_and_ends_on_stop(
    tmp_path: Path, driver: FakeDriver
) -> None:
    import threading

    source = FakeSource(Clock(), lease=6.0)  # renewed every 2 s
    stop = threading.Event()
    source.during_changes = lambda: stop.wait(0.05)  # a long poll, cut short
    renewed = threading.Event()
    real_renew = source.renew

    def renew(epoch: int) -> float:
        lease = real_renew(epoch)
        renewed.set()
        return lease

    source.renew = renew  # type: ignore[method-assign]
    source.put(desired("a"))
    agent = Agent(tmp_path / "agent", {"fake": driver}, default="fake")
    follower = Follower(agent, source, INFO)  # the real clock and sleep
    runner = threading.Thread(target=follower.run, args=(stop,))
    runner.start()
    try:
        assert renewed.wait(30)
        assert set(driver.vms) == {("lab", "a")}
        assert source.calls.count("register") == 1  # renewed, never lapsed
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert follower.halt(timeout=5)


# Overlays: a session's networks across hosts (vm "" entries).


def overlay(session: str = "lab", vni: int = 7, peer: str = "10.250.0.12") -> Overlay:
    return Overlay(session, "default", vni, (ipaddress.ip_address(peer),))


class Recorder:
    """Stands in for ``Agent.ensure_overlays``: records each call; ``fail`` raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Overlay], str]] = []
        self.fail: Exception | None = None

    def __call__(self, session: str, overlays: list[Overlay], underlay: str) -> list[str]:
        self.calls.append((session, list(overlays), underlay))
        if self.fail is not None:
            raise self.fail
        return [f"{len(overlays)} overlays"]


@pytest.fixture
def ensured(follower: Follower, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(follower.agent, "ensure_overlays", recorder)
    return recorder


def test_the_snapshots_overlays_are_ensured_with_the_underlay(
    follower: Follower, source: FakeSource, ensured: Recorder
) -> None:
    source.put(desired("a"))
    source.overlays = {"lab": [overlay()], "other": [overlay("other", 8)]}
    follower.turn()
    assert ensured.calls == [
        ("lab", [overlay()], INFO.underlay),
        ("other", [overlay("other", 8)], INFO.underlay),
    ]
    statuses = source.last_statuses()
    assert statuses["lab/"].changes == ["1 overlays"] and statuses["lab/"].error is None
    assert statuses["lab/"].revision == source.revision
    assert "other/" in statuses and "lab/a" in statuses
    # A relist whose snapshot no longer names a session: its overlays are removed.
    source.overlays = {"lab": [overlay()]}
    source.oldest = source.revision + 1
    follower.turn()
    follower.turn()
    assert ("other", [], INFO.underlay) in ensured.calls
    assert set(follower.overlays) == {"lab"}


def test_an_overlay_change_after_the_vm_changes_before_it(
    follower: Follower, source: FakeSource, driver: FakeDriver, ensured: Recorder
) -> None:
    follower.turn()
    order: list[str] = []
    real_launch = follower.agent.launch
    follower.agent.launch = lambda *a, **k: (order.append("launch"), real_launch(*a, **k))[1]  # type: ignore[method-assign]
    ensured.fail = None
    source.put(desired("a"))
    source.put_overlays("lab", [overlay()])
    follower.turn()
    assert ("lab", "a") in driver.vms
    assert ensured.calls == [("lab", [overlay()], INFO.underlay)]
    assert source.last_statuses()["lab/"].changes == ["1 overlays"]
    # The same again (level-based): ensured again, harmless. Then none: removed.
    source.put_overlays("lab", [])
    follower.turn()
    assert ensured.calls[-1] == ("lab", [], INFO.underlay) and follower.overlays == {}
    assert order == ["launch"]


def test_an_overlay_kept_until_the_sessions_next_launch(
    follower: Follower, source: FakeSource, ensured: Recorder
) -> None:
    """Overlays of a session with no VM here are kept; a launch of that session makes them
    again (its namespace is new), after the VM."""
    follower.turn()
    source.put_overlays("lab", [overlay()])
    follower.turn()
    assert follower.overlays == {"lab": [overlay()]} and len(ensured.calls) == 1
    source.put(desired("a"))
    follower.turn()
    assert ensured.calls[-1] == ("lab", [overlay()], INFO.underlay) and len(ensured.calls) == 2
    reported = [f"{s.session}/{s.vm}" for s in source.reports[-1][1]]
    assert reported == ["lab/a", "lab/"]
    # A live change of a running VM makes nothing again.
    source.put(desired("a", "5Mbit"))
    follower.turn()
    assert len(ensured.calls) == 2


def test_a_bad_or_failing_overlay_is_the_sessions_status(
    follower: Follower, source: FakeSource, driver: FakeDriver, ensured: Recorder
) -> None:
    follower.turn()
    source.put_overlays("lab", [overlay()])
    follower.turn()
    error = InvalidInput.one("overlays[0].vni", 0, "a VNI")
    source.revision += 1
    source.log.append(Change(source.revision, "lab", "", None, error=error))
    source.put(desired("b"))
    follower.turn()
    first, vm_b, again = source.reports[-1][1]
    assert first.vm == "" and first.error is not None and first.error["kind"] == "invalid"
    assert vm_b.vm == "b" and vm_b.error is None and ("lab", "b") in driver.vms
    assert again.vm == "" and again.error is None  # b's launch made the kept ones again
    assert follower.overlays == {"lab": [overlay()]}  # kept as it was
    ensured.fail = InvalidInput.one("overlays[0].mtu", 1500, "an MTU that fits")
    source.put_overlays("lab", [overlay(peer="10.250.0.13")])
    follower.turn()
    failed = source.last_statuses()["lab/"]
    assert failed.error is not None and failed.error["fields"][0]["field"] == "overlays[0].mtu"
    # A snapshot whose overlays of a session do not parse keeps what that session had.
    ensured.fail = None
    source.overlay_errors = {"lab": error}
    source.oldest = source.revision + 1
    follower.turn()
    follower.turn()
    assert source.last_statuses()["lab/"].error is not None
    assert follower.overlays == {"lab": [overlay(peer="10.250.0.13")]}


def test_an_agent_given_in_memory_overlays_holds_them_and_touches_no_kernel(
    tmp_path: Path, source: FakeSource, clock: Clock
) -> None:
    """The simulation's agents: overlays in memory (FakeOverlays), through the real
    follower and agent; a second snapshot with the same overlays changes nothing."""
    held = FakeOverlays()
    agent = Agent(tmp_path / "sim", {"fake": FakeDriver()}, default="fake", overlays=held)
    follower = Follower(agent, source, INFO, clock=clock, spread=lambda: 1.0)
    source.put(desired("a"))
    source.overlays = {"lab": [overlay()]}
    follower.turn()
    assert held.sessions == {"lab": [overlay()]}
    assert source.last_statuses()["lab/"].changes == ["overlays of session lab: 0 -> 1"]
    follower._relist_asked = True
    follower.turn()
    assert source.last_statuses()["lab/"].changes == []
    source.overlays = {}
    follower._relist_asked = True
    follower.turn()
    assert held.sessions == {}
