"""Traffic measurements between VMs with real tools (iperf3, ping).

Used by the tests, the benchmarks and the demo. Every run is bounded in
time, and traffic only ever goes to addresses of VMs vnic launched.
:func:`iperf3`, :func:`iperf3_server` and :func:`ping` run in netns VMs and QEMU
guests alike (through :mod:`vnic.dataplane.vmexec`); the rest runs Python in the VM and
so needs a netns VM (a guest has no Python).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import vmexec
from vnic.plan import names

#: Goodput of a saturating TCP flow relative to the Ethernet frame rate:
#: 1448 bytes of payload (MSS with timestamps) per 1514-byte frame.
TCP_GOODPUT = 1448 / 1514
#: Bytes a UDP datagram's frame adds to its payload: UDP, IPv4 and Ethernet headers.
UDP_IPV4_OVERHEAD = 8 + 20 + 14
#: Datagram payload the measurements use, and its share of the frame.
UDP_PAYLOAD = 1400
UDP_GOODPUT = UDP_PAYLOAD / (UDP_PAYLOAD + UDP_IPV4_OVERHEAD)


#: The congestion control of measuring TCP flows. A host whose default is bbr (this
#: kind of cloud machine) would otherwise measure through BBR's probing, which
#: settles at either about 0.89 or 0.99 of an HTB rate from one run to the next.
MEASURING_CONGESTION = "cubic"


@dataclass(frozen=True)
class Throughput:
    """What the receiver got: bits of payload per second, and bytes."""

    bits_per_second: float
    bytes: int
    seconds: float
    lost_percent: float = 0.0
    out_of_order: int = 0
    #: bit/s of each reporting interval (with ``interval``), the sender's view
    intervals: tuple[float, ...] = ()


def _wait_listening(ns: str, port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = nsops.run(
            ns, ["ss", "-Hltnu", f"sport = :{port}"], capture_output=True, timeout=5
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"server in {ns} not listening on {port} after {timeout}s")


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
    interval: float | None = None,
    congestion: str | None = MEASURING_CONGESTION,
) -> Throughput:
    """Run iperf3 from ``client`` to ``server`` (``reverse``: server sends).

    ``udp_rate`` (iperf3 ``-b``, e.g. ``"30M"``) switches to UDP; ``tos`` sets
    the IP TOS byte; the first ``omit`` seconds (TCP slow start) are not counted.
    ``interval`` (seconds) also reports the rate of each interval. TCP flows use
    ``congestion`` (default cubic, whatever the host's default; None: the sockets'
    default, which is the VM's ``tcp.congestion_control``).
    """
    with iperf3_server(session, server, port):
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
        if interval is not None:
            argv += ["-i", str(interval)]
        if congestion and not udp_rate:
            argv += ["-C", congestion]
        proc = vmexec.run(session, client, argv, timeout=seconds + omit + 20)
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
        steps = tuple(
            float(i["sum"]["bits_per_second"])
            for i in data.get("intervals", [])
            if not i["sum"].get("omitted")
        )
        return Throughput(
            float(r["bits_per_second"]), int(r["bytes"]), float(r["seconds"]), intervals=steps
        )


@contextlib.contextmanager
def iperf3_server(session: str, vm: str, port: int) -> Iterator[None]:
    """A one-shot iperf3 server in the VM, listening when the block starts; waited for
    (killed after 5 s) when it ends."""
    srv = vmexec.start(session, vm, ["iperf3", "-s", "-1", "-p", str(port)])
    try:
        vmexec.wait_listening(session, vm, port)
        yield
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
    proc = vmexec.run(
        session,
        client,
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout), address],
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


@dataclass(frozen=True)
class PacketRate:
    """A paced UDP flood: datagrams sent and received, over ``seconds``."""

    sent: int
    received: int
    seconds: float

    @property
    def received_pps(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    @property
    def lost_fraction(self) -> float:
        return 1 - self.received / self.sent if self.sent else 0.0


_COUNT_TABLE = "vnic_measure"


def _blast(
    session: str, client: str, address: str, port: int, pps: int, payload: int, seconds: float
) -> dict[str, Any]:
    """Run ``vnic-udpblast`` in ``client``; its report: datagrams sent, seconds taken."""
    from vnic.engine import build

    proc = nsops.run(
        names.vm_netns(session, client),
        [str(build("udpblast")), address, str(port), str(pps), str(payload), f"{seconds:.6f}"],
        capture_output=True,
        timeout=seconds + 20,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vnic-udpblast: {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def resolve_neighbour(session: str, client: str, address: str, tries: int = 20) -> None:
    """Make sure ``client`` knows ``address``'s MAC before a measured flood.

    Without it, the first datagrams wait for ARP, and on a lossy profile a
    lost ARP request makes the kernel drop the whole queued burst.
    """
    for _ in range(tries):
        if ping(session, client, address, count=1, timeout=0.5):
            return
    raise RuntimeError(f"{client} cannot reach {address}")


def udp_flood(
    session: str,
    client: str,
    server: str,
    server_ip: str,
    *,
    pps: int,
    payload: int = 18,
    seconds: float = 3.0,
    port: int = 9,
) -> PacketRate:
    """Send ``pps`` datagrams per second of ``payload`` bytes from ``client`` to ``server``.

    The server counts what arrives with an nftables counter at prerouting and
    drops it there, so the receiver costs nothing and answers nothing; the
    sender is ``vnic-udpblast`` (batches with sendmmsg). 18 bytes of payload
    make a 60-byte frame, the Ethernet minimum.
    """
    server_ns = names.vm_netns(session, server)
    resolve_neighbour(session, client, server_ip)
    script = (
        f"table ip {_COUNT_TABLE} {{\n chain pre {{\n  type filter hook prerouting priority -300;\n"
        f"  udp dport {port} counter drop\n }}\n}}\n"
    )
    added = nsops.run_inside(server_ns, ["nft", "-f", "-"], input=script, capture_output=True)
    if added.returncode != 0:
        raise RuntimeError(f"cannot count packets in {server}: {added.stderr.strip()}")
    try:
        sent = _blast(session, client, server_ip, port, pps, payload, seconds)
        time.sleep(0.5)  # let what the network still holds arrive
        listing = nsops.run_inside(
            server_ns, ["nft", "-j", "list", "table", "ip", _COUNT_TABLE], capture_output=True
        )
        received = 0
        for item in json.loads(listing.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    received = int(expr["counter"]["packets"])
        return PacketRate(int(sent["sent"]), received, float(sent["seconds"]))
    finally:
        nsops.run_inside(
            server_ns, ["nft", "delete", "table", "ip", _COUNT_TABLE], capture_output=True
        )


@dataclass(frozen=True)
class OneWay:
    """Per-packet one-way results of an irtt run, indexed by sequence number.

    ``up``: client -> server, ``down``: server -> client. Delays in ns, None
    where the packet was lost in that direction (or, for ``down``, never sent
    because the request was lost). Both ends run on this host's clock, so
    one-way delays are exact up to the tools' own scheduling.
    """

    sent: int
    up_delay: list[int | None]
    down_delay: list[int | None]
    lost_up: list[int]
    lost_down: list[int]
    reordered_up: int
    reordered_down: int

    @staticmethod
    def _present(values: list[int | None]) -> list[int]:
        return [v for v in values if v is not None]

    def up(self) -> list[int]:
        return self._present(self.up_delay)

    def down(self) -> list[int]:
        return self._present(self.down_delay)


def _reordered(arrivals: list[tuple[int, int]]) -> int:
    """Packets that arrived after a packet sent later than them (seqno order vs arrival order)."""
    count = 0
    latest = -1
    for _, seq in sorted(arrivals):
        if seq < latest:
            count += 1
        latest = max(latest, seq)
    return count


def one_way(
    session: str,
    client: str,
    server: str,
    server_ip: str,
    *,
    interval: str = "10ms",
    duration: str = "3s",
    payload: int = 0,
) -> OneWay:
    """Send irtt probes every ``interval`` for ``duration`` and return per-packet results."""
    server_ns = names.vm_netns(session, server)
    srv = nsops.popen(
        server_ns,
        ["irtt", "server", "-b", server_ip, "-i", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(server_ns, 2112)
        argv = ["irtt", "client", "-i", interval, "-d", duration, "-Q", "-o", "-"]
        if payload:
            argv += ["-l", str(payload)]
        seconds = _seconds(duration)
        proc = nsops.run(
            names.vm_netns(session, client),
            [*argv, server_ip],
            capture_output=True,
            timeout=seconds + 30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"irtt: {proc.stderr.strip()}")
        data = json.loads(proc.stdout)
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
    trips = data["round_trips"]
    up: list[int | None] = []
    down: list[int | None] = []
    lost_up, lost_down = [], []
    up_arrivals, down_arrivals = [], []
    for t in trips:
        lost = t["lost"]
        delay = t.get("delay", {})
        seq = int(t["seqno"])
        if lost in ("true", "true_up"):
            lost_up.append(seq)
        if lost == "true_down":
            lost_down.append(seq)
        up.append(int(delay["send"]) if "send" in delay else None)
        down.append(int(delay["receive"]) if "receive" in delay else None)
        stamps = t.get("timestamps", {})
        server_rx = stamps.get("server", {}).get("receive", {}).get("wall")
        client_rx = stamps.get("client", {}).get("receive", {}).get("wall")
        if server_rx:
            up_arrivals.append((int(server_rx), seq))
        if client_rx:
            down_arrivals.append((int(client_rx), seq))
    return OneWay(
        sent=len(trips),
        up_delay=up,
        down_delay=down,
        lost_up=lost_up,
        lost_down=lost_down,
        reordered_up=_reordered(up_arrivals),
        reordered_down=_reordered(down_arrivals),
    )


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    raise ValueError(f"duration like 500ms, 3s or 1m, got {duration!r}")


_SEQ_RECEIVER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE (root): above rmem_max
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(30.0)  # the sender may take a while to start (a slow or emulated host)
print("ready", flush=True)
seen = []
try:
    seen.append(struct.unpack("!Q", s.recv(65535)[:8])[0])
    s.settimeout(float(sys.argv[3]))
    while True:
        seen.append(struct.unpack("!Q", s.recv(65535)[:8])[0])
except socket.timeout:
    pass
print(" ".join(map(str, seen)), flush=True)
"""


def udp_sequence(
    session: str,
    client: str,
    server: str,
    server_ip: str,
    *,
    count: int,
    pps: int = 2000,
    payload: int = 64,
    port: int = 9000,
    quiet: float = 1.0,
) -> list[int]:
    """Send ``count`` numbered datagrams; return the numbers received, in arrival order.

    A number missing was lost; one twice was duplicated; out of order was reordered.
    The receiver stops after ``quiet`` seconds without a datagram.
    """
    from vnic.engine import build

    build("udpblast")  # before the receiver starts waiting: a first build takes seconds
    server_ns = names.vm_netns(session, server)
    resolve_neighbour(session, client, server_ip)
    receiver = nsops.popen(
        server_ns,
        [sys.executable, "-c", _SEQ_RECEIVER, server_ip, str(port), str(quiet)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            receiver.kill()
            _, err = receiver.communicate()
            raise RuntimeError(f"sequence receiver did not start: {err.strip()}")
        seconds = count / pps
        report = _blast(session, client, server_ip, port, pps, payload, seconds)
        if int(report["sent"]) != count:
            raise RuntimeError(f"vnic-udpblast sent {report['sent']} of {count} datagrams")
        out, _ = receiver.communicate(timeout=seconds + quiet + 60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return [int(x) for x in out.split()]
