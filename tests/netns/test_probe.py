"""The capability probe on the real kernel."""

from __future__ import annotations

from tests.netns.conftest import doctor_json
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.probe import run_probe
from vnic.drivers.netns import capabilities_from_probe


def _tc_accepts(kind: str, *args: str) -> bool:
    ns = "vnic.probe-check"
    nsops.remove(ns)
    nsops.create(ns)
    try:
        nsops.run(ns, ["ip", "link", "add", "c0", "type", "veth", "peer", "name", "c1"], check=True)
        return (
            nsops.run(
                ns, ["tc", "qdisc", "add", "dev", "c0", "root", kind, *args], capture_output=True
            ).returncode
            == 0
        )
    finally:
        nsops.remove(ns)


def test_probe_agrees_with_trying_by_hand_and_cleans_up() -> None:
    before = nsops.listing()
    probe = run_probe()
    assert nsops.listing() == before
    assert probe.has("qdisc:htb") and probe.has("link:ifb") and probe.has("action:mirred")
    assert probe.has("qdisc:netem") == _tc_accepts("netem", "delay", "1ms")
    assert probe.has("qdisc:sfq") == _tc_accepts("sfq")
    assert set(probe.congestion_control) >= {"reno"}


def test_capabilities_follow_the_probe() -> None:
    probe = run_probe()
    caps = capabilities_from_probe(probe)
    assert "egress.rate" in caps.fields and "qos.ingress" in caps.fields
    # Delay and loss: netem where the kernel has it, else the vnic delay engine.
    assert probe.has("qdisc:netem") or probe.has("engine:delayd")
    assert "egress.delay" in caps.fields and "ingress.loss" in caps.fields
    probe.qdiscs["netem"] = probe.engines["netem"] = probe.engines["delayd"] = False
    neither = capabilities_from_probe(probe)
    assert "egress.delay" not in neither.fields
    assert "netem (missing on this kernel)" in neither.missing["egress.delay"]
    probe.actions["mirred"] = False
    crippled = capabilities_from_probe(probe)
    assert "egress.rate" not in crippled.fields
    assert "action:mirred" in crippled.missing["egress.rate"]


def test_doctor_json() -> None:
    data = doctor_json()
    assert data["kernel"]["qdiscs"]["htb"] is True
    assert data["drivers"][0]["kind"] == "netns"
    assert data["tools_missing"] == []
