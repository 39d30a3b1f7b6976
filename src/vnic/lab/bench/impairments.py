"""Benchmark: delay, jitter and loss as configured vs as measured with real packets.

Cells (each a VM with its own profile, measured against a plain peer):

* delay {1, 10, 50, 200} ms, no jitter: irtt one-way delay (both ends on this
  host's clock) minus the same path without impairment; median error and
  p99 - median;
* jitter {1, 10} ms x {uniform, normal, pareto, paretonormal} on 50 ms:
  standard deviation vs the distribution's, reordering;
* order under jitter at 2000 packets/s, default mode;
* loss {0.1, 1, 5} % random and Gilbert–Elliott (mean 1 % and 5 %, bursts 2
  and 5): realised rate with its 95 % interval, mean burst length;
* the same seed twice (fresh engine, same packets): identical decisions;
* TCP through {10, 50, 200} ms at 100 Mbit/s; the engine's ceiling (TCP and
  60-byte UDP frames) through 20 ms +- 5 ms;
* a "mobile" profile (rate, delay, jitter, loss both ways at once).

Every cell records the engine that carried it and the CPU it used.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vnic.dataplane import delayd
from vnic.drivers.netns import choose_engine
from vnic.lab import stats
from vnic.lab.bench.base import Bench, bench_session
from vnic.lab.measure import TCP_GOODPUT, iperf3, one_way, udp_flood, udp_sequence
from vnic.plan import names

MS = 1_000_000
DELAYS_MS = (1, 10, 50, 200)
JITTERS_MS = (1, 10)
DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")
#: Standard deviation of each distribution per unit of jitter.
SIGMA_PER_JITTER = {"uniform": 1 / math.sqrt(3), "normal": 1.0, "pareto": 1.0, "paretonormal": 1.0}
RANDOM_LOSS = (0.001, 0.01, 0.05)
BURSTY_LOSS = ((0.01, 2.0), (0.01, 5.0), (0.05, 2.0), (0.05, 5.0))
PLAIN = {"name": "plain"}


class Cells:
    """A bench session with a plain peer per cell, so cells can run side by side."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.count = 0
        # Cells measure side by side, but set up one at a time: the service
        # and its database session are not shared between threads.
        self.lock = threading.Lock()

    def pair(self, **doc: Any) -> tuple[str, str, str]:
        """(vm, peer, peer address): a VM with profile ``doc`` and a fresh plain peer."""
        with self.lock:
            self.count += 1
            vm, peer = f"x{self.count}", f"p{self.count}"
            self.b.profile(name=f"cell{self.count}", **doc)
            self.b.launch(vm, profile=f"cell{self.count}")
            return vm, peer, self.b.launch(peer)

    def cpu(self, vm: str) -> float:
        s = delayd.read_stats(self.b.session, vm)
        return s.cpu_seconds if s else 0.0


def _parallel(jobs: list[Callable[[], dict[str, Any]]], workers: int = 4) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(workers) as pool:
        return [f.result() for f in [pool.submit(j) for j in jobs]]


CELLS = ("delay", "jitter", "order", "loss", "seed", "throughput", "mobile")


def impairments(quick: bool = False, cells_wanted: tuple[str, ...] = CELLS) -> dict[str, Any]:
    """Run the cells named in ``cells_wanted`` (all by default); ``quick`` shortens
    each measurement (for a smoke run)."""
    scale = 0.25 if quick else 1.0
    engine = choose_engine()
    rows: list[dict[str, Any]] = []
    with bench_session(PLAIN) as b:
        cells = Cells(b)
        base_vm, base_peer, base_ip = cells.pair()
        base = one_way(
            b.session, base_vm, base_peer, base_ip, interval="10ms", duration=f"{5 * scale}s"
        )
        base_up = stats.quantile(base.up(), 0.5)
        rows.append(
            {
                "kind": "baseline",
                "case": "no impairment",
                "median_one_way_us": round(base_up / 1e3, 1),
            }
        )
        wanted = set(cells_wanted)
        if "delay" in wanted:
            rows += _delay_cells(cells, base_up, scale)
        if "jitter" in wanted:
            rows += _jitter_cells(cells, scale)
        if "order" in wanted:
            rows += _order_cell(cells)
        if "loss" in wanted:
            rows += _loss_cells(cells, scale)
        if "seed" in wanted and engine.engine == "delayd":
            rows += _seed_cell(cells)  # netem before Linux 6.3 takes no seed
        if "throughput" in wanted:
            rows += _throughput_cells(cells, scale)
        if "mobile" in wanted:
            rows += _mobile_cell(cells, base_up, scale)
    return {
        "benchmark": "impairments",
        "engine": engine.engine,
        "engine_reason": engine.reason,
        "rows": rows,
    }


def _delay_cells(cells: Cells, base_up: float, scale: float) -> list[dict[str, Any]]:
    def cell(ms: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            vm, peer, ip = cells.pair(egress={"delay": f"{ms}ms"})
            cpu0 = cells.cpu(vm)
            got = one_way(cells.b.session, vm, peer, ip, interval="10ms", duration=f"{6 * scale}s")
            up = got.up()
            added = stats.quantile(up, 0.5) - base_up
            tail = stats.quantile(up, 0.99) - stats.quantile(up, 0.5)
            error = added - ms * MS
            return {
                "kind": "delay",
                "case": f"delay {ms}ms",
                "configured_ms": ms,
                "measured_ms": round(added / MS, 4),
                "ratio": round(added / (ms * MS), 4),
                "median_error_us": round(error / 1e3, 1),
                "p99_minus_median_us": round(tail / 1e3, 1),
                "samples": len(up),
                "reordered": got.reordered_up,
                "pass": abs(error) <= max(100_000, 0.02 * ms * MS) and tail <= 500_000,
                "engine_cpu_s": round(cells.cpu(vm) - cpu0, 3),
            }

        return run

    # One at a time: cells running side by side would disturb each other's tails.
    return [cell(ms)() for ms in DELAYS_MS]


def _jitter_cells(cells: Cells, scale: float) -> list[dict[str, Any]]:
    def cell(jitter_ms: int, dist: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            vm, peer, ip = cells.pair(
                egress={"delay": "50ms", "jitter": f"{jitter_ms}ms", "distribution": dist}
            )
            # Probes far enough apart that keeping order rarely holds one back;
            # enough of them that the spread of a Pareto sample settles (its
            # standard deviation is known to about 2 % from 4000).
            interval_ms = max(10, 6 * jitter_ms)
            samples = 4000 if jitter_ms < 5 else 1500
            got = one_way(
                cells.b.session,
                vm,
                peer,
                ip,
                interval=f"{interval_ms}ms",
                duration=f"{samples * interval_ms * scale / 1000}s",
            )
            up = got.up()
            want = jitter_ms * MS * SIGMA_PER_JITTER[dist]
            sigma = stats.stdev(up)
            return {
                "kind": "jitter",
                "case": f"jitter {jitter_ms}ms {dist}",
                "configured_sigma_ms": round(want / MS, 4),
                "measured_sigma_ms": round(sigma / MS, 4),
                "ratio": round(sigma / want, 4),
                "mean_ms": round(stats.mean(up) / MS, 3),
                "skewness": round(stats.skewness(up), 3),
                "samples": len(up),
                "reordered": got.reordered_up,
                "pass": abs(sigma / want - 1) <= 0.05 and got.reordered_up == 0,
            }

        return run

    return _parallel([cell(j, d) for j in JITTERS_MS for d in DISTRIBUTIONS])


def _order_cell(cells: Cells) -> list[dict[str, Any]]:
    vm, peer, ip = cells.pair(egress={"delay": "20ms", "jitter": "10ms", "distribution": "normal"})
    got = udp_sequence(cells.b.session, vm, peer, ip, count=6000, pps=2000)
    inversions = sum(1 for x, y in itertools.pairwise(got) if y < x)
    return [
        {
            "kind": "order",
            "case": "jitter 10ms normal at 2000 pkt/s, default mode",
            "sent": 6000,
            "received": len(got),
            "reordered": inversions,
            "pass": inversions == 0,
        }
    ]


def _loss_row(
    case: str, n: int, lost: set[int], mean: float, burst: float | None
) -> dict[str, Any]:
    lo, hi = _interval(mean, burst, n)
    runs = stats.loss_bursts(lost)
    mean_burst = stats.mean(runs) if runs else 0.0
    burst_ok = burst is None or abs(mean_burst / burst - 1) <= 0.10
    ok = lo <= len(lost) <= hi and burst_ok
    w_lo, w_hi = stats.wilson(len(lost), n)
    return {
        "kind": "loss",
        "case": case,
        "configured_percent": mean * 100,
        "measured_percent": round(100 * len(lost) / n, 4),
        "interval_95_percent": [round(100 * w_lo, 4), round(100 * w_hi, 4)],
        "expected_count_95": [lo, hi],
        "lost": len(lost),
        "packets": n,
        "mean_burst": round(mean_burst, 3),
        "configured_burst": burst or 1.0,
        "burst_ok": burst_ok,
        "pass": ok,
    }


def _interval(mean: float, burst: float | None, n: int) -> tuple[int, int]:
    """95 % interval of the loss count: binomial for random loss, widened for bursts."""
    if burst is None:
        return stats.binomial_interval(mean, n)
    return stats.gilbert_interval(mean, burst, n)


def _loss_cells(cells: Cells, scale: float) -> list[dict[str, Any]]:
    def cell(mean: float, burst: float | None) -> Callable[[], dict[str, Any]]:
        # Enough loss bursts that the mean burst length is known to about 3 %
        # (a geometric length of mean b has a standard deviation of about b).
        n = int(scale * (max(100_000, 250 * burst**2 / mean) if burst else 100_000))

        def run() -> dict[str, Any]:
            loss: Any = (
                f"{mean * 100:g}%"
                if burst is None
                else {"mean": f"{mean * 100:g}%", "burst_length": burst}
            )
            vm, peer, ip = cells.pair(egress={"loss": loss})
            before = delayd.read_stats(cells.b.session, vm)
            got = set(udp_sequence(cells.b.session, vm, peer, ip, count=n, pps=20000, port=9000))
            after = delayd.read_stats(cells.b.session, vm)
            sent = n - 20  # the tail may be cut by the sender's clock; judge the rest
            lost = set(range(sent)) - got
            name = (
                f"random {mean * 100:g}%"
                if burst is None
                else f"gilbert-elliott {mean * 100:g}% bursts {burst:g}"
            )
            row = _loss_row(name, sent, lost, mean, burst)
            if before and after:
                # The engine's own decisions: what the loss model did, apart
                # from anything the measuring path itself dropped.
                e0, e1 = before.directions["egress"], after.directions["egress"]
                frames = e1["rx_frames"] - e0["rx_frames"]
                dropped = e1["dropped_loss"] - e0["dropped_loss"]
                lo, hi = _interval(mean, burst, frames)
                row["engine_frames"] = frames
                row["engine_lost_percent"] = round(100 * dropped / frames, 4)
                row["engine_in_interval"] = lo <= dropped <= hi
                row["measuring_path_lost"] = len(lost) - dropped
                row["pass"] = row["engine_in_interval"] and row["burst_ok"]
            return row

        return run

    jobs = [cell(m, None) for m in RANDOM_LOSS] + [cell(m, bl) for m, bl in BURSTY_LOSS]
    return [job() for job in jobs]


def _seed_cell(cells: Cells) -> list[dict[str, Any]]:
    b = cells.b
    vm, peer, ip = cells.pair(seed=2026, egress={"loss": "10%"})
    quiet(b, vm, peer, ip)
    runs = []
    for port in (9100, 9101):
        delayd.restart(names.session_netns(b.session), b.session, vm)
        got = set(udp_sequence(b.session, vm, peer, ip, count=5000, pps=5000, port=port))
        runs.append(set(range(4980)) - got)
    return [
        {
            "kind": "seed",
            "case": "same seed, same packets, fresh engine",
            "lost_first": len(runs[0]),
            "lost_second": len(runs[1]),
            "identical": runs[0] == runs[1],
            "pass": runs[0] == runs[1],
        }
    ]


def quiet(b: Bench, vm: str, peer: str, peer_ip: str) -> None:
    """Stop the two VMs' own IPv6 and ARP traffic, so only measured datagrams cross."""
    vm_info = b.service.explain(b.session, vm).vm
    peer_info = b.service.explain(b.session, peer).vm
    for name, other_ip, other_mac in (
        (vm, peer_ip, peer_info.mac),
        (peer, vm_info.ipv4, vm_info.mac),
    ):
        for argv in (
            ["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"],
            [
                "ip",
                "neigh",
                "replace",
                str(other_ip),
                "lladdr",
                str(other_mac),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        ):
            b.driver.exec(b.session, name, argv, check=True, capture_output=True, timeout=10)
    time.sleep(0.5)


def _big_buffers(b: Bench, *vms: str) -> None:
    for vm in vms:
        b.driver.exec(
            b.session,
            vm,
            [
                "sysctl",
                "-qw",
                "net.ipv4.tcp_rmem=4096 131072 67108864",
                "net.ipv4.tcp_wmem=4096 16384 67108864",
            ],
            check=True,
            capture_output=True,
            timeout=10,
        )


def _throughput_cells(cells: Cells, scale: float) -> list[dict[str, Any]]:
    b = cells.b
    rows: list[dict[str, Any]] = []
    seconds = max(4.0, 10 * scale)
    for ms in (10, 50, 100, 200):
        vm, peer, ip = cells.pair(egress={"rate": "100Mbit", "delay": f"{ms}ms"})
        _big_buffers(b, vm, peer)
        tcp = iperf3(b.session, vm, peer, ip, seconds=seconds, omit=min(3.0, 0.02 * ms + 1))
        frames = tcp.bits_per_second / TCP_GOODPUT
        rows.append(
            {
                "kind": "throughput",
                "case": f"tcp 100Mbit through {ms}ms",
                "configured_bps": 100e6,
                "measured_bps": round(frames),
                "ratio": round(frames / 100e6, 4),
                "pass": frames >= 0.95 * 100e6,
            }
        )
    for rate in ("2500Mbit", None):
        egress: dict[str, Any] = {"delay": "20ms", "jitter": "5ms"}
        if rate:
            egress["rate"] = rate
        vm, peer, ip = cells.pair(egress=egress)
        _big_buffers(b, vm, peer)
        cpu0 = cells.cpu(vm)
        t0 = time.monotonic()
        tcp = iperf3(b.session, vm, peer, ip, seconds=seconds, omit=2)
        elapsed = time.monotonic() - t0
        late = _late_share(b, vm)
        rows.append(
            {
                "kind": "engine",
                "case": f"tcp through 20ms+-5ms, rate {rate or 'unlimited'}",
                "measured_bps": round(tcp.bits_per_second),
                "engine_cpu_share": round((cells.cpu(vm) - cpu0) / elapsed, 3),
                "late_share": late,
                "pass": tcp.bits_per_second >= 2e9,
            }
        )
    vm, peer, ip = cells.pair(egress={"delay": "20ms", "jitter": "5ms"})
    for pps in (50_000, 100_000, 150_000):
        before = delayd.read_stats(b.session, vm)
        cpu0 = cells.cpu(vm)
        flood = udp_flood(b.session, vm, peer, ip, pps=pps, seconds=max(3.0, 5 * scale))
        after = delayd.read_stats(b.session, vm)
        late = None
        if before and after:
            e0, e1 = before.directions["egress"], after.directions["egress"]
            frames = e1["rx_frames"] - e0["rx_frames"]
            late = round((e1["late"] - e0["late"]) / frames, 4) if frames else None
        cpu = cells.cpu(vm) - cpu0
        rows.append(
            {
                "kind": "engine",
                "case": f"udp 60B frames at {pps // 1000} kpps through 20ms+-5ms",
                "offered_pps": pps,
                "received_pps": round(flood.received_pps),
                "lost_share": round(flood.lost_fraction, 5),
                "late_share": late,
                "engine_cpu_s": round(cpu, 3),
                "engine_cpu_us_per_packet": round(1e6 * cpu / flood.received, 2)
                if flood.received
                else None,
                "pass": flood.received_pps >= 0.99 * pps and (late or 0) < 0.01,
            }
        )
        time.sleep(1)  # let the engine drain before the next rate
    return rows


def _late_share(b: Bench, vm: str) -> float | None:
    s = delayd.read_stats(b.session, vm)
    if s is None:
        return None
    e = s.directions["egress"]
    return round(e["late"] / e["rx_frames"], 4) if e["rx_frames"] else None


def _mobile_cell(cells: Cells, base_up: float, scale: float) -> list[dict[str, Any]]:
    doc = {
        "egress": {
            "rate": "5Mbit",
            "delay": "40ms",
            "jitter": "8ms",
            "distribution": "normal",
            "loss": "1%",
        },
        "ingress": {
            "rate": "20Mbit",
            "delay": "30ms",
            "jitter": "5ms",
            "distribution": "normal",
            "loss": {"mean": "2%", "burst_length": 3},
        },
    }
    vm, peer, ip = cells.pair(**doc)
    got = one_way(cells.b.session, vm, peer, ip, interval="40ms", duration=f"{60 * scale}s")
    rows = []
    for direction, delays, lost, delay_ms, jitter_ms, loss in (
        ("egress", got.up(), got.lost_up, 40, 8, 0.01),
        ("ingress", got.down(), got.lost_down, 30, 5, 0.02),
    ):
        sigma = stats.stdev(delays)
        w_lo, w_hi = stats.wilson(len(lost), got.sent)
        rows.append(
            {
                "kind": "mobile",
                "case": f"mobile {direction}",
                "configured": f"{delay_ms}ms +- {jitter_ms}ms normal, loss {loss * 100:g}%",
                "median_ms": round((stats.quantile(delays, 0.5) - base_up) / MS, 3),
                "sigma_ms": round(sigma / MS, 3),
                "loss_percent": round(100 * len(lost) / got.sent, 3),
                "loss_interval_95_percent": [round(100 * w_lo, 3), round(100 * w_hi, 3)],
                "reordered": got.reordered_up if direction == "egress" else got.reordered_down,
                "samples": got.sent,
            }
        )
    up = iperf3(cells.b.session, vm, peer, ip, seconds=max(4.0, 8 * scale), omit=2)
    down = iperf3(cells.b.session, vm, peer, ip, seconds=max(4.0, 8 * scale), omit=2, reverse=True)
    rows.append(
        {
            "kind": "mobile",
            "case": "mobile tcp each way (1-2 % loss: far below the rate, as on a real lossy link)",
            "egress_bps": round(up.bits_per_second),
            "ingress_bps": round(down.bits_per_second),
        }
    )
    return rows
