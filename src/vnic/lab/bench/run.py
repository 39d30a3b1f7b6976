"""Benchmarks: shaping fidelity measured with iperf3, and control-plane speed.

Each benchmark makes its own throwaway database, agent state and session,
writes JSON, and prints a short table. Run them with ``vnic bench fidelity``
and ``vnic bench launch`` (root); ``--driver qemu`` measures QEMU guests
instead (:mod:`vnic.lab.bench.qemu`). Traffic goes only between the benchmark's VMs.
The throwaway bench itself is :mod:`vnic.lab.bench.base`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vnic.agent.core import local_agent
from vnic.dataplane.tc import read_class_counters
from vnic.errors import InvalidInput
from vnic.lab.bench import impairments as bench_impairments
from vnic.lab.bench import qemu as bench_qemu
from vnic.lab.bench.base import PEER_RATE, bench_session, concurrent_udp
from vnic.lab.measure import (
    TCP_GOODPUT,
    UDP_GOODPUT,
    UDP_PAYLOAD,
    burst_rate,
    iperf3,
)
from vnic.manager.results import VmRequest
from vnic.plan import names

#: The drivers a benchmark can measure.
DRIVERS = ("netns", "qemu")


def _row(
    name: str, configured_bps: float, measured_frames_bps: float, **extra: Any
) -> dict[str, Any]:
    return {
        "case": name,
        "configured_bps": configured_bps,
        "measured_bps": round(measured_frames_bps),
        "ratio": round(measured_frames_bps / configured_bps, 4),
        **extra,
    }


def fidelity(
    rates_mbit: tuple[int, ...] = (1, 10, 100, 1000), seconds: float = 3.0
) -> dict[str, Any]:
    """Configured vs measured rate per direction (TCP and UDP), QoS shares, asymmetry.

    The rate compared is the Ethernet frame rate (what the profile's rate
    means): TCP goodput / (1448/1514), UDP goodput / (1400/1442).
    """
    rows: list[dict[str, Any]] = []
    with bench_session(
        {"name": "peer", "egress": {"rate": PEER_RATE}, "ingress": {"rate": PEER_RATE}}
    ) as b:
        peer_ip = b.launch("peer")
        for mbit in rates_mbit:
            vm = f"r{mbit}"
            b.profile(
                name=f"rate{mbit}", egress={"rate": f"{mbit}Mbit"}, ingress={"rate": f"{mbit}Mbit"}
            )
            b.launch(vm, profile=f"rate{mbit}")
            rate = mbit * 1e6
            probe = burst_rate(b.session, vm, "peer", peer_ip)
            rows.append(_row(f"{mbit}Mbit egress 30KB probe", rate, probe))
            # Below the rate nothing may be lost or reordered. iperf3's -b counts
            # payload; the frame rate offered is that over UDP_GOODPUT.
            offered = mbit * 0.9e6
            below = iperf3(
                b.session,
                vm,
                "peer",
                peer_ip,
                seconds=seconds,
                udp_rate=f"{int(offered)}",
                length=UDP_PAYLOAD,
            )
            rows.append(
                _row(
                    f"{mbit}Mbit egress udp offered at 0.9x",
                    offered / UDP_GOODPUT,
                    below.bits_per_second / UDP_GOODPUT,
                    lost_percent=round(below.lost_percent, 3),
                    out_of_order=below.out_of_order,
                )
            )
            for direction, reverse in (("egress", False), ("ingress", True)):
                tcp = iperf3(b.session, vm, "peer", peer_ip, seconds=seconds, reverse=reverse)
                rows.append(
                    _row(f"{mbit}Mbit {direction} tcp", rate, tcp.bits_per_second / TCP_GOODPUT)
                )
                udp = iperf3(
                    b.session,
                    vm,
                    "peer",
                    peer_ip,
                    seconds=seconds,
                    reverse=reverse,
                    udp_rate=f"{int(mbit * 1.1 * 1e6)}",
                    length=UDP_PAYLOAD,
                )
                rows.append(
                    _row(f"{mbit}Mbit {direction} udp", rate, udp.bits_per_second / UDP_GOODPUT)
                )
        b.profile(name="asym", egress={"rate": "5Mbit"}, ingress={"rate": "40Mbit"})
        b.launch("asym", profile="asym")
        up = iperf3(b.session, "asym", "peer", peer_ip, seconds=seconds)
        down = iperf3(b.session, "asym", "peer", peer_ip, seconds=seconds, reverse=True)
        rows.append(_row("asymmetric 5Mbit egress tcp", 5e6, up.bits_per_second / TCP_GOODPUT))
        rows.append(_row("asymmetric 40Mbit ingress tcp", 40e6, down.bits_per_second / TCP_GOODPUT))
        b.profile(
            name="qos",
            egress={"rate": "10Mbit"},
            qos={
                "egress": [
                    {
                        "name": "voice",
                        "priority": 0,
                        "guaranteed": "6Mbit",
                        "match": {"dscp": ["ef"]},
                    },
                    {"name": "bulk", "priority": 7, "guaranteed": "4Mbit"},
                ]
            },
        )
        b.launch("qos", profile="qos")
        voice, bulk = concurrent_udp(
            b.session, "qos", "peer", peer_ip, tos_values=(0xB8, 0), seconds=seconds
        )
        rows.append(_row("qos voice (guarantee 6Mbit)", 6e6, voice.bits_per_second / UDP_GOODPUT))
        rows.append(_row("qos bulk (guarantee 4Mbit)", 4e6, bulk.bits_per_second / UDP_GOODPUT))
    return {
        "benchmark": "fidelity",
        "seconds_per_flow": seconds,
        "compared": "Ethernet frame rate",
        "rows": rows,
    }


def launch(count: int = 100, workers: int = 2) -> dict[str, Any]:
    """Launch ``count`` shaped VMs with ``workers`` processes (``vnic session up``); per-VM
    launch time, total, and time to read every vNIC's counters."""
    doc = {"name": "shaped", "egress": {"rate": "10Mbit"}, "ingress": {"rate": "20Mbit"}}
    with bench_session(doc) as b:
        try:
            for i in range(count):
                b.service.add_vm(VmRequest(b.session, f"v{i}"))
            start = time.perf_counter()
            outcomes = b.service.launch_many(
                b.session, [f"v{i}" for i in range(count)], workers=workers, agents=local_agent
            )
            total = time.perf_counter() - start
            failed = [o for o in outcomes if o.error]
            if failed:
                raise RuntimeError(f"{len(failed)} launches failed, first: {failed[0].error}")
            times = sorted(o.seconds for o in outcomes)
            reads = []
            for _ in range(5):
                t0 = time.perf_counter()
                counters = read_class_counters(names.session_netns(b.session))
                reads.append(time.perf_counter() - t0)
            devices = {dev for dev, _minor in counters}
            result = {
                "benchmark": "launch",
                "vms": count,
                "workers": workers,
                "launch_p50_s": round(statistics.median(times), 4),
                "launch_p99_s": round(times[min(len(times) - 1, int(0.99 * len(times)))], 4),
                "total_s": round(total, 3),
                "counters_read_s": round(min(reads), 4),
                "vnic_devices_read": len(devices),
            }
        finally:
            # launch_many's workers record the VMs in this host's agent state (not the
            # bench's): forget them there too, or a later `vnic serve` would rebuild them.
            local_agent("netns").teardown_session(b.session)
    return result


def write(result: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def run(
    which: str,
    out: Path | None,
    printer: Callable[[dict[str, Any]], None],
    *,
    part: str = "all",
    quick: bool = False,
    cells: tuple[str, ...] | None = None,
    driver: str = "netns",
) -> dict[str, Any]:
    """Run a benchmark, write its JSON to ``out`` and print it.

    ``fidelity`` has two parts: ``rates`` (shaping) and ``impairments`` (delay,
    jitter, loss; see :mod:`vnic.lab.bench.impairments`). ``driver`` is the kind of
    VM measured: ``netns``, or ``qemu`` (:mod:`vnic.lab.bench.qemu`: a QEMU guest
    against a netns peer; its impairment cells are ``delay`` and ``loss``).
    """
    if driver not in DRIVERS:
        raise InvalidInput.one("driver", driver, "one of " + ", ".join(DRIVERS))
    if driver == "qemu":
        if which != "fidelity":
            result = bench_qemu.launch()
        else:
            result = {"benchmark": "fidelity", "driver": "qemu"}
            if part in ("all", "rates"):
                result["rates"] = bench_qemu.fidelity(seconds=1.5 if quick else 3.0)
            if part in ("all", "impairments"):
                result["impairments"] = bench_qemu.impairments(
                    quick=quick, cells_wanted=cells or bench_qemu.CELLS
                )
    elif which == "fidelity":
        result = {"benchmark": "fidelity"}
        if part in ("all", "rates"):
            result["rates"] = fidelity(seconds=1.5 if quick else 3.0)
        if part in ("all", "impairments"):
            result["impairments"] = bench_impairments.impairments(
                quick=quick, cells_wanted=cells or bench_impairments.CELLS
            )
    else:
        result = launch()
    write(result, out)
    printer(result)
    return result
