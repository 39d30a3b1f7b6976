"""``vnic bench hosts``, part 5: shaping across hosts, beside shaping on one host.

One session (``bx``) of three VMs: ``a`` and ``c`` on host 1, ``b`` on host 2, so ``a``
to ``b`` crosses the VXLAN overlay over the bed's underlay and ``a`` to ``c`` does not.
``a`` has the profile measured; ``b`` and ``c`` one far faster (:data:`PEER_RATE`), as
the measuring peer of ``vnic bench fidelity``. For each rate ``a``'s profile is changed
live (one profile import through the API; its answer waits for every agent's report),
then TCP is measured both ways on both pairs,
one flow at a time (iperf3, cubic, ``seconds`` after 0.5 s of slow start). Reported per
rate and direction: the frame rate across hosts and on one host (bit/s), each over the
profile's rate (target: 1 ± 2 % across hosts) and the ratio of the two.

The profile's MTU is 1450 bytes, the most VXLAN carries over the bed's 1500-byte underlay
(docs/overlay.md), so a frame rate is TCP goodput × (1450 + 14) / (1450 − 52) (IP, TCP
and timestamp headers; the Ethernet header HTB counts).

The machine's ceiling: both profiles without a rate, one flow ``a`` to ``b`` and one
``a`` to ``c`` (what an unshaped path carries here: the headroom above the top rate).

The underlay's latency: ``PINGS`` pings of ``a`` to ``b`` and of ``a`` to ``c`` under the
fastest rate (no queue builds at 0.2 s apart); the difference of the medians is what the
overlay adds to a round trip.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from typing import Any

from vnic.errors import VnicError
from vnic.lab.bench.hosts_fleet import BenchFleet, until
from vnic.lab.hostbed import Host

#: The rates measured, Mbit/s (issue #18: 1–1000).
RATES_MBIT = (1, 10, 100, 1000)
#: Frame bytes per TCP payload byte at the profile's MTU.
FRAME = (1450 + 14) / (1450 - 52)
PINGS = 20
PORT = 5299
SESSION = "bx"
#: ``a``'s profile, the one measured; the peers' is :data:`PEER` at :data:`PEER_RATE`,
#: far above every rate measured (two shapers of one rate in series would measure how
#: the second one treats the first one's bursts, not the profile).
PROFILE = "pcross"
PEER, PEER_RATE = "pcrosspeer", "10gbit"
#: The peers and their hosts: ``b`` across the overlay, ``c`` beside ``a``.
PEERS = (("b", "h2"), ("c", "h1"))
_RTT = re.compile(r"time=([0-9.]+) ms")


def _doc(mbit: int) -> dict[str, Any]:
    rate = f"{mbit}mbit"
    return {"name": PROFILE, "mtu": "1450B", "egress": {"rate": rate}, "ingress": {"rate": rate}}


def _vm(name: str, host: str, profile: str) -> dict[str, Any]:
    return {"name": name, "launch": True, "host": host, "profile": profile}


def _in_vm(session: str, vm: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", f"vnic.{session}.{vm}", *argv]


def _ipv4(fleet: BenchFleet, session: str, vm: str) -> str:
    ip = fleet.svc.get_vm(session, vm).ipv4
    if not ip:
        raise VnicError(f"vnic bench hosts: VM {vm} has no IPv4 address")
    return ip.split("/")[0]


def tcp_frames_bps(
    fleet: BenchFleet,
    client: tuple[Host, str],
    server: tuple[Host, str],
    reverse: bool,
    seconds: float,
    session: str = SESSION,
) -> float:
    """The TCP frame rate (bit/s) from ``client`` to ``server`` (``reverse``: the server
    sends), each ``(host, VM)`` of ``session``, at an MTU of 1450 bytes."""
    (chost, cvm), (shost, svm) = client, server
    bed = fleet.bed
    listen = bed.spawn(
        shost,
        _in_vm(session, svm, "iperf3", "-s", "-1", "-p", str(PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        listening = _in_vm(session, svm, "ss", "-Hltn", "sport", "=", f":{PORT}")
        until("iperf3 listens", lambda: bed.run(shost, listening).stdout.strip(), 30)
        argv = _in_vm(session, cvm, "iperf3", "-c", _ipv4(fleet, session, svm), "-p", str(PORT))
        argv.append("-J")
        argv += ["-t", str(seconds), "-O", "0.5", "-C", "cubic", *(["-R"] if reverse else [])]
        done = bed.run(chost, argv, timeout=seconds + 30)
        end = json.loads(done.stdout or "{}").get("end", {})
        if "sum_received" not in end:
            raise VnicError(f"vnic bench hosts: iperf3 {cvm}→{svm} failed: {done.stdout[-500:]}")
        return float(end["sum_received"]["bits_per_second"]) * FRAME
    finally:
        listen.kill()
        listen.wait()


def _rtts(fleet: BenchFleet, host: Host, vm: str, peer: str) -> list[float]:
    argv = _in_vm(SESSION, vm, "ping", "-n", "-c", str(PINGS), "-i", "0.2", "-W", "1")
    argv.append(_ipv4(fleet, SESSION, peer))
    return [float(m) for m in _RTT.findall(fleet.bed.run(host, argv, timeout=60).stdout)]


def part_cross_host(
    fleet: BenchFleet, rates_mbit: tuple[int, ...] = RATES_MBIT, seconds: float = 3.0
) -> dict[str, Any]:
    h1, h2 = fleet.bed.hosts[0], fleet.bed.hosts[1]
    peer = {"name": PEER, "mtu": "1450B", "egress": {"rate": PEER_RATE}}
    peer["ingress"] = {"rate": PEER_RATE}
    fleet.ok([("POST", "/v1/import/profiles", [_doc(rates_mbit[0]), peer])])
    fleet.session(SESSION, PEER)
    fleet.ok([("POST", f"/v1/sessions/{SESSION}/vms", _vm("a", "h1", PROFILE))])
    fleet.ok([("POST", f"/v1/sessions/{SESSION}/vms", _vm(v, h, PEER)) for v, h in PEERS])
    until("the session runs on 2 hosts", lambda: fleet.converged(SESSION))
    # Neighbours found before the first flow (ARP through the overlay).
    _rtts(fleet, h1, "a", "b")
    rows: list[dict[str, Any]] = []
    for mbit in rates_mbit:
        if mbit != rates_mbit[0]:
            fleet.ok([("POST", "/v1/import/profiles", [_doc(mbit)])])
            until(f"every VM at {mbit} Mbit/s", lambda: fleet.converged(SESSION))
        for direction, reverse in (("a→b", False), ("b→a", True)):
            cross = tcp_frames_bps(fleet, (h1, "a"), (h2, "b"), reverse, seconds)
            same = tcp_frames_bps(fleet, (h1, "a"), (h1, "c"), reverse, seconds)
            rows.append(
                {
                    "rate_mbit": mbit,
                    "direction": direction,
                    "cross_host_bps": round(cross),
                    "same_host_bps": round(same),
                    "cross_ratio": round(cross / (mbit * 1e6), 4),
                    "same_ratio": round(same / (mbit * 1e6), 4),
                    "cross_over_same": round(cross / same, 4),
                }
            )
    cross_rtt, same_rtt = _rtts(fleet, h1, "a", "b"), _rtts(fleet, h1, "a", "c")
    if not cross_rtt or not same_rtt:
        raise VnicError("vnic bench hosts: the pings of the cross-host part got no answer")
    # The machine's own ceiling on each path: no rate on either end (MTU kept).
    unshaped = [{"name": n, "mtu": "1450B"} for n in (PROFILE, PEER)]
    fleet.ok([("POST", "/v1/import/profiles", unshaped)])
    until("every VM unshaped", lambda: fleet.converged(SESSION))
    ceiling = {
        "cross_host_bps": round(tcp_frames_bps(fleet, (h1, "a"), (h2, "b"), False, seconds)),
        "same_host_bps": round(tcp_frames_bps(fleet, (h1, "a"), (h1, "c"), False, seconds)),
    }
    fleet.down(SESSION)
    median_cross, median_same = statistics.median(cross_rtt), statistics.median(same_rtt)
    return {
        "rows": rows,
        "seconds": seconds,
        "target": "cross_ratio within 1 ± 0.02",
        "met": all(abs(r["cross_ratio"] - 1) <= 0.02 for r in rows),
        "unshaped_ceiling": ceiling,
        "rtt_ms": {
            "cross_host_median": round(median_cross, 3),
            "same_host_median": round(median_same, 3),
            "added_by_underlay": round(median_cross - median_same, 3),
            "pings": PINGS,
            "at_rate_mbit": rates_mbit[-1],
        },
    }
