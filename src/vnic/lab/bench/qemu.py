"""Benchmarks of the qemu driver: shaping, delay and loss through a real QEMU guest, and
how long guests take to launch (``vnic bench fidelity|launch --driver qemu``).

The measured VM is a guest; its peer is a netns VM with a 10 Gbit/s profile,
so the guest's profile is what limits. A guest has busybox, iperf3 and ping
but no Python, so everything here is iperf3 or ping, and what the netns
benchmark measures with Python in the VM is listed as skipped, with why.
Guests run under TCG (software emulation) on a host without usable KVM: their
emulated CPU, not the shaper, sets the top rate, so :func:`fidelity` also
measures an unshaped guest (the ceiling) and reports the 1 Gbit/s rows as rows.

Delay is measured as ping RTT from the peer through the guest minus the RTT of
an unimpaired guest (a guest's clock is not the host's, so no one-way delay);
loss as iperf3's UDP loss count, with its 95 % interval.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnic.dataplane import qemu, vmexec
from vnic.drivers.netns import choose_engine
from vnic.errors import VnicError
from vnic.lab import stats
from vnic.lab.bench.base import PEER_RATE, Bench, bench_session, concurrent_udp
from vnic.lab.measure import (
    TCP_GOODPUT,
    UDP_GOODPUT,
    UDP_PAYLOAD,
    Throughput,
    iperf3,
    iperf3_server,
    ping,
    resolve_neighbour,
)
from vnic.manager.results import VmRequest
from vnic.plan import names

PEER = "peer"
PEER_DOC = {"name": "peer", "egress": {"rate": PEER_RATE}, "ingress": {"rate": PEER_RATE}}
PLAIN = {"name": "plain"}
RATES_MBIT = (1, 10, 100, 1000)
#: The fidelity target: measured frame rate within 5 % of the configured rate.
TOLERANCE = 0.05
#: Seconds iperf3 runs before it counts (measure.iperf3's default ``omit``).
OMIT = 0.5
#: Why rows of the netns fidelity benchmark are not measured through a guest.
SKIPPED_RATE_ROWS = {
    "egress 30KB probe": (
        "measure.burst_rate runs Python in both VMs (sender and receiver); a guest has no "
        "Python, so it can be neither end"
    ),
}
SKIPPED_CELLS = {
    "one-way delay": (
        "irtt one-way delay needs both ends on one clock; a guest's clock is not the "
        "host's, so delay is measured as RTT through the guest instead"
    ),
    "jitter, order, mobile": "irtt one-way delay per packet (see one-way delay)",
    "numbered-datagram loss, bursts, seed": (
        "measure.udp_sequence runs a Python receiver and vnic-udpblast in the VMs; "
        "loss is measured with iperf3 UDP counts instead (no burst lengths)"
    ),
    "engine ceiling, tcp through delay": (
        "udp_flood counts with nftables inside the VM namespace and _big_buffers sets "
        "sysctls there; a guest's CPU (TCG) would be the ceiling anyway"
    ),
}

CELLS = ("delay", "loss")
DELAYS_MS = (10, 50)
RANDOM_LOSS = (0.01, 0.05)
#: The loss flows: small datagrams (242-byte frames) at 5000 per second.
LOSS_PAYLOAD = 200
LOSS_PPS = 5000
#: Pings per RTT sample and their spacing (root may ping faster than every 200 ms).
PINGS = 100
PING_INTERVAL = 0.02
#: A median RTT difference is judged against this or 2 % of the delay, whichever is more:
#: a TCG guest answers pings with a spread of a few hundred microseconds.
DELAY_SLACK_MS = 0.5

#: The launch target under TCG (seconds to a guest with its profile applied and its NIC up).
LAUNCH_TARGET_S = 5.0
LAUNCH_DOC = {"name": "shaped", "egress": {"rate": "10Mbit"}, "ingress": {"rate": "20Mbit"}}


def _accelerator() -> dict[str, str]:
    acc = qemu.accelerator()
    return {"accelerator": acc.name, "accelerator_reason": acc.reason}


# ----------------------------------------------------------------------------- rates


def thread_seconds(session: str, vm: str) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of the guest's QEMU process, by thread id."""
    pid = qemu.guest_pid(session, vm, names.owner_tag(session, vm))
    if pid is None:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # Fields after the parenthesised name: utime and stime are the 12th and 13th.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_share(before: dict[int, float], after: dict[int, float], seconds: float) -> float:
    """CPU seconds the guest's QEMU threads used between two snapshots, per second of
    ``seconds`` (1.0: one host core all the time)."""
    return sum(after[t] - before.get(t, 0.0) for t in after) / seconds


class Rates:
    """Flows between the bench's guests and the netns peer, each a row of the table."""

    def __init__(self, b: Bench, peer_ip: str, seconds: float) -> None:
        self.b, self.peer_ip, self.seconds = b, peer_ip, seconds

    def measured(
        self,
        case: str,
        configured_bps: float,
        vm: str,
        flow: Callable[[], list[Throughput]],
        goodput: float,
        *,
        udp: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows of what ``flow`` measured, one per throughput it returns (each with ``case``
        and ``configured_bps``), with how busy the guest's QEMU was meanwhile.

        A flow that fails or times out gives one row with its error, not a stop.
        """
        before = thread_seconds(self.b.session, vm)
        try:
            got = flow()
        except (RuntimeError, ValueError, subprocess.TimeoutExpired, VnicError) as exc:
            failed = {"case": case, "configured_bps": configured_bps, "measured_bps": None}
            return [{**failed, "ratio": None, "pass": False, "error": str(exc)}]
        cpu = cpu_share(before, thread_seconds(self.b.session, vm), self.seconds + OMIT)
        rows = []
        for t in got:
            frames = t.bits_per_second / goodput
            ratio = frames / configured_bps
            row: dict[str, Any] = {
                "case": case,
                "configured_bps": configured_bps,
                "measured_bps": round(frames),
                "ratio": round(ratio, 4),
            }
            if udp:
                row.update(lost_percent=round(t.lost_percent, 3), out_of_order=t.out_of_order)
            row["pass"] = abs(ratio - 1) <= TOLERANCE
            row["qemu_cpu"] = round(cpu, 3)
            rows.append(row)
        return rows

    def iperf3(
        self, case: str, configured_bps: float, vm: str, *, udp_rate: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        """One iperf3 flow from guest ``vm`` to the peer (``reverse=True``: back)."""

        if udp_rate is not None:
            kw.update(udp_rate=udp_rate, length=UDP_PAYLOAD)

        def flow() -> list[Throughput]:
            return [iperf3(self.b.session, vm, PEER, self.peer_ip, seconds=self.seconds, **kw)]

        goodput = UDP_GOODPUT if udp_rate else TCP_GOODPUT
        return self.measured(case, configured_bps, vm, flow, goodput, udp=bool(udp_rate))[0]


def fidelity(
    rates_mbit: tuple[int, ...] = RATES_MBIT, seconds: float = 3.0, *, extras: bool = True
) -> dict[str, Any]:
    """Configured vs measured rate of a guest per direction (TCP and UDP); with ``extras``
    also the unshaped guest's ceiling, asymmetry and QoS shares.

    The rate compared is the Ethernet frame rate, as in :func:`vnic.lab.bench.run.fidelity`.
    Each rate gets a fresh guest, removed once measured (idle guests still cost CPU here).
    """
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    ceiling: dict[str, Any] = {}
    with bench_session(PEER_DOC) as b:
        r = Rates(b, b.launch(PEER), seconds)
        if extras:
            ceiling = _ceiling(r)
        for mbit in rates_mbit:
            vm = f"g{mbit}"
            rate = mbit * 1e6
            b.profile(
                name=f"rate{mbit}", egress={"rate": f"{mbit}Mbit"}, ingress={"rate": f"{mbit}Mbit"}
            )
            b.launch(vm, profile=f"rate{mbit}", kind="qemu")
            for case, reason in SKIPPED_RATE_ROWS.items():
                skipped.append({"case": f"{mbit}Mbit {case}", "reason": reason})
            # Below the rate nothing may be lost or reordered (-b counts payload).
            offered = mbit * 0.9e6
            below = f"{mbit}Mbit egress udp offered at 0.9x"
            rows.append(r.iperf3(below, offered / UDP_GOODPUT, vm, udp_rate=f"{int(offered)}"))
            for direction, reverse in (("egress", False), ("ingress", True)):
                rows.append(r.iperf3(f"{mbit}Mbit {direction} tcp", rate, vm, reverse=reverse))
                over = f"{int(mbit * 1.1 * 1e6)}"
                rows.append(
                    r.iperf3(
                        f"{mbit}Mbit {direction} udp", rate, vm, reverse=reverse, udp_rate=over
                    )
                )
            b.destroy(vm)
        if extras:
            rows += _asymmetric(r)
            rows += _qos(r)
    _note_ceiling(rows, ceiling)
    return {
        "benchmark": "fidelity",
        "driver": "qemu",
        **_accelerator(),
        "session": b.session,
        "measured": "a QEMU guest, against a netns peer (10 Gbit/s profile)",
        "seconds_per_flow": seconds,
        "compared": "Ethernet frame rate",
        "tolerance": TOLERANCE,
        "ceiling": ceiling,
        "rows": rows,
        "skipped": skipped,
    }


def _note_ceiling(rows: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    """Mark the missed rows whose rate is above what the unshaped guest moved (same
    protocol and direction): the guest, not the shaper, is what stopped them."""
    for row in rows:
        if row["pass"] or "error" in row:
            continue
        direction = "ingress" if " ingress " in row["case"] else "egress"
        proto = "udp" if " udp" in row["case"] else "tcp"
        top = ceiling.get(f"{direction}_{proto}_bps")
        if top and row["configured_bps"] * (1 - TOLERANCE) > top:
            row["limited_by"] = (
                f"the guest (TCG): unshaped it moves {top / 1e6:.0f} Mbit/s {proto} {direction}"
            )


def _ceiling(r: Rates) -> dict[str, Any]:
    """What an unshaped guest (the peer's 10 Gbit/s profile) moves each way, TCP and UDP."""
    r.b.launch("top", profile="peer", kind="qemu")
    out: dict[str, Any] = {}
    for direction, reverse in (("egress", False), ("ingress", True)):
        for proto, udp_rate in (("tcp", None), ("udp", "3G")):
            row = r.iperf3("ceiling", 10e9, "top", reverse=reverse, udp_rate=udp_rate)
            out[f"{direction}_{proto}_bps"] = row["measured_bps"]
            out[f"{direction}_{proto}_qemu_cpu"] = row.get("qemu_cpu")
    r.b.destroy("top")
    return out


def _asymmetric(r: Rates) -> list[dict[str, Any]]:
    r.b.profile(name="asym", egress={"rate": "5Mbit"}, ingress={"rate": "40Mbit"})
    r.b.launch("asym", profile="asym", kind="qemu")
    rows = [
        r.iperf3("asymmetric 5Mbit egress tcp", 5e6, "asym"),
        r.iperf3("asymmetric 40Mbit ingress tcp", 40e6, "asym", reverse=True),
    ]
    r.b.destroy("asym")
    return rows


def _qos(r: Rates) -> list[dict[str, Any]]:
    b = r.b
    b.profile(
        name="qos",
        egress={"rate": "10Mbit"},
        qos={
            "egress": [
                {"name": "voice", "priority": 0, "guaranteed": "6Mbit", "match": {"dscp": ["ef"]}},
                {"name": "bulk", "priority": 7, "guaranteed": "4Mbit"},
            ]
        },
    )
    b.launch("qos", profile="qos", kind="qemu")

    def both() -> list[Throughput]:
        return concurrent_udp(
            b.session, "qos", PEER, r.peer_ip, tos_values=(0xB8, 0), seconds=r.seconds
        )

    voice, *rest = r.measured(
        "qos voice (guarantee 6Mbit)", 6e6, "qos", both, UDP_GOODPUT, udp=True
    )
    b.destroy("qos")
    if not rest:  # the flows failed: one error row
        return [voice]
    bulk = {**rest[0], "case": "qos bulk (guarantee 4Mbit)", "configured_bps": 4e6}
    bulk["ratio"] = round(bulk["measured_bps"] / 4e6, 4)
    bulk["pass"] = abs(bulk["ratio"] - 1) <= TOLERANCE
    return [voice, bulk]


# ----------------------------------------------------------------------------- delay and loss


def _rtts(b: Bench, address: str, count: int) -> list[float]:
    """RTTs (ms) of ``count`` pings from the peer to ``address``, ``PING_INTERVAL`` apart."""
    resolve_neighbour(b.session, PEER, address)  # the first ping would wait for ARP
    got = ping(b.session, PEER, address, count=count, interval=PING_INTERVAL, timeout=1.0)
    if len(got) < count // 2:
        raise RuntimeError(f"{address}: {len(got)} of {count} pings answered")
    return got


@dataclass(frozen=True)
class UdpCount:
    """An iperf3 UDP flow as its receiver counted it, and the runs it took."""

    packets: int
    lost: int
    attempts: int = 1


#: Runs of a UDP flow before it counts as failed. iperf3 (3.12) opens a UDP test with one
#: datagram each way and waits for ever if the profile's loss takes either: that run is
#: stopped after its time plus ``UDP_GRACE`` and run again.
UDP_ATTEMPTS = 3
UDP_GRACE = 10.0


def udp_count(
    session: str,
    client: str,
    server: str,
    server_ip: str,
    *,
    reverse: bool,
    seconds: int,
    pps: int = LOSS_PPS,
    length: int = LOSS_PAYLOAD,
    port: int = 5201,
) -> UdpCount:
    """Datagrams sent and lost of an iperf3 UDP flow at ``pps`` for ``seconds`` (whole:
    iperf3 reads ``-t`` as an integer), ``reverse``: the server sends."""
    argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(seconds), "-J", "-u"]
    argv += ["-b", str(pps * length * 8), "-l", str(length)]
    if reverse:
        argv.append("-R")
    for attempt in range(1, UDP_ATTEMPTS + 1):
        try:
            with iperf3_server(session, server, port):
                proc = vmexec.run(session, client, argv, timeout=seconds + UDP_GRACE)
        except subprocess.TimeoutExpired:
            continue
        data = json.loads(proc.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        total = data["end"]["sum"]  # the receiver's count, whichever end sent
        return UdpCount(int(total["packets"]), int(total["lost_packets"]), attempt)
    raise RuntimeError(f"iperf3 UDP to {server_ip} did not finish in {UDP_ATTEMPTS} runs")


def impairments(quick: bool = False, cells_wanted: tuple[str, ...] = CELLS) -> dict[str, Any]:
    """Delay (RTT through the guest) and random loss (iperf3 UDP) on a guest's egress and
    ingress, against an unimpaired guest; ``quick`` shortens each measurement."""
    engine = choose_engine()
    pings = PINGS // 2 if quick else PINGS
    loss_seconds = 2 if quick else 4
    rows: list[dict[str, Any]] = []
    wanted = set(cells_wanted)
    with bench_session(PLAIN) as b:
        b.launch(PEER)
        base_ip = b.launch("base", kind="qemu")
        base = _rtts(b, base_ip, pings)
        base_median = statistics.median(base)
        rows.append(
            {
                "kind": "baseline",
                "case": "unimpaired guest, ping from the peer",
                "median_rtt_us": round(base_median * 1e3, 1),
                "p99_rtt_us": round(stats.quantile(base, 0.99) * 1e3, 1),
                "samples": len(base),
            }
        )
        if "delay" in wanted:
            rows += [
                _delay_cell(b, d, ms, base_median, pings)
                for d in ("egress", "ingress")
                for ms in DELAYS_MS
            ]
        if "loss" in wanted:
            rows += _loss_cells(b, base_ip, loss_seconds)
    return {
        "benchmark": "impairments",
        "driver": "qemu",
        **_accelerator(),
        "session": b.session,
        "engine": engine.engine,
        "engine_reason": engine.reason,
        "delay_measured": (
            "median ping RTT from the netns peer through the guest minus that of the "
            "unimpaired guest; ping prints RTTs of 10-100 ms to 0.1 ms"
        ),
        "rows": rows,
        "skipped": [{"case": c, "reason": r} for c, r in SKIPPED_CELLS.items()],
    }


def _delay_cell(
    b: Bench, direction: str, ms: int, base_median: float, pings: int
) -> dict[str, Any]:
    vm = f"d{direction[0]}{ms}"
    b.profile(name=vm, **{direction: {"delay": f"{ms}ms"}})
    address = b.launch(vm, profile=vm, kind="qemu")
    try:
        rtts = _rtts(b, address, pings)
    finally:
        b.destroy(vm)
    added = statistics.median(rtts) - base_median
    error = added - ms
    return {
        "kind": "rtt_delay",
        "case": f"{direction} delay {ms}ms",
        "configured_ms": ms,
        "measured_ms": round(added, 3),
        "ratio": round(added / ms, 4),
        "median_error_us": round(error * 1e3, 1),
        "p99_minus_median_us": round(
            (stats.quantile(rtts, 0.99) - statistics.median(rtts)) * 1e3, 1
        ),
        "samples": len(rtts),
        "pass": abs(error) <= max(DELAY_SLACK_MS, 0.02 * ms),
    }


def _loss_cells(b: Bench, base_ip: str, seconds: int) -> list[dict[str, Any]]:
    """The unimpaired guest each way (what the measuring path itself loses), then each
    random loss on a fresh guest's egress and on another's ingress."""
    rows = [_loss_row(b, "base", base_ip, 0.0, d, seconds) for d in ("egress", "ingress")]
    for direction in ("egress", "ingress"):
        for mean in RANDOM_LOSS:
            vm = f"l{direction[0]}{int(mean * 100)}"
            b.profile(name=vm, **{direction: {"loss": f"{mean * 100:g}%"}})
            address = b.launch(vm, profile=vm, kind="qemu")
            try:
                rows.append(_loss_row(b, vm, address, mean, direction, seconds))
            finally:
                b.destroy(vm)
    return rows


def _loss_row(
    b: Bench, vm: str, address: str, mean: float, direction: str, seconds: int
) -> dict[str, Any]:
    # egress: the guest sends (iperf3 -R from the peer); ingress: the peer sends.
    got = udp_count(b.session, PEER, vm, address, reverse=direction == "egress", seconds=seconds)
    lo, hi = stats.binomial_interval(mean, got.packets)
    w_lo, w_hi = stats.wilson(got.lost, got.packets)
    return {
        "kind": "udp_loss",
        "case": f"{direction} random {mean * 100:g}%"
        if mean
        else f"{direction} no loss (baseline)",
        "configured_percent": mean * 100,
        "measured_percent": round(100 * got.lost / got.packets, 4),
        "interval_95_percent": [round(100 * w_lo, 4), round(100 * w_hi, 4)],
        "expected_count_95": [lo, hi],
        "lost": got.lost,
        "packets": got.packets,
        "iperf3_runs": got.attempts,
        "pass": lo <= got.lost <= hi,
    }


# ----------------------------------------------------------------------------- launch


def _ready(b: Bench, address: str, timeout: float = 10.0) -> None:
    """Wait until the peer's ping gets an answer from ``address``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(b.session, PEER, address, count=1, timeout=0.2):
            return
    raise RuntimeError(f"{address} did not answer the peer's ping within {timeout:.0f} s")


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_s": round(statistics.median(ordered), 3),
        "p99_s": round(stats.quantile(ordered, 0.99), 3),
        "max_s": round(ordered[-1], 3),
    }


def _launch_at_once(vms: list[tuple[Bench, str]]) -> dict[str, Any]:
    """Launch every ``(bench, vm)`` from its own thread at once (each session has its netns
    peer running); the wall time, each one's time, the errors, and how many guests then
    answer their peer's ping."""

    def one(bench: Bench, vm: str) -> tuple[float, str | None]:
        t0 = time.perf_counter()
        try:
            bench.service.launch_vm(bench.session, vm, bench.agent, "qemu")
        except (VnicError, OSError) as exc:
            return time.perf_counter() - t0, str(exc)
        return time.perf_counter() - t0, None

    addresses = [bench.service.add_vm(VmRequest(bench.session, vm)).vm.ipv4 for bench, vm in vms]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(vms)) as pool:
        outcomes = list(pool.map(one, *zip(*vms, strict=True)))
    wall = time.perf_counter() - start
    labels = [f"{bench.session}/{vm}" for bench, vm in vms]
    answering = 0
    for (bench, _), address, (_, error) in zip(vms, addresses, outcomes, strict=True):
        if error is None and address:
            try:
                _ready(bench, address, timeout=5.0)
                answering += 1
            except RuntimeError:
                pass
    return {
        "guests": len(vms),
        "wall_s": round(wall, 3),
        "per_guest_s": {label: round(t, 3) for label, (t, _) in zip(labels, outcomes, strict=True)},
        **_summary([t for t, _ in outcomes]),
        "errors": [f"{label}: {e}" for label, (_, e) in zip(labels, outcomes, strict=True) if e],
        "answering_ping": answering,
    }


def launch(sequential: int = 5, concurrent: int = 4) -> dict[str, Any]:
    """Seconds to launch one shaped guest (``sequential`` times, each removed after), then
    ``concurrent`` guests at once, in one session and each in a session of its own.

    A launch is timed from the request to the driver's return: the guest booted,
    its NIC up with its addresses and the profile applied on the host side.
    ``ready`` adds the wait for the first ping from the netns peer to be answered.
    """
    with bench_session(LAUNCH_DOC) as b:
        b.launch(PEER)
        launched, ready, destroyed = [], [], []
        for i in range(sequential):
            vm = f"s{i}"
            b.service.add_vm(VmRequest(b.session, vm))
            t0 = time.perf_counter()
            address = b.service.launch_vm(b.session, vm, b.agent, "qemu").vm.ipv4
            launched.append(time.perf_counter() - t0)
            assert address
            _ready(b, address)
            ready.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            b.destroy(vm)
            destroyed.append(time.perf_counter() - t1)
        one_session = _launch_at_once([(b, f"c{i}") for i in range(concurrent)])
        sessions = [b.session]
    with ExitStack() as stack:
        benches = [stack.enter_context(bench_session(LAUNCH_DOC)) for _ in range(concurrent)]
        for x in benches:
            x.launch(PEER)
        separate = _launch_at_once([(x, "c0") for x in benches])
        sessions += [x.session for x in benches]
    summary = _summary(launched)
    return {
        "benchmark": "launch",
        "driver": "qemu",
        **_accelerator(),
        "sessions": sessions,
        "sequential": {
            "launches": sequential,
            "launch_s": [round(t, 3) for t in launched],
            "ready_s": [round(t, 3) for t in ready],
            "destroy_s": [round(t, 3) for t in destroyed],
            "launch": summary,
            "ready": _summary(ready),
            "destroy": _summary(destroyed),
            "target_s": LAUNCH_TARGET_S,
            "pass": summary["p99_s"] <= LAUNCH_TARGET_S,
        },
        "concurrent_one_session": {
            **one_session,
            "note": "an agent launches the VMs of one session one at a time",
        },
        "concurrent_separate_sessions": separate,
    }
