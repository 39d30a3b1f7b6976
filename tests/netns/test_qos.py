"""QoS classes under contention, measured with two UDP flows that each offer the full rate."""

from __future__ import annotations

from tests.netns.conftest import Lab
from vnic.lab.bench.run import concurrent_udp
from vnic.lab.measure import UDP_GOODPUT


def test_each_class_gets_its_guarantee_under_contention(lab: Lab) -> None:
    lab.profile(
        name="classes",
        egress={"rate": "10Mbit"},
        qos={
            "egress": [
                {"name": "voice", "priority": 0, "guaranteed": "6Mbit", "match": {"dscp": ["ef"]}},
                {"name": "bulk", "priority": 7, "guaranteed": "4Mbit"},
            ]
        },
    )
    lab.profile(name="wide", egress={"rate": "1Gbit"}, ingress={"rate": "1Gbit"})
    s = lab.session(default="wide")
    sink = lab.launch(s, "sink")
    lab.launch(s, "src", profile="classes")
    assert sink.vm.ipv4
    v, b = concurrent_udp(s, "src", "sink", sink.vm.ipv4, tos_values=(0xB8, 0), seconds=4)
    v_frames = v.bits_per_second / UDP_GOODPUT
    b_frames = b.bits_per_second / UDP_GOODPUT
    print(f"voice {v_frames / 1e6:.2f} Mbit/s, bulk {b_frames / 1e6:.2f} Mbit/s (frames)")
    # The guarantees add up to the rate: each class gets its own, within 5 %.
    assert abs(v_frames / 6e6 - 1) <= 0.05, (v, b)
    assert abs(b_frames / 4e6 - 1) <= 0.05, (v, b)
    # UDP reads ~2 % high (the queue drains after the sender stops); the shaper cap holds.
    assert v_frames + b_frames <= 1.05 * 10e6, (v, b)
