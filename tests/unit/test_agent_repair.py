"""The host lock (one writer per host, across processes) and the repair loop's bounds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vnic.agent.hostlock import HostLock
from vnic.agent.port import VmKey
from vnic.agent.repair import BACKOFF, Repairer, TokenBucket
from vnic.errors import DataplaneError, Unavailable


def holder(path: Path, how: str) -> subprocess.Popen[str]:
    """Another process holding ``path`` ``how`` (shared or exclusive) until killed."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from vnic.agent.hostlock import HostLock
        with HostLock(Path({str(path)!r})).{how}():
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_writing_keeps_this_one_out(tmp_path: Path) -> None:
    path = tmp_path / "host.lock"
    proc = holder(path, "exclusive")
    try:
        lock = HostLock(path, wait=0.3)
        with pytest.raises(Unavailable, match=r"host\.lock"), lock.shared():
            pass
        with lock.exclusive(wait=0) as alone:
            assert alone is False
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # The kernel dropped the dead process's lock.
    with HostLock(path, wait=5).exclusive() as alone:
        assert alone is True


def test_readers_of_two_processes_hold_it_together_and_keep_a_writer_out(tmp_path: Path) -> None:
    path = tmp_path / "host.lock"
    proc = holder(path, "shared")
    try:
        lock = HostLock(path, wait=5)
        with lock.shared():
            assert lock.held()
        with lock.exclusive(wait=0) as alone:
            assert alone is False
        assert not lock.held()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_reentrant_per_thread_and_no_upgrade(tmp_path: Path) -> None:
    lock = HostLock(tmp_path / "host.lock")
    with lock.exclusive(), lock.shared(), lock.exclusive() as again:
        assert again is True
    with lock.shared(), lock.shared(), pytest.raises(RuntimeError, match="exclusive"):
        lock.exclusive().__enter__()
    assert not lock.held()


def test_a_writer_waits_for_readers_of_this_process(tmp_path: Path) -> None:
    lock = HostLock(tmp_path / "host.lock", wait=10)
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def reader() -> None:
        with lock.shared():
            inside.set()
            release.wait(10)
            order.append("reader out")

    t = threading.Thread(target=reader)
    t.start()
    assert inside.wait(10)
    with lock.exclusive(wait=0) as alone:
        assert alone is False
    release.set()
    with lock.exclusive():
        order.append("writer in")
    t.join(10)
    assert order == ["reader out", "writer in"]


def test_a_reader_waiting_for_another_process_does_not_block_a_try(tmp_path: Path) -> None:
    """A thread waiting for the file (another process writes) must not make this process's
    other threads queue behind it: a repair's ``exclusive(wait=0)`` answers False while
    that reader still waits."""
    import fcntl
    import os

    path = tmp_path / "host.lock"
    other = os.open(path, os.O_RDWR | os.O_CREAT)  # another open file: another process
    fcntl.flock(other, fcntl.LOCK_EX)
    lock = HostLock(path, wait=60)
    waiting = threading.Event()
    done = threading.Event()

    def reader() -> None:
        waiting.set()
        with lock.shared():
            done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert waiting.wait(10)
        with lock.exclusive(wait=0) as got:
            assert got is False
        assert not done.is_set()  # the reader is still waiting: the try did not wait for it
    finally:
        os.close(other)  # the other process ends: the reader gets in
        thread.join(timeout=30)
    assert done.is_set()


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(3, 60.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(10.0) is False  # half a token
    assert bucket.take(20.0) is True


# ----------------------------------------------------------------------------- repairer


@dataclass(frozen=True)
class Vm:
    key: VmKey


@dataclass
class State:
    vms: dict[VmKey, Vm]

    def get(self, key: VmKey) -> Vm | None:
        return self.vms.get(key)


@dataclass
class FakeAgent:
    """What the repairer uses of an agent: VMs whose drift goes when rebuilt, unless broken."""

    host: HostLock
    drifted: set[VmKey] = field(default_factory=set)
    broken: set[VmKey] = field(default_factory=set)
    rebuilt: list[VmKey] = field(default_factory=list)
    state: State = field(default_factory=lambda: State({}))

    def mine(self) -> list[Vm]:
        return list(self.state.vms.values())

    def drift(self, only: Collection[VmKey] | None = None) -> dict[str, list[str]]:
        return {
            f"{k[0]}/{k[1]}": ["qdisc missing"]
            for k in sorted(self.drifted)
            if only is None or k in only
        }

    def rebuild(self, vm: Vm) -> None:
        self.rebuilt.append(vm.key)
        if vm.key in self.broken:
            raise DataplaneError("the kernel said no")
        self.drifted.discard(vm.key)


def repairer(tmp_path: Path, *keys: VmKey) -> tuple[FakeAgent, Repairer, list[float]]:
    agent = FakeAgent(HostLock(tmp_path / "host.lock"))
    agent.state.vms = {k: Vm(k) for k in keys}
    now = [1000.0]
    r = Repairer(agent, per_vm=2, overall=3, clock=lambda: now[0])  # type: ignore[arg-type]
    return agent, r, now


def test_repairs_are_bounded_per_vm_and_overall(tmp_path: Path) -> None:
    keys = [("s", f"v{i}") for i in range(5)]
    agent, r, now = repairer(tmp_path, *keys)
    agent.drifted = set(keys)
    events = r.run(agent.drift())
    assert [(e.session, e.vm) for e in events] == keys[:3]  # the host's budget
    assert all(e.ok for e in events)
    assert r.skipped["rate"] == 2
    # A VM that keeps drifting gets two repairs a minute.
    agent.drifted = {keys[0]}
    now[0] += 60
    assert len(r.run(agent.drift())) == 1
    agent.drifted = {keys[0]}
    assert len(r.run(agent.drift())) == 1
    agent.drifted = {keys[0]}
    assert r.run(agent.drift()) == []
    text = "\n".join(r.metrics_lines())
    assert 'vnic_repairs_total{session="s",vm="v0",result="repaired"} 3' in text
    assert 'vnic_repairs_skipped_total{reason="rate"} 3' in text


def test_a_failing_repair_backs_off_and_is_reported(tmp_path: Path) -> None:
    key = ("s", "v")
    agent, r, now = repairer(tmp_path, key)
    agent.drifted = {key}
    agent.broken = {key}
    listened: list[str | None] = []
    r.listeners.append(lambda e: listened.append(e.error))
    events = r.run(agent.drift())
    assert [e.error for e in events] == ["the kernel said no"] == listened
    now[0] += BACKOFF / 2
    assert r.run(agent.drift()) == []
    assert r.skipped["backoff"] == 1
    now[0] += BACKOFF
    agent.broken = set()
    assert [e.ok for e in r.run(agent.drift())] == [True]
    assert agent.rebuilt == [key, key]
    assert 'result="failed"} 1' in "\n".join(r.metrics_lines())


def test_no_repair_while_the_host_is_held(tmp_path: Path) -> None:
    key = ("s", "v")
    agent, r, _ = repairer(tmp_path, key)
    agent.drifted = {key}
    proc = holder(tmp_path / "host.lock", "shared")  # a launch in another process
    try:
        assert r.run(agent.drift()) == []
        assert r.skipped["busy"] == 1 and agent.rebuilt == []
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert len(r.run(agent.drift())) == 1


def test_drift_gone_under_the_lock_is_not_rebuilt(tmp_path: Path) -> None:
    key = ("s", "v")
    agent, r, _ = repairer(tmp_path, key)
    stale = {"s/v": ["eth0 missing"]}  # read while a launch was building it
    assert r.run(stale) == [] and agent.rebuilt == []


def test_the_drift_loop_spends_at_most_a_tenth_of_its_time_reading() -> None:
    from types import SimpleNamespace

    from vnic.agent.monitor import DUTY, Monitor

    agent = SimpleNamespace(repairer=SimpleNamespace(interval=2.0))
    monitor = Monitor(agent)  # type: ignore[arg-type]
    assert monitor.pause(0.05) == 2.0
    assert monitor.pause(1.0) == pytest.approx(1.0 * (1 - DUTY) / DUTY)
    agent.repairer = None
    assert monitor.pause(1.0) == monitor.drift_interval
