"""The follower on the real kernel: a snapshot builds shaped VMs, a change of profile
reaches the kernel live (the rate measured before and after, the VM not rebuilt), and
the last VM's removal takes the session's network with it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import left_of
from tests.netns.helpers import WIDE, nic, vm
from tests.unit.test_follow import INFO, Clock, FakeSource
from vnic.agent.core import Agent
from vnic.agent.follow import Follower
from vnic.agent.port import DesiredVm
from vnic.dataplane import namespaces as nsops
from vnic.drivers.netns import NetnsDriver
from vnic.lab.measure import TCP_GOODPUT, iperf3
from vnic.model.launch import LaunchRequest
from vnic.plan import names


@pytest.fixture
def session() -> Iterator[str]:
    name = f"f{uuid.uuid4().hex[:8]}"
    yield name
    NetnsDriver().teardown_session(name)  # after a failure: nothing may stay
    assert left_of(name) == []


def a_at(session: str, rate: str) -> LaunchRequest:
    return vm(
        session, "a", nic("eth0", "default", 2, [f"ingress.rate={rate}", "egress.rate=1Gbit"])
    )


def ratio(session: str, b_ip: str, rate: float) -> float:
    """a's download (b sends) over the goodput ``rate`` allows."""
    got = iperf3(session, "a", "b", b_ip, seconds=2, reverse=True)
    print(f"a receives {got.bits_per_second / 1e6:.2f} Mbit/s (profile {rate / 1e6:g})")
    return got.bits_per_second / (rate * TCP_GOODPUT)


def vm_netns_inode(session: str, name: str) -> int:
    return Path(f"/run/netns/{names.vm_netns(session, name)}").stat().st_ino


def test_snapshot_then_a_live_profile_change_then_removal(tmp_path: Path, session: str) -> None:
    clock = Clock()
    source = FakeSource(clock)
    agent = Agent(tmp_path / "agent", {"netns": NetnsDriver()}, default="netns")
    follower = Follower(agent, source, INFO, clock=clock)
    b = vm(session, "b", nic("eth0", "default", 3, WIDE))
    source.put(DesiredVm("netns", b))
    source.put(DesiredVm("netns", a_at(session, "10Mbit")))
    assert follower.turn() == 0.0
    assert all(s.error is None for s in source.reports[-1][1]), source.reports[-1]
    b_ip = str(b.ipv4.ip)
    assert 0.90 <= ratio(session, b_ip, 10e6) <= 1.03
    built = vm_netns_inode(session, "a")

    source.put(DesiredVm("netns", a_at(session, "30Mbit")))
    follower.turn()
    (status,) = source.reports[-1][1]
    assert status.error is None and status.revision == source.revision
    assert any("10Mbit -> 30Mbit" in line for line in status.changes), status.changes
    assert vm_netns_inode(session, "a") == built  # changed in place, not rebuilt
    assert 0.90 <= ratio(session, b_ip, 30e6) <= 1.03

    source.delete(session, "a")
    source.delete(session, "b")
    follower.turn()
    assert [s.error for s in source.reports[-1][1]] == [None, None]
    assert not nsops.exists(names.session_netns(session))
    assert left_of(session) == []
    assert agent.desired() == []
