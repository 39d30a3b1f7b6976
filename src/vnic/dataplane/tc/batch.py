"""tc requests sent many at a time on one raw rtnetlink socket, each acknowledged.

A live change (see :mod:`vnic.plan.diff`) sends nearly all of its requests
this way: pyroute2 computes HTB rate tables the kernel no longer needs, about
0.4 ms per request, where a batch costs a few microseconds each.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from vnic.dataplane.tc.encode import NLM_F_ACK, NLM_F_REQUEST, NLMSG, NLMSG_ERROR, TcRequest

#: Bytes of requests sent in one datagram.
_SEND_CHUNK = 16 * 1024


class NetlinkBatch:
    """tc requests sent together on one raw rtnetlink socket, each acknowledged.

    :meth:`add` queues a request with a label (whose change it is); :meth:`send`
    sends everything queued and returns the failures, label -> messages. The
    kernel handles each request of a datagram on its own, so one failure does
    not stop the others.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._queue: list[tuple[int, int, bytes, object, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, msg_type: int, flags: int, request: TcRequest, label: object, what: str) -> None:
        """Queue ``request`` (``NLM_F_REQUEST | NLM_F_ACK`` are added to ``flags``)."""
        flags |= NLM_F_REQUEST | NLM_F_ACK
        self._queue.append((msg_type, flags, request.body(), label, what))

    def send(self, timeout: float = 5.0) -> dict[object, list[str]]:
        """Send the queue in chunks, reading each chunk's acknowledgements before the next:
        a socket's receive buffer holds a few hundred acknowledgements, not thousands."""
        if not self._queue:
            return {}
        failures: dict[object, list[str]] = {}
        waiting: dict[int, tuple[object, str]] = {}
        chunk = bytearray()
        self._sock.settimeout(timeout)
        for msg_type, flags, body, label, what in self._queue:
            self._seq += 1
            waiting[self._seq] = (label, what)
            chunk += NLMSG.pack(NLMSG.size + len(body), msg_type, flags, self._seq, 0) + body
            if len(chunk) >= _SEND_CHUNK:
                self._sock.sendto(bytes(chunk), (0, 0))
                chunk.clear()
                self._acknowledged(waiting, failures)
        if chunk:
            self._sock.sendto(bytes(chunk), (0, 0))
            self._acknowledged(waiting, failures)
        self._queue.clear()
        return failures

    def _acknowledged(
        self, waiting: dict[int, tuple[object, str]], failures: dict[object, list[str]]
    ) -> None:
        """Read acknowledgements until none is awaited; errors go to ``failures``."""
        try:
            while waiting:
                data = self._sock.recv(1 << 20)
                offset = 0
                while offset + NLMSG.size <= len(data):
                    length, msg_type, _flags, seq, _pid = NLMSG.unpack_from(data, offset)
                    if msg_type == NLMSG_ERROR and seq in waiting:
                        (code,) = struct.unpack_from("=i", data, offset + NLMSG.size)
                        label, what = waiting.pop(seq)
                        if code:
                            failures.setdefault(label, []).append(
                                f"{what}: {os.strerror(-code)} (errno {-code})"
                            )
                    offset += max(length + (-length % 4), NLMSG.size)
        except TimeoutError:
            for label, what in waiting.values():
                failures.setdefault(label, []).append(f"{what}: no answer from the kernel")
            waiting.clear()


def raw_socket() -> socket.socket:
    """A raw rtnetlink socket in this thread's namespace (open it inside the session's)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    # Acknowledgements without a copy of each request; and room for a chunk's worth of
    # them: the receive buffer counts each one's whole socket buffer (about 1 KB), so
    # the default 208 KB overflows at a couple of hundred (ENOBUFS).
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
    sock.bind((0, 0))
    return sock


#: ``setsockopt`` level and option of netlink sockets (linux/netlink.h).
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
#: ``SO_RCVBUFFORCE`` (asm-generic/socket.h): a receive buffer above rmem_max, as root.
SO_RCVBUFFORCE = 33
_RCVBUF = 8 << 20
