"""The agent's collector and latency probe against the real kernel: counters that grow by
what traffic did, the rate measured during a flow, drops of the loss model, round trips
to every vNIC (through its own network's bridge) and silence from an address nobody has.
Every traffic run is a few seconds."""

from __future__ import annotations

import ipaddress
import json
import threading
import time

from tests.netns.conftest import Lab
from vnic.agent.latency import LatencyProbe, Target, switch_address
from vnic.agent.metrics import Collector, VnicSample, render
from vnic.dataplane import namespaces as nsops
from vnic.lab import measure
from vnic.model.launch import LaunchRequest, link_unit
from vnic.plan import names

RATE = 20_000_000


def requests(lab: Lab) -> list[LaunchRequest]:
    return [r for _, r in lab.service.desired()]


def by_vm(samples: list[VnicSample]) -> dict[str, VnicSample]:
    return {s.vm: s for s in samples}


def test_counters_grow_by_the_flow_and_the_rate_is_the_profile_s(lab: Lab) -> None:
    lab.profile(name="twenty", egress={"rate": "20Mbit"}, ingress={"rate": "20Mbit"})
    s = lab.session(default="twenty")
    lab.launch(s, "a")
    b_ip = lab.launch(s, "b").vm.ipv4
    assert b_ip
    collector = Collector(lab.driver)  # the real clock, as the agent runs it
    reqs = requests(lab)
    before = by_vm(collector.collect(reqs))
    assert before["a"].egress.rate_bps is None  # the first reading has nothing to compare
    done: list[measure.Throughput] = []
    flow = threading.Thread(
        target=lambda: done.append(measure.iperf3(s, "a", "b", b_ip, seconds=4, omit=0))
    )
    flow.start()
    try:
        time.sleep(1.5)  # past TCP's slow start
        collector.collect(reqs)
        time.sleep(2.0)
        during = by_vm(collector.collect(reqs))
    finally:
        flow.join(timeout=30)
    assert done, "iperf3 did not finish"
    after = by_vm(collector.collect(reqs))
    for rate in (during["a"].egress.rate_bps, during["b"].ingress.rate_bps):
        assert rate is not None and 0.9 * RATE < rate < 1.1 * RATE, rate
    assert during["a"].egress.profile_rate_bps == RATE
    assert during["b"].ingress.profile_rate_bps == RATE

    payload = done[0].bytes
    sent = after["a"].egress.bytes - before["a"].egress.bytes
    got = after["b"].ingress.bytes - before["b"].ingress.bytes
    # Frames on the wire: iperf3's payload plus TCP/IP/Ethernet headers (~5 % at 1448 B).
    assert payload <= sent <= payload * 1.08, (payload, sent)
    assert abs(got - sent) / sent < 0.01, (got, sent)
    packets = after["a"].egress.packets - before["a"].egress.packets
    assert payload / 1500 <= packets <= payload / 1400 + 100, (payload, packets)  # full frames
    assert after["a"].egress.drops["rate_limit"] >= before["a"].egress.drops["rate_limit"]
    assert after["a"].revisions == {"twenty": 1}

    # The exposition of real samples reads back to the same numbers.
    text = render(after.values())
    assert (
        f'vnic_bytes_total{{session="{s}",vm="a",nic="eth0",direction="egress"}}'
        f" {after['a'].egress.bytes}\n" in text
    )

    # A session whose namespace is gone reports nothing (no fake counter reset).
    lab.service.session_down(s, lab.agent)
    assert collector.collect(reqs) == []


def test_emulated_loss_is_counted_as_such(lab: Lab) -> None:
    lab.profile(name="lossy", egress={"rate": "100Mbit", "loss": "10%"})
    s = lab.session()
    lab.launch(s, "a", profile="lossy")
    b = lab.launch(s, "b")
    assert b.vm.ipv4
    collector = Collector(lab.driver)
    reqs = requests(lab)
    before = by_vm(collector.collect(reqs))["a"].egress
    flood = measure.udp_flood(s, "a", "b", b.vm.ipv4, pps=3000, seconds=2)
    after = by_vm(collector.collect(reqs))["a"].egress
    lost = after.drops["emulated_loss"] - before.drops["emulated_loss"]
    delivered = after.packets - before.packets
    offered = lost + delivered
    assert flood.sent >= 5000
    assert 0.08 < lost / offered < 0.12, (lost, offered)
    # Every datagram the VM sent is either delivered or lost on purpose (a few
    # neighbour packets of the flood's warm-up ride along).
    assert flood.sent <= offered <= flood.sent + 20, (flood.sent, offered)
    assert abs(flood.received - delivered) <= 20, (flood.received, delivered)
    assert after.drops["rate_limit"] == after.drops["queue_overflow"] == 0
    assert after.drops["anti_spoofing"] == 0


def test_latency_probe_times_every_vm_and_only_answers_count(lab: Lab) -> None:
    lab.profile(name="far", egress={"rate": "50Mbit", "delay": "5ms"})
    s = lab.session()
    lab.launch(s, "far", profile="far")
    lab.launch(s, "near")
    other = lab.session()
    lab.launch(other, "c")
    targets = [Target(r.session, r.vm, r.ipv4) for r in requests(lab)]
    subnet = switch_address(next(t.ipv4 for t in targets if t.session == s)).network
    silent = Target(s, "nobody", str(subnet.network_address + 250))  # no VM has it: no ARP reply
    gone = Target("no-such-session", "x", "10.9.9.9")
    probe = LatencyProbe(timeout=0.5, rounds=2)
    start = time.monotonic()
    rtt = probe.measure([*targets, silent, gone])
    took = time.monotonic() - start
    assert took >= 2 * 0.5, took  # both rounds waited their timeout for "nobody"
    near, far, c = rtt[(s, "near", "eth0")], rtt[(s, "far", "eth0")], rtt[(other, "c", "eth0")]
    assert near is not None and 0 < near < 0.003, near
    assert c is not None and 0 < c < 0.003, c
    assert far is not None and 0.005 <= far < 0.009, far  # 5 ms out, nothing back
    assert rtt[(s, "nobody", "eth0")] is None
    assert rtt[("no-such-session", "x", "eth0")] is None

    # In the background, with the collector taking its results.
    probe.start(lambda: targets, interval=0.2)
    try:
        deadline = time.monotonic() + 5
        while len(probe.latest()) < len(targets) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        probe.stop()
    latest = probe.latest()
    assert all(latest[t.key] is not None for t in targets), latest
    samples = by_vm(Collector(lab.driver).collect(requests(lab), latency=latest))
    assert samples["far"].latency_seconds == latest[(s, "far", "eth0")]


def test_latency_is_per_vnic_through_its_network_s_bridge(lab: Lab) -> None:
    """A second vNIC on a second network, built here by hand as the data plane builds
    one (its port on the network's own bridge): each vNIC is timed through its own
    network's switch, which speaks from that network's .1 on that bridge only."""
    lab.profile(name="far", egress={"rate": "50Mbit", "delay": "5ms"})
    s = lab.session()
    a = lab.launch(s, "a", profile="far").vm
    assert a.ipv4
    eth0 = ipaddress.IPv4Interface(a.ipv4)
    data_id = 0xFEFE if eth0.network != names.session_ipv4(0xFEFE) else 0xFEFD
    eth1, _ = names.vm_addresses(data_id, 2)
    session_ns, vm_ns = names.session_netns(s), names.vm_netns(s, "a")
    bridge, port = names.bridge_of("data"), names.VmLinks.of(link_unit("a", "eth1")).port

    def ip(ns: str, *argv: str) -> None:
        proc = nsops.run_inside(ns, ["ip", *argv], capture_output=True, timeout=10)
        assert proc.returncode == 0, proc.stderr

    ip(session_ns, "link", "add", bridge, "type", "bridge")
    ip(session_ns, "link", "set", bridge, "up")
    ip(session_ns, "link", "add", port, "type", "veth", "peer", "name", "eth1", "netns", vm_ns)
    ip(session_ns, "link", "set", port, "master", bridge, "up")
    ip(vm_ns, "addr", "add", str(eth1), "dev", "eth1")
    ip(vm_ns, "link", "set", "eth1", "up")

    targets = [
        Target(s, "a", eth0, "eth0", "default"),
        Target(s, "a", eth1, "eth1", "data"),
        Target(s, "a", str(eth1.network.network_address + 250), "eth2", "data"),  # nobody
        Target(s, "a", eth1, "eth3", "nowhere"),  # a network without a bridge
    ]
    rtt = LatencyProbe(timeout=0.5, rounds=2).measure(targets)
    first, second = rtt[(s, "a", "eth0")], rtt[(s, "a", "eth1")]
    assert first is not None and 0.005 <= first < 0.009, first  # eth0's profile: 5 ms out
    assert second is not None and 0 < second < 0.003, second  # eth1 is not shaped
    assert rtt[(s, "a", "eth2")] is None and rtt[(s, "a", "eth3")] is None

    # Each network's switch address is on its own bridge, and only there.
    def addresses(device: str) -> set[str]:
        proc = nsops.run_inside(
            session_ns, ["ip", "-j", "addr", "show", "dev", device], capture_output=True
        )
        return {a["local"] for link in json.loads(proc.stdout) for a in link["addr_info"]}

    assert str(switch_address(eth1).ip) in addresses(bridge)
    assert str(switch_address(eth1).ip) not in addresses(names.BRIDGE)
    assert str(switch_address(eth0).ip) not in addresses(bridge)
