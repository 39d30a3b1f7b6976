"""The qemu driver on the real kernel with real guests (TCG here): delay and TCP settings
inside a guest and their live change, failed launches that leave nothing, and what a
restarting agent needs (inventory kept apart from the netns driver's, drift, reconcile).
Every assertion is on what the guest, the kernel or /proc shows."""

from __future__ import annotations

import os
import signal
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import guest_leftovers, leftovers
from tests.netns.test_reconcile_dataplane import tagged_links, wait_until
from vnic.agent.core import Agent, local_agent
from vnic.dataplane import qemu, vmexec
from vnic.drivers.netns import NetnsDriver
from vnic.drivers.qemu import QemuDriver
from vnic.errors import DataplaneError, Unsupported
from vnic.lab import measure
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.profile import parse_profile_document
from vnic.plan import names
from vnic.store.db import Database


class GuestLab:
    """A database, an agent with both host drivers, and one session."""

    def __init__(self, tmp: Path) -> None:
        self.db = Database(f"sqlite:///{tmp / 'vnic.db'}")
        self.service = Service(self.db)
        self.agent: Agent = local_agent("qemu", state_dir=tmp / "agent")
        self.session = f"q{uuid.uuid4().hex[:8]}"
        self.profile(name="plain")
        self.service.create_session(self.session, default_profile="plain")

    def profile(self, **doc: object) -> str:
        spec = parse_profile_document(dict(doc))
        self.service.apply_profiles([spec])
        return spec.name

    def launch(self, vm: str, kind: str = "qemu", profile: str | None = None) -> str:
        self.service.add_vm(VmRequest(self.session, vm, profile=profile))
        ip = self.service.launch_vm(self.session, vm, self.agent, kind).vm.ipv4
        assert ip
        return ip

    def guest_leftovers(self) -> list[str]:
        return (
            guest_leftovers(self.session)
            + leftovers(self.session)
            + list(tagged_links(self.session))
        )


@pytest.fixture
def glab(tmp_path: Path) -> Iterator[GuestLab]:
    lab = GuestLab(tmp_path)
    try:
        yield lab
    finally:
        lab.service.session_down(lab.session, lab.agent)
        lab.db.dispose()
        assert lab.guest_leftovers() == []


def rtt_ms(lab: GuestLab, client: str, address: str) -> float:
    times = measure.ping(lab.session, client, address, count=8, interval=0.1, timeout=1.0)
    assert len(times) >= 6, times
    return statistics.median(times)


def guest_tcp(lab: GuestLab, vm: str) -> tuple[str, str, str]:
    """The guest kernel's congestion control, SACK switch, and eth0's TCP segmentation offload."""
    keys = ["net.ipv4.tcp_congestion_control", "net.ipv4.tcp_sack"]
    sysctls = vmexec.run(lab.session, vm, ["sysctl", "-n", *keys], timeout=30).stdout.split()
    offload = vmexec.run(lab.session, vm, ["ethtool", "-k", "eth0"], timeout=30).stdout
    state = offload.split("tcp-segmentation-offload:", 1)[1].split()[0]
    return sysctls[0], sysctls[1], state


def test_delay_and_tcp_settings_in_a_guest_change_live(glab: GuestLab) -> None:
    glab.profile(
        name="slow",
        egress={"rate": "20Mbit", "delay": "20ms"},
        ingress={"rate": "20Mbit"},
        tcp={"congestion_control": "reno", "sack": False},
    )
    peer = glab.launch("peer", "netns")
    glab.launch("g", profile="slow")
    g_ip = glab.service.get_vm(glab.session, "g").ipv4
    assert g_ip
    # The delay engine carries the guest's egress delay (no netem here): the round
    # trip from the peer grows by about 20 ms; the guest's kernel took the TCP settings
    # from its command line.
    assert 19 < rtt_ms(glab, "peer", g_ip) < 30
    assert guest_tcp(glab, "g") == ("reno", "0", "on")

    # Live: more delay, BBR, SACK back, and egress loss (per packet: offload off in the guest).
    changes = glab.service.update_vm_live(
        glab.session,
        "g",
        {
            "patch": {
                "egress": {"delay": "50ms", "loss": "0.1%"},
                "tcp": {"congestion_control": "bbr", "sack": True},
            }
        },
        glab.agent,
    )[1]
    assert changes and not changes[0].error, changes
    assert 48 < rtt_ms(glab, "peer", g_ip) < 65
    assert guest_tcp(glab, "g") == ("bbr", "1", "off")
    # The guest still reaches its peer the other way round, through the same engine.
    assert measure.ping(glab.session, "g", peer, count=2) != []


def test_failed_launches_leave_nothing(
    glab: GuestLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    glab.launch("n", "netns")  # the session's network exists, and must survive
    # Refused before anything is made: a field no driver honours yet.
    glab.profile(name="peaky", egress={"rate": "10Mbit", "peak": "20Mbit"})
    glab.service.add_vm(VmRequest(glab.session, "p", profile="peaky"))
    with pytest.raises(Unsupported, match=r"egress\.peak"):
        glab.service.launch_vm(glab.session, "p", glab.agent, "qemu")
    # QEMU itself fails (a kernel that is not one): the tap, IFB, guard and run dir go.
    broken = tmp_path / "broken-image"
    broken.mkdir()
    (broken / "vmlinuz").write_bytes(b"not a kernel")
    (broken / "initrd.img").write_bytes(b"")
    monkeypatch.setattr(qemu, "image", lambda: qemu.Image(broken))
    glab.service.add_vm(VmRequest(glab.session, "b"))
    with pytest.raises(DataplaneError, match="did not start"):
        glab.service.launch_vm(glab.session, "b", glab.agent, "qemu")
    assert not qemu.run_files(glab.session, "b").directory.exists()
    assert set(tagged_links(glab.session).values()) == {names.owner_tag(glab.session, "n")}
    assert glab.service.get_vm(glab.session, "b").state == "defined"
    assert NetnsDriver().running(glab.session) == ["n"]


def test_inventory_drift_and_reconcile_of_guests(glab: GuestLab) -> None:
    glab.launch("n", "netns")
    glab.launch("g")
    netns, guests = NetnsDriver(), QemuDriver()
    # Each driver finds its own VMs only, though both sit on one bridge with tagged links.
    assert netns.inventory()[glab.session] == {"n"}
    assert guests.inventory()[glab.session] == {"g"}
    assert glab.agent.drift() == {}

    # QEMU killed behind the agent's back: drift names it, reconcile boots it again.
    pid = qemu.guest_pid(glab.session, "g", names.owner_tag(glab.session, "g"))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: qemu.guest_pid(glab.session, "g", names.owner_tag(glab.session, "g")) is None
    )
    assert list(glab.agent.drift()) == [f"{glab.session}/g"]
    report = glab.agent.reconcile()
    assert f"{glab.session}/g" in report.reapplied, report
    assert glab.agent.drift() == {}
    g_ip = str(glab.agent.state.get((glab.session, "g")).request.ipv4.ip)  # type: ignore[union-attr]
    assert measure.ping(glab.session, "n", g_ip, count=2) != []

    # A guest nobody desires any more (forgotten by the agent) is destroyed; the netns VM stays.
    glab.agent.state.remove([(glab.session, "g")])
    report = glab.agent.reconcile()
    assert f"{glab.session}/g" in report.removed
    assert qemu.owned_processes(names.owner_tag(glab.session, "g")) == {}
    assert not qemu.run_files(glab.session, "g").directory.exists()
    assert set(tagged_links(glab.session).values()) == {names.owner_tag(glab.session, "n")}
    assert netns.running(glab.session) == ["n"]
