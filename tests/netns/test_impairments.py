"""Delay, jitter, loss, duplication, corruption and reordering, measured with real packets.

Engine-agnostic: the driver picks netem where the kernel has it (the
stock-kernel guest, see scripts/guest) and the vnic delay engine where it
does not (this machine). Tests marked ``delayd`` check the engine itself.
Tolerances here are wider than the benchmark targets (bench/ reports
those) so that a loaded CI machine does not fail a correct build; each
still fails on a wrong implementation (no delay, wrong distribution,
reordering, loss outside a 99.9 % interval, no bursts).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any

import pytest

from tests.netns.conftest import Lab, doctor_json, launch_in_child, leftovers
from vnic.dataplane import delayd
from vnic.dataplane import namespaces as nsops
from vnic.drivers.netns import choose_engine
from vnic.lab import measure, stats
from vnic.manager.results import VmRequest
from vnic.plan import names

MS = 1_000_000
Z999 = 3.29
#: Multiplies every timing tolerance: 1 here; the stock-kernel guest under
#: software emulation (scripts/guest) sets more, since a process there can be
#: descheduled for milliseconds. Statistical checks (loss intervals, order,
#: bursts, seeds) never widen.
SLACK = float(os.environ.get("VNIC_TEST_TIMING_SLACK", "1"))


def _pair(lab: Lab, **doc: Any) -> tuple[str, str]:
    """A session with VM ``a`` (the profile) and plain VMs ``b`` (peer) and ``c`` (baseline)."""
    lab.profile(name="imp", **doc)
    lab.profile(name="plain")
    s = lab.session(default="plain")
    lab.launch(s, "a", profile="imp")
    b = lab.launch(s, "b")
    lab.launch(s, "c")
    assert b.vm.ipv4
    return s, b.vm.ipv4


def _added(lab: Lab, s: str, b_ip: str, **kw: Any) -> tuple[measure.OneWay, measure.OneWay]:
    """irtt from the impaired VM and from the baseline VM to ``b``."""
    base = measure.one_way(s, "c", "b", b_ip, **kw)
    got = measure.one_way(s, "a", "b", b_ip, **kw)
    return got, base


def test_constant_delay_each_direction(lab: Lab) -> None:
    s, b_ip = _pair(lab, egress={"delay": "20ms"}, ingress={"delay": "5ms"})
    got, base = _added(lab, s, b_ip, interval="10ms", duration="3s")
    up = stats.quantile(got.up(), 0.5) - stats.quantile(base.up(), 0.5)
    down = stats.quantile(got.down(), 0.5) - stats.quantile(base.down(), 0.5)
    assert abs(up - 20 * MS) <= SLACK * max(0.3 * MS, 0.03 * 20 * MS), up
    assert abs(down - 5 * MS) <= SLACK * max(0.3 * MS, 0.03 * 5 * MS), down
    # No jitter configured: the tail stays close to the median (the benchmark
    # holds it to 0.5 ms; here a loaded CI machine gets more room).
    assert stats.quantile(got.up(), 0.99) - stats.quantile(got.up(), 0.5) < SLACK * 5 * MS
    assert not got.lost_up
    # Order by irtt's receive timestamps; under emulation (SLACK > 1) those
    # can disagree with arrival order, so there only the kernel-order test
    # (test_jitter_keeps_order_and_reorder_is_opt_in) judges reordering.
    assert got.reordered_up == 0 or SLACK > 1


@pytest.mark.parametrize(
    ("distribution", "sigma_per_jitter"),
    [("uniform", 1 / 3**0.5), ("normal", 1.0), ("pareto", 1.0), ("paretonormal", 1.0)],
)
def test_jitter_follows_its_distribution(
    lab: Lab, distribution: str, sigma_per_jitter: float
) -> None:
    jitter = 4 * MS
    # The standard deviation of n truncated-Pareto delays varies by 1.5/sqrt(n)
    # of itself (simulated): 7 % for 400 probes, so with a seed from the random
    # session name one run in 25 missed 15 % on a correct engine. Pareto shapes
    # get 800 probes, and the seed is pinned so that the engine draws the same
    # delays on every run (a run then differs only in which draws ARP and NDP
    # frames take). netem (the guest) takes no seed before Linux 6.3; SLACK
    # widens the bound there.
    s, b_ip = _pair(
        lab, seed=1, egress={"delay": "40ms", "jitter": "4ms", "distribution": distribution}
    )
    probes = 800 if distribution.startswith("pareto") else 400
    # Probes 25 ms apart: order-keeping rarely has to hold one back, so the
    # delays show the configured distribution itself.
    got = measure.one_way(s, "a", "b", b_ip, interval="25ms", duration=f"{probes // 40}s")
    delays = got.up()
    assert len(delays) > probes * 0.9
    sigma = stats.stdev(delays)
    assert abs(sigma / (jitter * sigma_per_jitter) - 1) < 0.15 * SLACK, sigma
    assert abs(stats.mean(delays) - 40 * MS) < 1.5 * MS * SLACK
    skew = stats.skewness(delays)
    if distribution in ("uniform", "normal"):
        assert abs(skew) < 0.6 * SLACK, skew
    else:
        assert skew > 0.8, skew  # the long right tail of Pareto
    if distribution == "uniform":
        assert min(delays) > 40 * MS - jitter - 0.2 * MS
    assert got.reordered_up == 0 or SLACK > 1  # see test_constant_delay_each_direction


def test_jitter_keeps_order_and_reorder_is_opt_in(lab: Lab) -> None:
    lab.profile(name="keep", egress={"delay": "10ms", "jitter": "5ms"})
    lab.profile(name="shuffle", egress={"delay": "10ms", "jitter": "5ms", "reorder": "20%"})
    lab.profile(name="plain")
    s = lab.session(default="plain")
    lab.launch(s, "k", profile="keep")
    lab.launch(s, "r", profile="shuffle")
    b = lab.launch(s, "b")
    assert b.vm.ipv4
    # 2000 datagrams 0.5 ms apart: jitter of +-5 ms would reorder most of them.
    kept = measure.udp_sequence(s, "k", "b", b.vm.ipv4, count=2000, pps=2000)
    shuffled = measure.udp_sequence(s, "r", "b", b.vm.ipv4, count=2000, pps=2000, port=9001)
    assert len(kept) >= 1990
    inverted = sum(1 for x, y in itertools.pairwise(kept) if y < x)
    # Natively: no inversion at all. In the emulated guest (SLACK > 1) one run
    # in three showed a few frames out of order behind netem (which releases
    # in order); we suspect the guest's later hops under TCG and allow 0.5 %.
    assert inverted == 0 or (SLACK > 1 and inverted <= len(kept) // 200), inverted
    inversions = sum(1 for x, y in itertools.pairwise(shuffled) if y < x)
    assert inversions > 100


def test_random_loss_inside_its_interval(lab: Lab) -> None:
    s, b_ip = _pair(lab, egress={"loss": "5%"})
    got = measure.udp_sequence(s, "a", "b", b_ip, count=6000, pps=3000)
    lost = 6000 - len(set(got))
    lo, hi = stats.binomial_interval(0.05, 6000, Z999)
    assert lo <= lost <= hi, (lost, lo, hi)
    # Random loss: bursts are mostly single packets.
    runs = stats.loss_bursts(set(range(6000)) - set(got))
    assert stats.mean(runs) < 1.25


def test_gilbert_elliott_loss_has_its_mean_and_bursts(lab: Lab) -> None:
    s, b_ip = _pair(lab, egress={"loss": {"mean": "5%", "burst_length": 5}})
    n = 12000
    got = set(measure.udp_sequence(s, "a", "b", b_ip, count=n, pps=4000))
    lost = set(range(n - 10)) - got  # the tail may still be in flight when sending stops
    runs = stats.loss_bursts(lost)
    assert len(runs) > 40
    assert 3.5 < stats.mean(runs) < 6.5, stats.mean(runs)
    assert 0.025 < len(lost) / n < 0.08, len(lost) / n


def test_duplicate_and_corrupt(lab: Lab) -> None:
    s, b_ip = _pair(lab, egress={"duplicate": "10%", "corrupt": "10%"})
    n = 4000
    got = measure.udp_sequence(s, "a", "b", b_ip, count=n, pps=2000)
    duplicates = len(got) - len(set(got))
    # A corrupted datagram fails its UDP checksum and is dropped by the receiver.
    missing = n - len(set(got))
    for count in (duplicates, missing):
        lo, hi = stats.binomial_interval(0.10, n, Z999)
        # a duplicate of a corrupted datagram can be corrupted too: widen a little
        assert lo - 20 <= count <= hi + 20, (duplicates, missing)


def test_tcp_through_100ms_fills_the_rate(lab: Lab) -> None:
    """Once the flow has converged, TCP through 100 ms carries the whole rate.

    How long slow start takes depends on the machine (an emulated one ramps for
    seconds), so the flow runs long enough for a slow one and the test judges its best
    three consecutive seconds as the receiver counts them (b runs the iperf3 client in
    reverse: a sends), not a fixed window after the start."""
    lab.profile(name="imp", egress={"rate": "20Mbit", "delay": "100ms"})
    lab.profile(name="plain")
    s = lab.session(default="plain")
    a = lab.launch(s, "a", profile="imp")
    lab.launch(s, "b")
    assert a.vm.ipv4
    got = measure.iperf3(
        s, "b", "a", a.vm.ipv4, reverse=True, seconds=8 * SLACK, omit=0, interval=1
    )
    windows = [stats.mean(list(got.intervals[i : i + 3])) for i in range(len(got.intervals) - 2)]
    goodput = 20e6 * measure.TCP_GOODPUT
    assert windows and max(windows) > (1 - 0.07 * SLACK) * goodput, got.intervals
    # and the shaper holds it to the rate (a second may carry a burst the bucket saved)
    assert stats.quantile(got.intervals, 0.5) < 1.03 * goodput, got.intervals


needs_delayd = pytest.mark.skipif(
    os.geteuid() == 0 and choose_engine().engine != "delayd",
    reason="checks the vnic delay engine, which runs only where netem is missing",
)


@needs_delayd
def test_same_seed_same_loss_decisions(lab: Lab) -> None:
    s, b_ip = _pair(lab, seed=42, egress={"loss": "10%"})
    for vm in ("a", "b"):
        # Silence the VMs' own IPv6 and ARP chatter so the engine sees only the test's datagrams.
        lab.exec(s, vm, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
    a_mac = lab.service.explain(s, "a").vm.mac
    lab.exec(
        s,
        "a",
        "ip",
        "neigh",
        "replace",
        b_ip,
        "lladdr",
        lab.service.explain(s, "b").vm.mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    )
    a_ip = lab.service.explain(s, "a").vm.ipv4
    lab.exec(
        s,
        "b",
        "ip",
        "neigh",
        "replace",
        str(a_ip),
        "lladdr",
        a_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    )
    runs = []
    for port in (9100, 9101):
        delayd.restart(names.session_netns(s), s, "a")  # a fresh engine, same seed
        got = set(measure.udp_sequence(s, "a", "b", b_ip, count=1500, pps=3000, port=port))
        runs.append(set(range(1490)) - got)
    assert runs[0] == runs[1]
    assert 80 < len(runs[0]) < 230


@needs_delayd
def test_engine_counters(lab: Lab) -> None:
    s, b_ip = _pair(lab, egress={"delay": "5ms", "loss": "20%"})
    before = lab.driver.engine_stats(s, "a")
    assert before is not None
    measure.udp_sequence(s, "a", "b", b_ip, count=1000, pps=2000)
    after = lab.driver.engine_stats(s, "a")
    assert after is not None
    eg = {
        k: after.directions["egress"][k] - before.directions["egress"][k]
        for k in after.directions["egress"]
    }
    # Every datagram was sent (udp_sequence checks the sender's count; it used to skip
    # the last few when descheduled at the end): each one the engine did not read was
    # dropped by its socket, and counted there. The VM's ARP and ping frames come too.
    assert eg["rx_frames"] + eg["socket_drops"] >= 1000
    assert (
        eg["rx_frames"]
        == eg["tx_frames"]
        + eg["dropped_loss"]
        + after.directions["egress"]["held_frames"]
        - before.directions["egress"]["held_frames"]
    )
    lo, hi = stats.binomial_interval(0.2, eg["rx_frames"], Z999)
    assert lo <= eg["dropped_loss"] <= hi


@needs_delayd
def test_engine_stops_with_its_vm_and_after_a_killed_launch(lab: Lab) -> None:
    lab.profile(name="slow", egress={"delay": "10ms"})
    s = lab.session(default="slow")
    lab.launch(s, "x")
    pid = lab.driver.engine_stats(s, "x").pid  # type: ignore[union-attr]
    # The VM's namespace disappears behind vnic's back: its engine notices and exits.
    nsops.remove(names.vm_netns(s, "x"))
    nsops.unplug_vm(names.session_netns(s), s, "x")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not delayd.running(s, "x")

    # A launching process killed with SIGKILL: session down still removes everything.
    for i in range(3):
        lab.service.add_vm(VmRequest(s, f"k{i}"))
    proc = launch_in_child(lab, s, [f"k{i}" for i in range(3)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not delayd.recorded(s):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    engines = [delayd.read_stats(s, vm) for vm in delayd.recorded(s)]
    lab.service.session_down(s, lab.agent)
    assert leftovers(s) == []
    for e in engines:
        if e is not None:
            assert not os.path.exists(f"/proc/{e.pid}")
    assert not delayd.run_dir(s).exists()


needs_netem = pytest.mark.skipif(
    os.geteuid() == 0 and choose_engine().engine != "netem",
    reason="netem is missing on this kernel; CI runs this in the stock-kernel guest (scripts/guest)",
)


@needs_netem
def test_netem_sits_under_htb_with_a_bdp_limit_and_pacing(lab: Lab) -> None:
    import json

    s, _ = _pair(lab, egress={"rate": "10Mbit", "delay": "20ms", "jitter": "5ms"})
    out = nsops.run_inside(
        names.session_netns(s), ["tc", "-j", "qdisc", "show"], capture_output=True, check=True
    ).stdout
    links = names.VmLinks.of("a")
    netems = [q for q in json.loads(out) if q["kind"] == "netem" and q["dev"] == links.ifb]
    assert [q["parent"] for q in netems] == ["1:ffff"]
    opts = netems[0]["options"]
    # rate x (delay + jitter) + queue in full frames, not netem's default 1000
    assert 20 <= opts["limit"] < 1000
    assert opts["delay"]["delay"] == pytest.approx(0.020) and opts["delay"][
        "jitter"
    ] == pytest.approx(0.005)
    assert opts["rate"]["rate"] == 10_000_000 // 8


def test_doctor_names_each_vnics_engine(lab: Lab) -> None:
    s, _ = _pair(lab, egress={"delay": "5ms", "loss": "1%"})
    data = doctor_json()
    mine = {v["vm"]: v for v in data["vnics"] if v["session"] == s}
    expected = choose_engine().engine
    assert data["delay_engine"]["engine"] == expected
    assert mine["a"]["engine"] == expected and mine["a"]["why"]
    assert mine["b"]["engine"] == "none"
    if expected == "delayd":
        assert mine["a"]["counters"]["egress"]["rx_frames"] >= 0
