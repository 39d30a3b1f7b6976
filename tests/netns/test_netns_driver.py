"""The netns driver on the real kernel: shaping measured with iperf3, isolation with
ping and TCP, MAC and TCP settings read from inside the VM, cleanup."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.conftest import Lab, launch_in_child, leftovers
from vnic.dataplane import namespaces as nsops
from vnic.dataplane.tc import read_class_counters
from vnic.errors import DataplaneError, Unsupported
from vnic.lab.measure import TCP_GOODPUT, iperf3, ping
from vnic.manager.results import VmRequest
from vnic.model.units import MacAddress, MacRange, Rate
from vnic.plan import names
from vnic.plan.compile import DEFAULT_MINOR


def goodput_ratio(measured: float, rate: float) -> float:
    """Measured TCP goodput over what the frame rate allows."""
    return measured / (rate * TCP_GOODPUT)


def test_each_direction_gets_its_own_rate(lab: Lab) -> None:
    lab.profile(name="asym", egress={"rate": "10Mbit"}, ingress={"rate": "20Mbit"})
    lab.profile(name="wide", egress={"rate": "1Gbit"}, ingress={"rate": "1Gbit"})
    s = lab.session(default="wide")
    lab.launch(s, "peer")
    client = lab.launch(s, "client", profile="asym")
    peer_ip = lab.service.explain(s, "peer").vm.ipv4
    assert peer_ip and client.vm.ipv4
    up = iperf3(s, "client", "peer", peer_ip, seconds=3)  # client egress: 10 Mbit/s
    down = iperf3(
        s, "client", "peer", peer_ip, seconds=3, reverse=True
    )  # client ingress: 20 Mbit/s
    assert 0.95 <= goodput_ratio(up.bits_per_second, 10e6) <= 1.03, up
    assert 0.95 <= goodput_ratio(down.bits_per_second, 20e6) <= 1.03, down
    # The shaped classes counted that traffic: egress on the IFB, ingress on the port.
    links = names.VmLinks.of("client")
    counters = read_class_counters(names.session_netns(s))
    assert counters[(links.ifb, DEFAULT_MINOR)].bytes >= up.bytes
    assert counters[(links.port, DEFAULT_MINOR)].bytes >= down.bytes


def test_saturated_low_rate_keeps_latency_bounded(lab: Lab) -> None:
    lab.profile(name="slow", egress={"rate": "1Mbit"}, ingress={"rate": "1Mbit"})
    s = lab.session(default="slow")
    lab.launch(s, "a")
    b = lab.launch(s, "b")
    assert b.vm.ipv4
    load = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from vnic.lab.measure import iperf3; iperf3({s!r}, 'a', 'b', {b.vm.ipv4!r}, seconds=6)",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.5)
        rtts = ping(s, "a", b.vm.ipv4, count=10, interval=0.2)
    finally:
        load.wait(timeout=30)
    assert len(rtts) >= 8
    assert max(rtts) < 100, rtts


def test_mac_comes_from_the_profile_range_and_is_on_eth0(lab: Lab) -> None:
    lab.profile(
        name="ranged", mac_range="02:00:00:5e:00:00-02:00:00:5e:00:ff", egress={"rate": "100Mbit"}
    )
    s = lab.session(default="ranged")
    vm = lab.launch(s, "m")
    link = json.loads(lab.exec(s, "m", "ip", "-j", "link", "show", "eth0"))[0]
    assert link["address"] == vm.vm.mac
    assert MacAddress.parse(link["address"]) in MacRange.parse(
        "02:00:00:5e:00:00-02:00:00:5e:00:ff"
    )


def test_sessions_are_isolated(lab: Lab) -> None:
    lab.profile(name="open", egress={"rate": "100Mbit"}, ingress={"rate": "100Mbit"})
    a = lab.session(default="open")
    b = lab.session(default="open")
    lab.launch(a, "x")
    ay = lab.launch(a, "y")
    by = lab.launch(b, "y")
    assert ay.vm.ipv4 and by.vm.ipv4
    assert ping(a, "x", ay.vm.ipv4, count=2), "VMs of one session reach each other"
    assert ping(a, "x", by.vm.ipv4, count=2, timeout=0.5) == []
    assert by.vm.ipv6
    assert ping(a, "x", by.vm.ipv6, count=2, timeout=0.5) == []
    # TCP across sessions fails too: nothing routes there.
    proc = nsops.run(
        names.vm_netns(a, "x"),
        ["iperf3", "-c", by.vm.ipv4, "-t", "1", "--connect-timeout", "500"],
        capture_output=True,
        timeout=15,
    )
    assert proc.returncode != 0
    # ... and the session's own namespaces are all there is of it.
    assert set(leftovers(a)) == {f"vnic.{a}", f"vnic.{a}.x", f"vnic.{a}.y"}


def test_tcp_settings_are_set_inside_the_vm(lab: Lab) -> None:
    lab.profile(
        name="cubic",
        egress={"rate": "50Mbit"},
        tcp={"congestion_control": "cubic", "window_scaling": False, "sack": False},
    )
    lab.profile(name="bbr", egress={"rate": "50Mbit"}, tcp={"congestion_control": "bbr"})
    s = lab.session(default="bbr")
    server = lab.launch(s, "srv")
    lab.launch(s, "cub", profile="cubic")
    vm_ns = names.vm_netns(s, "cub")
    assert nsops.read_sysctl(vm_ns, "net.ipv4.tcp_window_scaling") == "0"
    assert nsops.read_sysctl(vm_ns, "net.ipv4.tcp_sack") == "0"
    assert nsops.read_sysctl(names.vm_netns(s, "srv"), "net.ipv4.tcp_congestion_control") == "bbr"
    assert server.vm.ipv4
    # ss inside the VM shows the algorithm of a live connection.
    srv = nsops.popen(names.vm_netns(s, "srv"), ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        client = nsops.popen(
            vm_ns, ["iperf3", "-c", server.vm.ipv4, "-t", "3"], stdout=subprocess.DEVNULL
        )
        time.sleep(1.5)
        info = lab.exec(s, "cub", "ss", "-tni", "dst", server.vm.ipv4)
        client.wait(timeout=20)
    finally:
        srv.wait(timeout=20)
    assert "cubic" in info.split(), info
    # Both families' session routes carry it (read back by drift), IPv6 included.
    route6 = lab.exec(s, "cub", "ip", "-6", "route", "get", server.vm.ipv6)
    assert "congctl cubic" in route6, route6
    for _, request in lab.service.desired():
        assert lab.driver.drift(request) == [], request.vm
    assert "wscale" not in info  # window scaling off
    assert "sack" not in info.split()


def test_unsupported_field_is_refused_before_anything_is_touched(lab: Lab) -> None:
    lab.profile(name="peaky", egress={"rate": "10Mbit", "peak": "20Mbit"})
    s = lab.session(default="peaky")
    before = nsops.listing()
    with pytest.raises(Unsupported, match=r"egress\.peak"):
        lab.launch(s, "d")
    assert nsops.listing() == before
    assert lab.service.explain(s, "d").vm.state == "defined"


def test_failed_launch_leaves_nothing(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.profile(name="plain", egress={"rate": "10Mbit"}, ingress={"rate": "10Mbit"})
    s = lab.session(default="plain")
    lab.launch(s, "ok")
    session_links = set(_links(f"vnic.{s}"))

    def broken(ns: object, plan: object) -> None:
        raise DataplaneError("injected: class add refused")

    monkeypatch.setattr("vnic.drivers.hostside.verify", broken)
    with pytest.raises(DataplaneError, match="injected"):
        lab.launch(s, "bad")
    assert f"vnic.{s}.bad" not in nsops.listing()
    assert set(_links(f"vnic.{s}")) == session_links
    assert lab.service.explain(s, "bad").vm.state == "defined"


def _links(ns: str) -> list[str]:
    out = nsops.run(ns, ["ip", "-j", "link"], capture_output=True, timeout=10).stdout
    return [link["ifname"] for link in json.loads(out)]


def test_session_down_after_sigkill_of_the_launching_process(lab: Lab, tmp_path: Path) -> None:
    lab.profile(name="plain", egress={"rate": "10Mbit"}, ingress={"rate": "10Mbit"})
    s = lab.session(default="plain")
    for i in range(6):
        lab.service.add_vm(VmRequest(s, f"k{i}"))
    proc = launch_in_child(lab, s, [f"k{i}" for i in range(6)])
    # Kill it while it is part-way through (after the first VM exists).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        n.startswith(f"vnic.{s}.") for n in nsops.listing()
    ):
        time.sleep(0.01)
    time.sleep(0.15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert leftovers(s), "the killed launch had created something"
    stopped = lab.service.session_down(s, lab.agent)
    assert set(stopped) == {f"k{i}" for i in range(6)}
    assert leftovers(s) == []


def test_session_up_launches_in_parallel_and_reports_failures(lab: Lab) -> None:
    lab.profile(name="plain", egress={"rate": "50Mbit"}, ingress={"rate": "50Mbit"})
    s = lab.session(default="plain")
    for i in range(6):
        lab.service.add_vm(VmRequest(s, f"p{i}"))
    # One VM asks for something the driver cannot do here: it alone fails.
    lab.service.add_vm(VmRequest(s, "slow", patch={"egress.peak": Rate.parse("100Mbit")}))
    outcomes = lab.service.launch_many(
        s, [*[f"p{i}" for i in range(6)], "slow"], workers=2, agents=lab.agents
    )
    by_vm = {o.vm: o for o in outcomes}
    assert set(by_vm) == {*(f"p{i}" for i in range(6)), "slow"}
    assert by_vm["slow"].error and "egress.peak" in by_vm["slow"].error
    assert all(by_vm[f"p{i}"].error is None for i in range(6))
    assert sorted(lab.driver.running(s)) == sorted(f"p{i}" for i in range(6))
    states = {v.name: v.state for v in lab.service.list_vms(s)}
    assert states == {**{f"p{i}": "running" for i in range(6)}, "slow": "defined"}
    p5 = lab.service.explain(s, "p5").vm
    assert p5.ipv4 and ping(s, "p0", p5.ipv4, count=2)
