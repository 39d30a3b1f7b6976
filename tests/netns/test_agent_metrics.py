"""Drops read from the real kernel, split by cause: the rate limiter's queue, the loss
model, and the anti-spoofing guard (tests/netns/test_metrics_collect.py has the rest)."""

from __future__ import annotations

from tests.netns.conftest import Lab
from vnic.agent.metrics import Collector
from vnic.lab import measure
from vnic.model.launch import LaunchRequest


def requests(lab: Lab) -> dict[str, LaunchRequest]:
    return {r.vm: r for _, r in lab.service.desired()}


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
