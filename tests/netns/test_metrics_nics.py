"""Per-vNIC counters from the real kernel: two netns VMs with two vNICs each (``eth1`` on
a second network, shaped by a profile of its own): a TCP flow over ``eth1`` shows in
``eth1``'s series only, and so do the spoofed frames ``eth1``'s guard drops."""

from __future__ import annotations

from tests.netns.conftest import Multi
from tests.netns.helpers import nic, vm, with_nic
from vnic.agent.metrics import Collector, VnicSample, render
from vnic.lab import measure

RATE = 40_000_000


def by_nic(samples: list[VnicSample]) -> dict[tuple[str, str], VnicSample]:
    return {(s.vm, s.nic): s for s in samples}


def test_a_flow_over_eth1_counts_on_eth1_only(multi: Multi) -> None:
    s = multi.session()
    twenty = ["egress.rate=20Mbit", "ingress.rate=20Mbit"]
    forty = [f"egress.rate={RATE}bit", f"ingress.rate={RATE}bit"]
    requests = [
        vm(s, name, nic("eth0", "default", host, twenty), nic("eth1", "data", host, forty))
        for name, host in (("a", 2), ("b", 3))
    ]
    requests = [with_nic(r, "eth1", revisions={"data": 1}) for r in requests]
    multi.launch(*requests)
    b_eth1 = requests[1].nics[1].ipv4.ip
    collector = Collector(multi.driver)
    before = by_nic(collector.collect(requests))
    assert set(before) == {("a", "eth0"), ("a", "eth1"), ("b", "eth0"), ("b", "eth1")}
    flow = measure.iperf3(s, "a", "b", str(b_eth1), seconds=3, omit=0)
    after = by_nic(collector.collect(requests))

    def grew(vm: str, nic: str, direction: str) -> int:
        return int(
            after[(vm, nic)].direction(direction).bytes
            - before[(vm, nic)].direction(direction).bytes
        )

    sent, got = grew("a", "eth1", "egress"), grew("b", "eth1", "ingress")
    # Frames on the wire: iperf3's payload plus TCP/IP/Ethernet headers (~5 % at 1448 B).
    assert flow.bytes <= sent <= flow.bytes * 1.08, (flow.bytes, sent)
    assert abs(got - sent) / sent < 0.01, (got, sent)
    # The flow's acknowledgements come back over eth1 too; eth0 saw none of it.
    assert grew("b", "eth1", "egress") > 0 and grew("a", "eth1", "ingress") > 0
    for name in ("a", "b"):
        for direction in ("egress", "ingress"):
            assert grew(name, "eth0", direction) < 0.001 * sent, (name, direction)
    # Each vNIC reports its own profile.
    assert after[("a", "eth1")].egress.profile_rate_bps == RATE
    assert after[("a", "eth0")].egress.profile_rate_bps == 20_000_000
    assert after[("a", "eth1")].network == "data" and after[("a", "eth1")].revisions == {"data": 1}
    # A spoofed source MAC on b's eth1 is dropped by eth1's guard, and counted there.
    multi.exec(s, "b", "ip", "link", "set", "eth1", "address", "02:66:66:66:66:66")
    measure.ping(s, "b", str(requests[0].nics[1].ipv4.ip), count=3, timeout=0.3)
    spoofed = by_nic(collector.collect(requests))
    assert spoofed[("b", "eth1")].egress.drops["anti_spoofing"] >= 1
    assert spoofed[("b", "eth0")].egress.drops["anti_spoofing"] == 0
    assert spoofed[("a", "eth1")].egress.drops["anti_spoofing"] == 0

    text = render(after.values())
    a1 = after[("a", "eth1")].egress.bytes
    assert f'vnic_bytes_total{{session="{s}",vm="a",nic="eth1",direction="egress"}} {a1}\n' in text
    assert "vnic_vnics 4\n" in text
