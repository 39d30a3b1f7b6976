"""The active latency probe: ICMP echo between each vNIC and its network's switch.

A network's switch is its bridge in the session namespace (``vbr0`` for
``default``, :func:`vnic.plan.names.bridge_of`); it speaks from the network's
reserved ``.1`` address (see :func:`switch_address`), which the probe puts on
the bridge the first time it probes that network (it goes away with the
session namespace). The round trip crosses the vNIC's shaping both ways, so it
includes its profile's egress and ingress delay.

Scale: no process per VM. One raw ICMP socket per network of a session, bound
to the network's bridge (so two networks with the same subnet cannot answer
for each other) and opened inside the session namespace by the calling thread
(which enters the namespace only to create it); every vNIC gets one echo
request per round, and replies from all networks are awaited together,
matched by identifier, sequence number and source. Reply times are the
kernel's receive timestamps, so a busy probe thread does not inflate what it
measures.

Time bound: a call to :meth:`LatencyProbe.measure` takes at most
``rounds * timeout`` seconds per batch of ``max_sockets`` networks (plus the
time to send), however many vNICs do not answer. A raw socket, not an ICMP
datagram socket: ping sockets need ``net.ipv4.ping_group_range`` to admit the
agent's group in every session namespace, and a fresh namespace admits none.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pyroute2.netlink.exceptions import NetlinkError

from vnic.dataplane import namespaces as nsops
from vnic.errors import DataplaneError
from vnic.model.launch import DEFAULT_NETWORK, PRIMARY_NIC
from vnic.plan import names

#: A vNIC: (session, VM, vNIC name).
Key = tuple[str, str, str]
IPv4 = str | ipaddress.IPv4Address | ipaddress.IPv4Interface
#: A target as a plain tuple: (session, vm, ipv4), optionally with the nic and network.
TargetTuple = tuple[str, str, IPv4] | tuple[str, str, IPv4, str, str]

ECHO_REQUEST, ECHO_REPLY = 8, 0
#: Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS); the socket module does not export it.
SO_TIMESTAMPNS = 35
#: Linux's SO_RCVBUFFORCE (needs CAP_NET_ADMIN), likewise missing from the module.
SO_RCVBUFFORCE = 33
_TIMESPEC = struct.Struct("@ll")
_PAYLOAD = b"vnic-latency"
#: Receive buffer of a probe socket: room for the replies of a full /24 (253 VMs)
#: arriving at once, at about 1 kB of kernel memory per queued reply.
_RCVBUF = 1 << 20
#: Distinct echo identifiers for successive calls in this process.
_calls = itertools.count(1)


class Target(NamedTuple):
    """A vNIC to probe: its VM's session and name, its IPv4 address (interface or bare
    address), its name (default ``eth0``) and its network (default ``default``)."""

    session: str
    vm: str
    ipv4: IPv4
    nic: str = PRIMARY_NIC
    network: str = DEFAULT_NETWORK

    @property
    def key(self) -> Key:
        return (self.session, self.vm, self.nic)


def switch_address(vm_ipv4: IPv4) -> ipaddress.IPv4Interface:
    """A network switch's address: host ``.1`` of the vNIC's subnet (reserved for the
    session by :func:`vnic.plan.names.vm_addresses`). A bare address is taken to
    be in a /24, as every session subnet is (:func:`vnic.plan.names.session_ipv4`)."""
    if isinstance(vm_ipv4, ipaddress.IPv4Interface):
        network = vm_ipv4.network
    else:
        network = ipaddress.IPv4Network(f"{vm_ipv4}/24", strict=False)
    return ipaddress.IPv4Interface((int(network.network_address) + 1, network.prefixlen))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int) -> bytes:
    """An ICMP echo request with a valid checksum (a raw socket sends it as is)."""
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    checksum = _checksum(header + _PAYLOAD)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, checksum, ident, seq) + _PAYLOAD


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an IPv4 packet carrying an ICMP echo reply, else None."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    kind, _, _, ident, seq = struct.unpack_from("!BBHHH", packet, ihl)
    if kind != ECHO_REPLY:
        return None
    return ident, seq


@dataclass
class _Session:
    """The probe socket of one network of a session, and what it has in flight this round."""

    name: str
    network: str
    sock: socket.socket
    targets: list[Target]
    #: sequence number -> (target, monotonic send time, ns)
    sent: dict[int, tuple[Target, int]]


class LatencyProbe:
    """Round trip between vNICs and their network's switch, seconds.

    ``timeout``: seconds to wait for the replies of one round; ``rounds``:
    echo requests per vNIC per call (the first also resolves the neighbour, an
    ARP exchange through the vNIC's shaping that would double a delayed vNIC's
    round trip, so the default two let the second measure the path alone);
    ``max_sockets``: networks probed at once (one socket each).
    """

    def __init__(self, *, timeout: float = 1.0, rounds: int = 2, max_sockets: int = 256) -> None:
        if timeout <= 0 or rounds < 1 or max_sockets < 1:
            raise ValueError("timeout > 0, rounds >= 1 and max_sockets >= 1 are needed")
        self.timeout = timeout
        self.rounds = rounds
        self.max_sockets = max_sockets
        #: (session namespace, bridge) -> identity (inode) of the namespace whose bridge
        #: has its address
        self._addressed: dict[tuple[str, str], int] = {}
        self._latest: dict[Key, float | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ one measurement

    def measure(self, targets: Iterable[Target | TargetTuple]) -> dict[Key, float | None]:
        """Round trip to every target in seconds, by (session, vm, nic); None where no
        reply came in time (no answer, lost, slower than ``timeout``, or its session
        namespace or network bridge is gone).

        Each target gets the result of the last round it answered.
        """
        wanted = [Target(*t) for t in targets]
        out: dict[Key, float | None] = {t.key: None for t in wanted}
        by_network: dict[tuple[str, str], list[Target]] = {}
        for t in wanted:
            by_network.setdefault((t.session, t.network), []).append(t)
        present = set(nsops.listing())
        self._addressed = {k: i for k, i in self._addressed.items() if k[0] in present}
        groups = [
            (sn, ts)
            for sn, ts in sorted(by_network.items())
            if names.session_netns(sn[0]) in present
        ]
        for i in range(0, len(groups), self.max_sockets):
            out.update(self._batch(groups[i : i + self.max_sockets]))
        with self._lock:
            self._latest = dict(out)
        return out

    def _batch(
        self, groups: Sequence[tuple[tuple[str, str], list[Target]]]
    ) -> dict[Key, float | None]:
        out: dict[Key, float | None] = {}
        sessions: list[_Session] = []
        try:
            for (session, network), group in groups:
                sock = self._open(session, network, group[0].ipv4)
                if sock is not None:
                    sessions.append(_Session(session, network, sock, group, {}))
            ident = (os.getpid() + next(_calls)) & 0xFFFF
            for round_ in range(self.rounds):
                for key, rtt in self._round(sessions, ident, round_).items():
                    out[key] = rtt
        finally:
            for s in sessions:
                s.sock.close()
        return out

    def _open(self, session: str, network: str, vm_ipv4: IPv4) -> socket.socket | None:
        """The probe socket of a session's network, bound to its bridge, the switch
        address in place; None if the network has no bridge (yet, or any more)."""
        session_ns = names.session_netns(session)
        bridge = names.bridge_of(network)
        try:
            self._ensure_switch_address(session_ns, bridge, switch_address(vm_ipv4))
            with nsops.inside(session_ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except (DataplaneError, OSError, NetlinkError):
            return None
        try:
            # Requests leave, and replies are taken, through this network's bridge only.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        try:  # past net.core.rmem_max, which would cap a plain SO_RCVBUF
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return sock

    def _ensure_switch_address(
        self, session_ns: str, bridge: str, address: ipaddress.IPv4Interface
    ) -> None:
        # Checked once per bridge of a namespace instance (by its inode), not every
        # round: a netlink round trip per network per round would dominate at scale.
        identity = os.stat(f"{nsops.RUN_DIR}/{session_ns}").st_ino
        if self._addressed.get((session_ns, bridge)) == identity:
            return
        with nsops.opened(session_ns) as ipr:
            index = nsops.link_index(ipr, bridge)
            have = {
                a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET)
            }
            if str(address.ip) not in have:
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(address.ip),
                        prefixlen=address.network.prefixlen,
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:  # another prober added it meanwhile
                        raise
        self._addressed[(session_ns, bridge)] = identity

    def _round(self, sessions: Sequence[_Session], ident: int, round_: int) -> dict[Key, float]:
        """Send every target one echo request, then collect replies until all came
        or ``timeout`` passed. Returns the targets that answered."""
        out: dict[Key, float] = {}
        selector = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit
        try:
            for s in sessions:
                s.sent = {}
                for i, t in enumerate(s.targets):
                    seq = (round_ * len(s.targets) + i) & 0xFFFF
                    try:
                        sent_at = time.monotonic_ns()
                        s.sock.sendto(echo_request(ident, seq), (_address(t), 0))
                    except OSError:
                        continue  # no route or a full buffer: no answer this round
                    s.sent[seq] = (t, sent_at)
                if s.sent:
                    selector.register(s.sock, selectors.EVENT_READ, s)
            deadline = time.monotonic() + self.timeout
            waiting = sum(len(s.sent) for s in sessions)
            while waiting and (left := deadline - time.monotonic()) > 0:
                for event, _ in selector.select(left):
                    s = event.data
                    for key, rtt in _drain(s, ident):
                        out[key] = rtt
                        waiting -= 1
        finally:
            selector.close()
        return out

    # ------------------------------------------------------------------ in the background

    def latest(self) -> dict[Key, float | None]:
        """The result of the last completed :meth:`measure` (empty before the first)."""
        with self._lock:
            return dict(self._latest)

    def start(
        self,
        targets: Callable[[], Iterable[Target | TargetTuple]],
        interval: float = 10.0,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Measure ``targets()`` every ``interval`` seconds in a daemon thread until
        :meth:`stop`; read the results with :meth:`latest`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.measure(targets())
                except Exception as exc:  # a failed round must not end the probing
                    if on_error is not None:
                        on_error(exc)
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="vnic-latency", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (waits for a round in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.rounds * self.timeout * 4 + 5)
            self._thread = None


def _address(target: Target) -> str:
    ip = target.ipv4.ip if isinstance(target.ipv4, ipaddress.IPv4Interface) else target.ipv4
    return str(ip)


def _drain(s: _Session, ident: int) -> list[tuple[Key, float]]:
    """Every reply queued on the session's socket that answers one of its requests."""
    out: list[tuple[Key, float]] = []
    while True:
        try:
            packet, ancillary, _, (source, _) = s.sock.recvmsg(2048, socket.CMSG_SPACE(16))
        except BlockingIOError:
            return out
        arrived = time.monotonic_ns()
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(data)
                # How long the reply sat in the socket, by the kernel's (wall) clock.
                queued = time.time_ns() - (sec * 1_000_000_000 + nsec)
                if 0 <= queued < arrived:
                    arrived -= queued
        reply = parse_echo_reply(packet)
        if reply is None or reply[0] != ident or reply[1] not in s.sent:
            continue
        target, sent_at = s.sent[reply[1]]
        if source != _address(target):
            continue
        del s.sent[reply[1]]
        out.append((target.key, max(arrived - sent_at, 0) / 1e9))
