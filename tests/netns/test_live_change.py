"""Live change of running vNICs on the real kernel: a new rate under a TCP flow, objects
changed in place (nothing re-created), the delay engine changed without a restart, a
structural change that keeps the VM, and many VMs changed at once."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from typing import Any

import pytest

from tests.netns.conftest import Lab
from tests.netns.helpers import with_nic
from vnic.dataplane import delayd
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import read_class_counters
from vnic.lab.measure import TCP_GOODPUT, ping
from vnic.manager.results import VmRequest
from vnic.model.launch import LaunchRequest
from vnic.model.profile import parse_profile_document
from vnic.model.resolve import Layer, complete
from vnic.plan import names
from vnic.plan.compile import DEFAULT_MINOR

MBIT = 1_000_000


def request_of(lab: Lab, session: str, vm: str) -> LaunchRequest:
    return next(r for _, r in lab.service.desired() if (r.session, r.vm) == (session, vm))


def with_profile(request: LaunchRequest, **doc: Any) -> LaunchRequest:
    """``request`` with the fields of ``doc`` changed (the others as they were)."""
    spec = parse_profile_document({"name": "live", **doc})
    values = {k: v for k, v in request.values.items() if v is not None}
    eff = complete([Layer("session-default", "live", {**values, **spec.values})])
    return with_nic(request, profile=eff.profile, values=eff.values)


def in_session(session: str, *argv: str) -> str:
    proc = nsops.run(names.session_netns(session), argv, capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def classes(session: str, device: str) -> dict[str, str]:
    """Each HTB class of ``device`` as tc prints it, by class id (tc has no JSON for HTB)."""
    text = in_session(session, "tc", "class", "show", "dev", device)
    return {line.split()[2]: line for line in text.splitlines() if line.startswith("class")}


def snapshot(session: str, vm: str, devices: list[str]) -> dict[str, Any]:
    """Every kernel object of the VM that a live change could touch, read back."""
    vm_ns = names.vm_netns(session, vm)
    return {
        "qdiscs": {
            d: json.loads(in_session(session, "tc", "-j", "qdisc", "show", "dev", d))
            for d in devices
        },
        "classes": {d: classes(session, d) for d in devices},
        "filters": {d: in_session(session, "tc", "filter", "show", "dev", d) for d in devices},
        "sysctls": {
            key: nsops.read_sysctl(vm_ns, key)
            for key in ("net.ipv4.tcp_sack", "net.ipv4.tcp_congestion_control")
        },
        "engine": delayd.running_arguments(session, vm),
    }


def test_rate_change_under_a_tcp_flow(lab: Lab) -> None:
    # The queue holds more than the window iperf3 may have in flight (-w): whatever the
    # rate, nothing should overflow it, so any drop would be the change's doing.
    lab.profile(name="ten", ingress={"rate": "10Mbit", "queue": "256KB"})
    lab.profile(name="wide", egress={"rate": "1Gbit"})
    s = lab.session(default="wide")
    b = lab.launch(s, "b")
    lab.launch(s, "a", profile="ten")
    assert b.vm.ipv4
    before = request_of(lab, s, "a")
    faster = with_profile(before, ingress={"rate": "30Mbit"})
    leaf = (names.VmLinks.of("a").port, DEFAULT_MINOR)
    server = nsops.popen(
        names.vm_netns(s, "b"),
        ["iperf3", "-s", "-1", "-p", "5211"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    # Reverse: b sends, a receives, and a's intervals are what arrived (a sender's
    # 100 ms intervals show its socket buffer filling, not the wire).
    client = nsops.popen(
        names.vm_netns(s, "a"),
        ["iperf3", "-c", b.vm.ipv4, "-p", "5211", "-t", "6", "-i", "0.1", "-J", "-R", "-w", "128K"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    start = time.monotonic()
    try:
        time.sleep(2.0)
        drops_before = read_class_counters(names.session_netns(s))[leaf].drops
        t0 = time.perf_counter()
        lines = lab.driver.reconfigure(before, faster)
        took = time.perf_counter() - t0
        up_at = time.monotonic() - start
        time.sleep(0.5)
        drops_after = read_class_counters(names.session_netns(s))[leaf].drops
        time.sleep(1.5)
        down_at = time.monotonic() - start
        assert lab.driver.reconfigure(faster, before)
        out, err = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
        server.wait(timeout=10)
    assert client.returncode == 0, err
    data = json.loads(out)
    assert len(data["start"]["connected"]) == 1  # one connection throughout
    print(f"\nreconfigure 10 -> 30 Mbit/s took {took * 1000:.2f} ms: {lines}")
    assert any("rate 10Mbit -> 30Mbit" in line for line in lines), lines
    # iperf3's clock starts at its connection, a little after ours: times are within 0.1 s.
    intervals = [(i["sum"]["end"], i["sum"]["bits_per_second"]) for i in data["intervals"]]
    target = 30 * MBIT * TCP_GOODPUT * 0.8
    reached = next(end for end, bps in intervals if end > up_at and bps >= target)
    print(f"30 Mbit/s reached {reached - up_at:.2f} s after the change")
    assert reached - up_at <= 1.1, intervals
    steady = [bps for end, bps in intervals if up_at + 1.1 < end <= down_at - 0.1]
    assert steady and min(steady) >= target, steady
    slow = [bps for end, bps in intervals if end > down_at + 1.1]
    assert slow and max(slow) <= 10 * MBIT * 1.1, slow
    # A faster class drops nothing it would not have: no new drops right after the increase.
    print(f"drops at the ingress leaf across the increase: {drops_after - drops_before}")
    assert drops_after == drops_before == 0


def test_rate_change_touches_only_its_classes(lab: Lab) -> None:
    doc: dict[str, Any] = {
        "egress": {"rate": "10Mbit"},
        "ingress": {"rate": "20Mbit"},
        "qos": {
            "egress": [
                {"name": "voice", "priority": 0, "guaranteed": "1Mbit", "match": {"dscp": ["ef"]}}
            ]
        },
        "tcp": {"sack": False},
    }
    lab.profile(name="qos", **doc)
    s = lab.session(default="qos")
    lab.launch(s, "a")
    before = request_of(lab, s, "a")
    after = with_profile(before, **{**doc, "egress": {"rate": "20Mbit"}})
    links = names.VmLinks.of("a")
    devices = [links.ifb, links.port]
    old = snapshot(s, "a", devices)
    t0 = time.perf_counter()
    lines = lab.driver.reconfigure(before, after)
    took = time.perf_counter() - t0
    new = snapshot(s, "a", devices)
    print(f"\nrate-only reconfigure of one VM: {took * 1000:.2f} ms")
    assert lab.driver.drift(after) == []
    # Qdiscs: the same ones (kind, handle, parent); only the egress leaves' limits follow the rate.
    ident = [(q["kind"], q["handle"], q.get("parent")) for d in devices for q in old["qdiscs"][d]]
    assert ident == [
        (q["kind"], q["handle"], q.get("parent")) for d in devices for q in new["qdiscs"][d]
    ]
    changed_qdiscs = {
        q["handle"]
        for q, r in zip(old["qdiscs"][links.ifb], new["qdiscs"][links.ifb], strict=True)
        if q != r
    }
    assert changed_qdiscs <= {"2:", "10:"}, changed_qdiscs
    assert old["qdiscs"][links.port] == new["qdiscs"][links.port]
    before_classes, after_classes = old["classes"][links.ifb], new["classes"][links.ifb]
    assert before_classes.keys() == after_classes.keys()
    changed = {c for c in before_classes if before_classes[c] != after_classes[c]}
    # The total, the default class, and voice's ceiling (the direction's rate); voice keeps
    # its guarantee and priority.
    assert changed == {"1:1", "1:10", "1:ffff"}, changed
    assert "rate 1Mbit" in after_classes["1:10"] and "ceil 20Mbit" in after_classes["1:10"]
    assert old["classes"][links.port] == new["classes"][links.port]
    assert old["filters"] == new["filters"]
    assert old["sysctls"] == new["sysctls"] and old["engine"] == new["engine"]
    assert len(lines) == len(changed) + len(changed_qdiscs), lines


def test_delay_change_in_the_running_engine(lab: Lab) -> None:
    doc = {"egress": {"rate": "100Mbit", "delay": "10ms"}}
    lab.profile(name="d10", **doc)
    lab.profile(name="plain")
    s = lab.session(default="plain")
    b = lab.launch(s, "b")
    lab.launch(s, "a", profile="d10")
    assert b.vm.ipv4
    before = request_of(lab, s, "a")
    after = with_profile(before, egress={"rate": "100Mbit", "delay": "40ms"})
    rtt_before = ping(s, "a", b.vm.ipv4, count=5, interval=0.05)
    stats_before = delayd.read_stats(s, "a")
    assert stats_before is not None
    t0 = time.perf_counter()
    lines = lab.driver.reconfigure(before, after)
    took = time.perf_counter() - t0
    print(f"\ndelay 10 -> 40 ms in the running engine: {took * 1000:.2f} ms: {lines}")
    rtt_after = ping(s, "a", b.vm.ipv4, count=5, interval=0.05)
    stats_after = delayd.read_stats(s, "a")
    assert stats_after is not None
    assert stats_after.pid == stats_before.pid  # not restarted
    egress_before, egress_after = (
        stats_before.directions["egress"],
        stats_after.directions["egress"],
    )
    assert egress_after["rx_frames"] >= egress_before["rx_frames"] + 5  # kept counting
    # Medians: a first ping may wait for ARP, which the engine delays too.
    assert 9.5 <= statistics.median(rtt_before) < 15, rtt_before
    assert 39.5 <= statistics.median(rtt_after) < 45, rtt_after
    assert lab.driver.drift(after) == []
    assert delayd.running_arguments(s, "a") == delayd.expected_arguments(
        s,
        "a",
        lab.driver.plan_for(after).engine,  # type: ignore[arg-type]
    )


def test_structural_change_keeps_the_vm_and_its_connection(lab: Lab) -> None:
    lab.profile(name="shaped", egress={"rate": "20Mbit"}, ingress={"rate": "20Mbit"})
    s = lab.session(default="shaped")
    b = lab.launch(s, "b")
    lab.launch(s, "a")
    assert b.vm.ipv4
    before = request_of(lab, s, "a")
    delayed = with_profile(
        before, egress={"rate": "20Mbit", "delay": "5ms"}, ingress={"rate": "20Mbit"}
    )
    vm_ns = names.vm_netns(s, "a")
    sleeper = nsops.popen(vm_ns, ["sleep", "30"])
    server = nsops.popen(
        names.vm_netns(s, "b"),
        ["iperf3", "-s", "-1", "-p", "5212"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        client = nsops.popen(
            vm_ns,
            ["iperf3", "-c", b.vm.ipv4, "-p", "5212", "-t", "4", "-b", "5M", "-J"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        t0 = time.perf_counter()
        lines = lab.driver.reconfigure(before, delayed)
        took = time.perf_counter() - t0
        print(f"\nstructural change (delay engine added): {took * 1000:.1f} ms: {lines}")
        assert any("traffic pauses briefly" in line for line in lines), lines
        out, err = client.communicate(timeout=20)
        assert client.returncode == 0, err
        assert len(json.loads(out)["start"]["connected"]) == 1
        assert sleeper.poll() is None  # the VM's process lives on
        assert lab.driver.drift(delayed) == []
        assert delayd.running(s, "a")
        assert statistics.median(ping(s, "a", b.vm.ipv4, count=5, interval=0.05)) >= 5
        # ... and back: the engine and its relay go, the VM stays.
        lab.driver.reconfigure(delayed, before)
        assert lab.driver.drift(before) == []
        assert not delayd.running(s, "a") and sleeper.poll() is None
        assert statistics.median(ping(s, "a", b.vm.ipv4, count=5, interval=0.05)) < 5
    finally:
        sleeper.kill()
        sleeper.wait(timeout=5)
        server.kill()
        server.wait(timeout=5)


@pytest.mark.timeout(120)
def test_many_vms_rate_change_at_once(lab: Lab) -> None:
    count = 100
    lab.profile(name="base", egress={"rate": "10Mbit"}, ingress={"rate": "10Mbit"})
    s = lab.session(default="base")
    vms = [f"v{i}" for i in range(count)]
    for vm in vms:
        lab.service.add_vm(VmRequest(s, vm))
    outcomes = lab.service.launch_many(s, vms, agents=lab.agents)
    assert [o.error for o in outcomes if o.error] == []
    pairs = []
    for vm in vms:
        r = request_of(lab, s, vm)
        pairs.append((r, with_profile(r, egress={"rate": "20Mbit"}, ingress={"rate": "10Mbit"})))
    t0 = time.perf_counter()
    result = lab.driver.reconfigure_many(pairs)
    took = time.perf_counter() - t0
    print(f"\nrate-only reconfigure of {count} VMs: {took * 1000:.1f} ms")
    assert result.keys() == {(s, vm) for vm in vms}
    for lines in result.values():
        assert isinstance(lines, list) and lines, lines
        assert all(line.startswith("egress: ") for line in lines), lines
    # How fast is the benchmark's business (vnic bench change: a profile PATCH reaching
    # 100 kernels, p99 target 100 ms), not a test's: on a loaded 2-core CI machine this
    # one batch once took 151 ms where it usually takes about 20.
    drift = lab.driver.drift_many([new for _, new in pairs])
    assert drift == {(s, vm): [] for vm in vms}
