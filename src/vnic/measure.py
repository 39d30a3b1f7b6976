"""Traffic measurements between VMs with real tools (iperf3, ping).

Used by the netns tests, the benchmarks and the demo. Every run is bounded in
time, and traffic only ever goes to addresses of VMs vnic launched.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from vnic.dataplane import names
from vnic.dataplane import namespaces as nsops

#: Goodput of a saturating TCP flow relative to the Ethernet frame rate:
#: 1448 bytes of payload (MSS with timestamps) per 1514-byte frame.
TCP_GOODPUT = 1448 / 1514
#: Bytes a UDP datagram's frame adds to its payload: UDP, IPv4 and Ethernet headers.
UDP_IPV4_OVERHEAD = 8 + 20 + 14
#: Datagram payload the measurements use, and its share of the frame.
UDP_PAYLOAD = 1400
UDP_GOODPUT = UDP_PAYLOAD / (UDP_PAYLOAD + UDP_IPV4_OVERHEAD)


@dataclass(frozen=True)
class Throughput:
    """What the receiver got: bits of payload per second, and bytes."""

    bits_per_second: float
    bytes: int
    seconds: float
    lost_percent: float = 0.0
    out_of_order: int = 0


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
    srv = nsops.popen(
        server_ns,
        ["iperf3", "-s", "-1", "-p", str(port)],
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
            # The receiver's view: what arrived, not what was offered.
            sent = end["sum"]
            got = end.get("sum_received") or sent
            return Throughput(
                float(got["bits_per_second"]),
                int(got["bytes"]),
                float(got["seconds"]),
                float(sent.get("lost_percent", 0.0)),
                int(sent.get("out_of_order", 0)),
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


_RECEIVER = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
stamps = []
try:
    while True:
        data = s.recv(65535)
        stamps.append((time.monotonic(), len(data)))
        if data.startswith(b"END"):
            break
except socket.timeout:
    pass
print(json.dumps(stamps), flush=True)
"""

_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
total, size = int(sys.argv[3]), int(sys.argv[4])
sent = 0
while sent < total:
    n = min(size, total - sent)
    s.sendto(b"x" * n, (sys.argv[1], int(sys.argv[2])))
    sent += n
s.sendto(b"END", (sys.argv[1], int(sys.argv[2])))
"""


def burst_rate(
    session: str,
    sender: str,
    receiver: str,
    receiver_ip: str,
    *,
    total: int = 30_000,
    size: int = UDP_PAYLOAD,
    port: int = 5400,
) -> float:
    """Send ``total`` bytes of UDP back to back; the frame rate (bit/s) at which they arrived.

    Measured at the receiver from the first to the last datagram, counting
    Ethernet frames (payload + 42 bytes) after the first.
    """
    rx = nsops.popen(
        names.vm_netns(session, receiver),
        [sys.executable, "-c", _RECEIVER, str(port), "3"],
        stdout=subprocess.PIPE,
    )
    try:
        assert rx.stdout is not None
        rx.stdout.readline()  # "ready"
        nsops.run(
            names.vm_netns(session, sender),
            [sys.executable, "-c", _SENDER, receiver_ip, str(port), str(total), str(size)],
            check=True,
            timeout=20,
        )
        out, _ = rx.communicate(timeout=20)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    stamps = [(t, n) for t, n in json.loads(out) if n != 3]  # drop the END marker
    if len(stamps) < 2:
        raise RuntimeError(f"burst probe received {len(stamps)} datagrams")
    span = stamps[-1][0] - stamps[0][0]
    frames = sum(n + UDP_IPV4_OVERHEAD for _, n in stamps[1:])
    return float(frames * 8 / span)
