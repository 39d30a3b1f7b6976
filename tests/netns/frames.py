"""Hand-made Ethernet frames a VM sends with a raw socket (spoofing tests), and raw
listeners that report what reached another VM. Building is pure; sending and listening
run inside a VM's namespace with the interpreter that runs the tests."""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys
from collections.abc import Sequence

from vnic.dataplane import namespaces as nsops
from vnic.plan import names

ETH_IP, ETH_ARP, ETH_IP6 = 0x0800, 0x0806, 0x86DD
ETH_8021Q, ETH_8021AD = 0x8100, 0x88A8
ICMP6, UDP = 58, 17
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"
BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ether(dst: str, src: str, ethertype: int, payload: bytes, tags: Sequence[int] = ()) -> bytes:
    """An Ethernet frame; each of ``tags`` (outermost first) is a TPID whose tag carries
    VLAN id 5 (802.1Q 0x8100, 802.1ad 0x88a8)."""
    head = mac_bytes(dst) + mac_bytes(src)
    for tpid in tags:
        head += struct.pack("!HH", tpid, 5)
    return head + struct.pack("!H", ethertype) + payload


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv6(
    src: str,
    dst: str,
    next_header: int,
    payload: bytes,
    hop_limit: int = 255,
    *,
    hop_by_hop: bool = False,
) -> bytes:
    """An IPv6 packet; an ICMPv6 or UDP payload gets its checksum filled in (bytes 2-3 or
    6-7 of ``payload`` must be zero). With ``hop_by_hop``, an empty Hop-by-Hop options
    header (PadN) comes before the payload."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    pseudo = s + d + struct.pack("!I3xB", len(payload), next_header)
    at = {ICMP6: 2, UDP: 6}.get(next_header)
    if at is not None:
        payload = payload[:at] + struct.pack("!H", _checksum(pseudo + payload)) + payload[at + 2 :]
    if hop_by_hop:
        payload = struct.pack("!BBBB4x", next_header, 0, 1, 4) + payload
        next_header = 0
    head = struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit)
    return head + s + d + payload


def icmp6(kind: int, body: bytes, code: int = 0) -> bytes:
    return struct.pack("!BBH", kind, code, 0) + body


def lladdr_option(option: int, mac: str) -> bytes:
    """An ND link-layer address option: 1 source, 2 target (RFC 4861 section 4.6.1)."""
    return struct.pack("!BB", option, 1) + mac_bytes(mac)


def neighbour_advert(target: str, mac: str, *, options: bytes | None = None) -> bytes:
    """An unsolicited, overriding NA for ``target`` with ``mac`` as its target link-layer
    address (or ``options`` instead)."""
    flags = 0x20000000  # Override, not Solicited, not Router
    opts = lladdr_option(2, mac) if options is None else options
    return icmp6(136, struct.pack("!I", flags) + ipaddress.IPv6Address(target).packed + opts)


def neighbour_solicit(target: str, mac: str | None) -> bytes:
    opts = lladdr_option(1, mac) if mac else b""
    return icmp6(135, bytes(4) + ipaddress.IPv6Address(target).packed + opts)


def router_advert(prefix: str, mac: str) -> bytes:
    """An RA for a default router (lifetime 1800 s) announcing ``prefix`` (a /64) on-link
    and for address autoconfiguration, with the router's link-layer address."""
    net = ipaddress.IPv6Network(prefix)
    info = struct.pack("!BBBBIII", 3, 4, net.prefixlen, 0xC0, 86400, 14400, 0)
    info += net.network_address.packed
    body = struct.pack("!BBHII", 64, 0, 1800, 0, 0) + info + lladdr_option(1, mac)
    return icmp6(134, body)


def redirect(target: str, destination: str) -> bytes:
    """A redirect: "reach ``destination`` through ``target``"."""
    return icmp6(
        137,
        bytes(4) + ipaddress.IPv6Address(target).packed + ipaddress.IPv6Address(destination).packed,
    )


def echo6(marker: bytes) -> bytes:
    return icmp6(128, struct.pack("!HH", 0x766E, 1) + marker)


def udp6(marker: bytes, port: int = 9) -> bytes:
    return struct.pack("!HHHH", port, port, 8 + len(marker), 0) + marker


def ipv4_echo(src: str, dst: str, marker: bytes) -> bytes:
    """An IPv4 ICMP echo request carrying ``marker``."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x766E, 1) + marker
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0)
    head += ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return head + icmp


def arp_reply(sender_mac: str, sender_ip: str, target_mac: str, target_ip: str) -> bytes:
    return (
        struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 2)
        + mac_bytes(sender_mac)
        + ipaddress.IPv4Address(sender_ip).packed
        + mac_bytes(target_mac)
        + ipaddress.IPv4Address(target_ip).packed
    )


_SENDER = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for frame in sys.argv[1:]:
    s.send(bytes.fromhex(frame))
"""


def send(session: str, vm: str, frames: Sequence[bytes]) -> None:
    """Send ``frames`` as they are from the VM's ``eth0``."""
    nsops.run(
        names.vm_netns(session, vm),
        [sys.executable, "-c", _SENDER, *(f.hex() for f in frames)],
        check=True,
        timeout=30,
    )


#: Frames received (not sent) containing argv[1] are kept; one containing argv[1] + b"-end" ends the capture,
#: as does the deadline (argv[2] seconds) or 1000 frames kept.
_LISTENER = """
import json, select, socket, sys, time
marker = sys.argv[1].encode()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
kept, ended = [], False
while not ended and len(kept) < 1000:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([s], [], [], left)[0]:
        break
    frame, source = s.recvfrom(65535)
    if source[2] != socket.PACKET_OUTGOING and marker in frame:
        ended = marker + b"-end" in frame
        kept.append(frame.hex())
print(json.dumps({"ended": ended, "frames": kept}), flush=True)
"""


class Listener:
    """A raw socket on a VM's ``eth0`` keeping the frames it receives that carry ``marker``
    (as the VM sees them: a VLAN tag is taken off by its kernel), until one
    carries ``marker`` + ``-end`` (sent last, so every frame sent before it has arrived
    or never will) or ``timeout`` seconds pass."""

    def __init__(self, session: str, vm: str, marker: bytes, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.proc = nsops.popen(
            names.vm_netns(session, vm),
            [sys.executable, "-c", _LISTENER, marker.decode(), str(timeout)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line

    def result(self) -> tuple[bool, list[bytes]]:
        """(whether the end frame arrived, the frames kept before and with it)."""
        out, _ = self.proc.communicate(timeout=self.timeout + 10)
        data = json.loads(out)
        return bool(data["ended"]), [bytes.fromhex(f) for f in data["frames"]]
