"""The agent's metrics read from the real kernel: counters against what traffic did,
drops split by cause, the active latency probe against the profile's delay."""

from __future__ import annotations

from tests.netns.conftest import Lab
from vnic import measure
from vnic.agent.metrics import Collector
from vnic.dataplane import latency
from vnic.drivers.base import LaunchRequest


def requests(lab: Lab) -> dict[str, LaunchRequest]:
    return {r.vm: r for _, r in lab.service.desired()}


def test_counters_follow_traffic_and_rate_matches_profile(lab: Lab) -> None:
    lab.profile(name="p", egress={"rate": "20Mbit"}, ingress={"rate": "50Mbit"})
    s = lab.session(default="p")
    lab.launch(s, "a")
    b = lab.launch(s, "b")
    assert b.vm.ipv4
    clock = [0.0]
    collector = Collector(lab.driver, clock=lambda: clock[0])
    reqs = requests(lab)
    before = {x.vm: x for x in collector.collect(list(reqs.values()))}
    result = measure.iperf3(s, "a", "b", b.vm.ipv4, seconds=4, omit=0)
    clock[0] = 4.0  # rate over the flow, as the agent computes it between scrapes
    after = {x.vm: x for x in collector.collect(list(reqs.values()))}
    sent = after["a"].egress.bytes - before["a"].egress.bytes
    got = after["b"].ingress.bytes - before["b"].ingress.bytes
    # Frames on the wire: the payload plus TCP/IP/Ethernet headers (at most ~5 % more).
    assert result.bytes <= sent <= result.bytes * 1.08, (result.bytes, sent)
    assert abs(got - sent) / sent < 0.01
    assert after["a"].egress.packets > before["a"].egress.packets + 1000
    rate = after["a"].egress.rate_bps
    assert rate is not None and 0.9 * 20e6 < rate < 1.05 * 20e6, rate
    assert after["a"].egress.profile_rate_bps == 20_000_000
    assert after["a"].revisions == {"p": 1}
    assert before["a"].egress.rate_bps is None  # the first reading has nothing to compare


def test_drops_are_split_by_cause(lab: Lab) -> None:
    lab.profile(name="lossy", egress={"rate": "100Mbit", "delay": "1ms", "loss": "10%"})
    lab.profile(name="slow", egress={"rate": "2Mbit", "queue": "10kB"})
    s = lab.session()
    lab.launch(s, "a", profile="lossy")
    lab.launch(s, "slow", profile="slow")
    b = lab.launch(s, "b")
    assert b.vm.ipv4 and b.vm.mac
    a_ip = lab.service.explain(s, "a").vm.ipv4
    assert a_ip
    measure.udp_flood(s, "a", "b", b.vm.ipv4, pps=2000, seconds=2)
    measure.udp_flood(s, "slow", "b", b.vm.ipv4, pps=2000, payload=1000, seconds=2)
    # a spoofed source MAC from VM b
    lab.exec(s, "b", "ip", "link", "set", "eth0", "address", "02:66:66:66:66:66")
    measure.ping(s, "b", a_ip, count=3, timeout=0.3)
    got = {x.vm: x for x in Collector(lab.driver).collect(list(requests(lab).values()))}
    lossy = got["a"].egress
    lost = lossy.drops["emulated_loss"]
    total = lossy.packets + lost
    assert 0.07 < lost / total < 0.13, (lost, total)
    assert lossy.drops["rate_limit"] == 0
    assert got["slow"].egress.drops["rate_limit"] > 1000  # 16 Mbit/s offered into 2 Mbit/s
    assert got["slow"].egress.drops["emulated_loss"] == 0
    assert got["b"].egress.drops["anti_spoofing"] >= 1
    assert got["a"].egress.drops["anti_spoofing"] == 0


def test_latency_probe_measures_the_round_trip(lab: Lab) -> None:
    lab.profile(name="far", egress={"rate": "50Mbit", "delay": "10ms"}, ingress={"delay": "5ms"})
    lab.profile(name="near", egress={"rate": "50Mbit"})
    s = lab.session()
    lab.launch(s, "far", profile="far")
    lab.launch(s, "near", profile="near")
    reqs = requests(lab)
    targets = [latency.Target(r.session, r.vm, r.network_id, str(r.ipv4.ip)) for r in reqs.values()]
    targets.append(latency.Target(s, "nobody", reqs["far"].network_id, "10.0.0.250"))
    rtt = latency.measure(targets, timeout=1.0)
    far, near = rtt[(s, "far")], rtt[(s, "near")]
    assert far is not None and 0.0148 < far < 0.020, far  # 10 ms + 5 ms, both ways
    assert near is not None and near < 0.005, near
    assert rtt[(s, "nobody")] is None
