"""Traffic measurements between VMs with real tools (iperf3, ping).

Used by the netns tests, the benchmarks and the demo. Every run is bounded in
time, and traffic only ever goes to addresses of VMs vnic launched.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass

from vnic.dataplane import names
from vnic.dataplane import namespaces as nsops

#: Goodput of a saturating TCP flow relative to the Ethernet frame rate:
#: 1448 bytes of payload (MSS with timestamps) per 1514-byte frame.
TCP_GOODPUT = 1448 / 1514


@dataclass(frozen=True)
class Throughput:
    """What the receiver got: bits of payload per second, and bytes."""

    bits_per_second: float
    bytes: int
    seconds: float
    lost_percent: float = 0.0


def _wait_listening(ns: str, port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = nsops.run(
            ns, ["ss", "-Hltnu", f"sport = :{port}"], capture_output=True, timeout=5
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"iperf3 server in {ns} not listening on {port} after {timeout}s")


def iperf3(
    session: str,
    client: str,
    server: str,
    server_ip: str,
    *,
    seconds: float = 3.0,
    reverse: bool = False,
    udp_rate: str | None = None,
    length: int | None = None,
    tos: int | None = None,
    port: int = 5201,
    omit: float = 0.5,
) -> Throughput:
    """Run iperf3 from ``client`` to ``server`` (``reverse``: server sends).

    ``udp_rate`` (iperf3 ``-b``, e.g. ``"30M"``) switches to UDP; ``tos`` sets
    the IP TOS byte; the first ``omit`` seconds (TCP slow start) are not counted.
    """
    server_ns = names.vm_netns(session, server)
    client_ns = names.vm_netns(session, client)
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(server_ns, port)
        argv = [
            "iperf3",
            "-c",
            server_ip,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            "-O",
            str(omit),
        ]
        if reverse:
            argv.append("-R")
        if udp_rate:
            argv += ["-u", "-b", udp_rate]
        if length:
            argv += ["-l", str(length)]
        if tos is not None:
            argv += ["-S", str(tos)]
        proc = nsops.run(client_ns, argv, capture_output=True, timeout=seconds + omit + 20)
        data = json.loads(proc.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        end = data["end"]
        if udp_rate:
            s = end["sum"]
            return Throughput(
                float(s["bits_per_second"]) * (1 - s["lost_percent"] / 100),
                int(s["bytes"]),
                float(s["seconds"]),
                float(s["lost_percent"]),
            )
        r = end["sum_received"]
        return Throughput(float(r["bits_per_second"]), int(r["bytes"]), float(r["seconds"]))
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


_RTT = re.compile(r"time=([0-9.]+) ms")


def ping(
    session: str,
    client: str,
    address: str,
    *,
    count: int = 3,
    interval: float = 0.2,
    timeout: float = 1.0,
) -> list[float]:
    """Round-trip times in ms of the replies received (empty: unreachable)."""
    ns = names.vm_netns(session, client)
    proc = nsops.run(
        ns,
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout), address],
        capture_output=True,
        timeout=count * (interval + timeout) + 10,
    )
    return [float(m) for m in _RTT.findall(proc.stdout)]
