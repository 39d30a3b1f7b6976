"""A QEMU guest with two vNICs on two networks, on the real kernel: one virtio NIC per
vNIC, each on its own tap (the vNIC's port, named from its unit) on its network's
bridge, with its MAC and addresses configured in the guest; traffic on both,
each shaped to its own profile (iperf3), drift per NIC, and nothing left after."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.netns.conftest import guest_leftovers, left_of
from tests.netns.helpers import WIDE, nic, until, vm, with_sets
from tests.netns.test_multi_nic import goodput_ratio
from vnic.dataplane import qemu, vmexec
from vnic.dataplane.inventory import session_links
from vnic.drivers.netns import NetnsDriver
from vnic.drivers.qemu import QemuDriver
from vnic.lab.measure import iperf3, ping
from vnic.model.launch import link_unit
from vnic.plan import names
from vnic.plan.guest import nic_id

pytestmark = pytest.mark.root


@pytest.fixture
def session() -> Iterator[str]:
    name = f"g{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        QemuDriver().teardown_session(name)
        NetnsDriver().teardown_session(name)
        left = left_of(name) + guest_leftovers(name)
        assert left == [], f"left behind: {left}"


def test_a_two_nic_guest_has_a_shaped_nic_per_vnic(session: str) -> None:
    s = session
    guest = vm(
        s,
        "g",
        nic("eth0", "default", 2, ["egress.rate=20Mbit", "ingress.rate=20Mbit"]),
        nic("eth1", "data", 2, ["egress.rate=40Mbit", "ingress.rate=40Mbit"]),
    )
    b = vm(s, "b", nic("eth0", "default", 3, WIDE))
    c = vm(s, "c", nic("eth0", "data", 4, WIDE))
    netns, qemu_driver = NetnsDriver(), QemuDriver()
    netns.launch(b)
    netns.launch(c)
    qemu_driver.launch(guest)

    # Each vNIC's tap on its own network's bridge, named and tagged by its unit.
    found = session_links(names.session_netns(s))
    for n in guest.nics:
        unit = link_unit("g", n.name)
        tap = found[names.VmLinks.of(unit).port]
        assert tap.master == names.bridge_of(n.network)
        assert tap.alias == names.owner_tag(s, unit)
    # In the guest: each NIC named as its vNIC, with its MAC and addresses.
    for n in guest.nics:  # busybox's ip has no JSON: its text, one word at a time
        mac = vmexec.run(s, "g", ["cat", f"/sys/class/net/{n.name}/address"], timeout=30)
        assert mac.stdout.strip() == str(n.mac), mac
        words = vmexec.run(s, "g", ["ip", "addr", "show", "dev", n.name], timeout=30)
        assert {str(n.ipv4), str(n.ipv6)} <= set(words.stdout.split()), words.stdout
    # QEMU's NICs filter on the vNICs' MACs.
    run = qemu.run_files(s, "g")
    for i, n in enumerate(guest.nics):
        (rx,) = qemu.qmp(run, "query-rx-filter", name=nic_id(i))
        assert rx["main-mac"] == str(n.mac)

    # Traffic on both, both families, each network's peer only through its own NIC.
    for peer, n in ((b, guest.nics[0]), (c, guest.nics[1])):
        assert ping(s, peer.vm, str(n.ipv4.ip), count=2), n.name
        assert ping(s, peer.vm, str(n.ipv6.ip), count=2), n.name
    assert ping(s, "b", str(guest.nics[1].ipv4.ip), count=2, timeout=0.5) == []
    up0 = iperf3(s, "g", "b", str(b.ipv4.ip), seconds=3)
    down1 = iperf3(s, "g", "c", str(c.ipv4.ip), seconds=3, reverse=True)
    print(
        f"\nguest eth0 up (20 Mbit/s) {up0.bits_per_second / 1e6:.2f}, "
        f"eth1 down (40 Mbit/s) {down1.bits_per_second / 1e6:.2f} Mbit/s"
    )
    assert 0.95 <= goodput_ratio(up0.bits_per_second, 20e6) <= 1.03, up0
    assert 0.95 <= goodput_ratio(down1.bits_per_second, 40e6) <= 1.03, down1
    assert qemu_driver.drift(guest) == []

    # A structural live change of eth1 alone (its delay engine comes, egress loss needs
    # eth1's offloads off in the guest): eth0's tap and NIC are left as they were.
    lossy = with_sets(guest, "eth1", ["egress.rate=40Mbit", "egress.loss=1%"])
    lines = qemu_driver.reconfigure(guest, lossy)
    assert lines and all(line.startswith("eth1: ") for line in lines), lines
    assert qemu_driver.drift(lossy) == []
    features = vmexec.run(s, "g", ["ethtool", "-k", "eth1"], timeout=30).stdout
    assert "tcp-segmentation-offload: off" in features, features
    features = vmexec.run(s, "g", ["ethtool", "-k", "eth0"], timeout=30).stdout
    assert "tcp-segmentation-offload: on" in features, features
    assert ping(s, "c", str(guest.nics[1].ipv4.ip), count=3)

    # One vNIC's carrier down and up again (QMP set_link on its own NIC): the guest sees
    # eth1 go, eth0 stays up.
    def carrier(name: str) -> str:
        got = vmexec.run(s, "g", ["cat", f"/sys/class/net/{name}/carrier"], timeout=30)
        return got.stdout.strip()

    qemu_driver.set_link(s, "g", False, "eth1")
    assert until(lambda: carrier("eth1") == "0") and carrier("eth0") == "1"
    qemu_driver.set_link(s, "g", True, "eth1")
    assert until(lambda: carrier("eth1") == "1")

    qemu_driver.destroy(s, "g")
    tags = {names.owner_tag(s, "g"), names.owner_tag(s, "g.eth1")}
    assert not tags & {x.alias for x in session_links(names.session_netns(s)).values()}
    assert guest_leftovers(s) == []
