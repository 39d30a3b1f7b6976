"""Per-vNIC counters from the real kernel: two VMs each get a second vNIC ``eth1`` on a
second network, built here by hand the way the data plane builds one (a veth whose host
end, named from the unit ``VM.eth1``, sits on the network's own bridge with its IFB,
shaping and guard from that vNIC's plan): a TCP flow over ``eth1`` shows in ``eth1``'s
series only, and so do the spoofed frames ``eth1``'s guard drops. The driver's
``plan_for`` is wrapped to plan a slice on its unit's links, as the multi-vNIC data
plane does; everything else is the real code."""

from __future__ import annotations

import ipaddress

from tests.netns.conftest import Lab
from vnic.agent.metrics import Collector, VnicSample, render
from vnic.dataplane import delayd
from vnic.dataplane import namespaces as nsops
from vnic.drivers import hostside, planning
from vnic.lab import measure
from vnic.model.launch import LaunchRequest, NicRequest, link_unit
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names
from vnic.plan.model import Plan

RATE = 40_000_000


class PerUnit:
    """The netns driver, planning each one-vNIC slice on the links of its unit."""

    def __init__(self, lab: Lab) -> None:
        self.driver = lab.driver

    def plan_for(self, request: LaunchRequest) -> Plan:
        return planning.plan_for(LaunchRequest(request.session, request.unit, request.nics))

    def engine_stats(self, session: str, vm: str) -> delayd.EngineStats | None:
        return self.driver.engine_stats(session, vm)


def ip(ns: str, *argv: str) -> None:
    proc = nsops.run_inside(ns, ["ip", *argv], capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr


def second_nic(session: str, vm: str, host: int, network_id: int) -> NicRequest:
    """Build ``vm``'s eth1 on network ``data`` (its bridge made on first use), shaped by a
    profile of its own (40 Mbit/s each way), and return its part of the launch request."""
    session_ns, vm_ns = names.session_netns(session), names.vm_netns(session, vm)
    bridge = names.bridge_of("data")
    unit = link_unit(vm, "eth1")
    links = names.VmLinks.of(unit)
    if nsops.run_inside(session_ns, ["ip", "link", "show", bridge], capture_output=True).returncode:
        ip(session_ns, "link", "add", bridge, "type", "bridge")
        ip(session_ns, "link", "set", bridge, "up")
    v4, v6 = names.vm_addresses(network_id, host)
    mac = MacAddress.parse(f"02:00:00:00:fe:{host:02x}")
    ip(
        session_ns,
        "link",
        "add",
        links.port,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        vm_ns,
    )
    ip(session_ns, "link", "add", links.ifb, "type", "ifb")
    ip(session_ns, "link", "set", links.ifb, "up")
    ip(session_ns, "link", "set", links.port, "master", bridge, "up")
    ip(vm_ns, "link", "set", "eth1", "address", str(mac), "up")
    ip(vm_ns, "addr", "add", str(v4), "dev", "eth1")
    eff = complete(
        [
            Layer(
                "vm-patch",
                "",
                parse_assignments([f"egress.rate={RATE}bit", f"ingress.rate={RATE}bit"]),
            )
        ]
    )
    nic = NicRequest(
        "eth1",
        "data",
        network_id,
        mac,
        v4,
        v6,
        build_profile(eff.values),
        dict(eff.values),
        {"data": 1},
    )
    slice_ = LaunchRequest(session, unit, (nic,))
    hostside.apply(session_ns, slice_, planning.plan_for(slice_), lambda: None)
    return nic


def by_nic(samples: list[VnicSample]) -> dict[tuple[str, str], VnicSample]:
    return {(s.vm, s.nic): s for s in samples}


def test_a_flow_over_eth1_counts_on_eth1_only(lab: Lab) -> None:
    lab.profile(name="twenty", egress={"rate": "20Mbit"}, ingress={"rate": "20Mbit"})
    s = lab.session(default="twenty")
    lab.launch(s, "a")
    lab.launch(s, "b")
    eth0 = {r.vm: r for _, r in lab.service.desired() if r.session == s}
    data_id = 0xFEFE if eth0["a"].ipv4.network != names.session_ipv4(0xFEFE) else 0xFEFD
    requests = [
        LaunchRequest(s, vm, (eth0[vm].primary, second_nic(s, vm, host, data_id)))
        for vm, host in (("a", 2), ("b", 3))
    ]
    b_eth1 = ipaddress.IPv4Interface(requests[1].nics[1].ipv4).ip
    collector = Collector(PerUnit(lab))
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
    for vm in ("a", "b"):
        for direction in ("egress", "ingress"):
            assert grew(vm, "eth0", direction) < 0.001 * sent, (vm, direction)
    # Each vNIC reports its own profile.
    assert after[("a", "eth1")].egress.profile_rate_bps == RATE
    assert after[("a", "eth0")].egress.profile_rate_bps == 20_000_000
    assert after[("a", "eth1")].network == "data" and after[("a", "eth1")].revisions == {"data": 1}
    # A spoofed source MAC on b's eth1 is dropped by eth1's guard, and counted there.
    lab.exec(s, "b", "ip", "link", "set", "eth1", "address", "02:66:66:66:66:66")
    measure.ping(s, "b", str(requests[0].nics[1].ipv4.ip), count=3, timeout=0.3)
    spoofed = by_nic(collector.collect(requests))
    assert spoofed[("b", "eth1")].egress.drops["anti_spoofing"] >= 1
    assert spoofed[("b", "eth0")].egress.drops["anti_spoofing"] == 0
    assert spoofed[("a", "eth1")].egress.drops["anti_spoofing"] == 0

    text = render(after.values())
    a1 = after[("a", "eth1")].egress.bytes
    assert f'vnic_bytes_total{{session="{s}",vm="a",nic="eth1",direction="egress"}} {a1}\n' in text
    assert "vnic_vnics 4\n" in text
