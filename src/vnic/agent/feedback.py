"""The feedback endpoint: where an application inside a VM asks for a different network.

Served by the agent at the session's own address (``.1`` of the session's
IPv4 subnet and ``::1`` of its IPv6 one, port 80), inside
the session namespace: only the session's VMs can reach it. A VM is known by
the address its request comes from, never by what the request says; the
port guard drops frames whose source address is not the sending VM's own
(see :mod:`vnic.dataplane.nft`), so the address cannot be forged.

``GET /v1/feedback`` tells the VM what it runs and what it may ask for;
``POST /v1/feedback`` with ``{"set": {...}}`` or ``{"profile": NAME}`` (and
optionally ``"duration": "60s"``) asks for a change, decided by the
session's feedback limits (:mod:`vnic.controller.feedback`); ``DELETE``
hands back what was asked. Answers are JSON; a refusal is 403 with a reason
naming the field, the value and the limit.

A VM is untrusted, so the endpoint bounds what it may cost (constants below):

- one thread reads every connection of every session without blocking
  (:mod:`selectors`), and a pool of :data:`WORKERS` threads answers complete
  requests: the thread count does not grow with connections;
- at most :data:`MAX_CONNECTIONS` connections at once, :data:`MAX_PER_SESSION`
  from one session's VMs, :data:`MAX_PER_SOURCE` from one address; one more is
  answered 503 and closed at once;
- every connection is a request and counts against its address's budget
  (:class:`~vnic.agent.feedback_http.SourceBudget`), GET or POST, well formed
  or not; beyond it the answer is 429 with ``Retry-After``;
- a request is read strictly (:mod:`vnic.agent.feedback_http`) within
  :data:`REQUEST_DEADLINE_S`, and a connection silent for :data:`IDLE_TIMEOUT_S`
  is answered 408 and closed;
- a malformed request from a VM counts against its session's ``per_minute``
  feedback limit (:meth:`FeedbackDecider.malformed`).

Why one module: :class:`FeedbackEndpoints` is one selector loop and its worker pool
sharing one lock over the listeners, the connections and the three connection caps;
its methods keep those counts consistent together, and split across modules each
would need the others' private state. The HTTP parsing and the per-address budget,
which need none of it, are :mod:`vnic.agent.feedback_http`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import math
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from vnic.agent.feedback_http import (
    MAX_BODY,
    BadRequest,
    SourceBudget,
    head_end,
    parse_body,
    parse_head,
)
from vnic.dataplane import namespaces as nsops
from vnic.plan import names

__all__ = [
    "FEEDBACK_PORT",
    "MAX_BODY",
    "FeedbackDecider",
    "FeedbackEndpoints",
    "endpoint_addresses",
    "endpoint_url",
]

log = logging.getLogger(__name__)
_K = TypeVar("_K")

#: TCP port of the feedback endpoint, on the session's own addresses (plain HTTP's:
#: nothing else listens there, and a VM needs no port to remember).
FEEDBACK_PORT: Final = 80
#: Threads answering complete requests (shared by every session's endpoint).
WORKERS: Final = 4
#: Connections open at once, over every session's endpoint.
MAX_CONNECTIONS: Final = 256
#: Connections open at once from one address of one session.
MAX_PER_SOURCE: Final = 8
#: Connections open at once from the VMs of one session (the others keep the rest).
MAX_PER_SESSION: Final = 64
#: Seconds from a connection's accept to its complete request (head and body).
REQUEST_DEADLINE_S: Final = 5.0
#: Seconds a connection may send nothing while its request is incomplete.
IDLE_TIMEOUT_S: Final = 2.0
#: Seconds an answer may take to be sent.
WRITE_DEADLINE_S: Final = 5.0
#: After an answer: seconds, and bytes, read and dropped until the VM closes (so the
#: answer is not lost to a reset by unread bytes), before the connection is closed.
LINGER_S: Final = 1.0
LINGER_BYTES: Final = 64 * 1024
#: Seconds between checks of the deadlines above (the loop's longest wait).
TICK_S: Final = 0.1
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FeedbackDecider(Protocol):
    """What answers a VM's request: the manager (in-process with ``vnic serve``)."""

    def feedback(
        self, session: str, vm: str, method: str, body: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]: ...

    def malformed(self, session: str, vm: str, reason: str) -> None:
        """Count a request of ``vm`` the endpoint refused as malformed against the
        session's feedback limit (``per_minute``)."""
        ...


def endpoint_addresses(
    network_id: int,
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    """The session's own addresses, where the endpoint listens."""
    v4, v6 = names.session_ipv4(network_id), names.session_ipv6(network_id)
    return (
        ipaddress.IPv4Interface((int(v4.network_address) + 1, v4.prefixlen)),
        ipaddress.IPv6Interface((int(v6.network_address) + 1, v6.prefixlen)),
    )


def _netns_identity(netns: str) -> tuple[int, int] | None:
    """Which namespace the name ``netns`` stands for now: its file's device and inode."""
    try:
        st = os.stat(os.path.join(nsops.RUN_DIR, netns))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def endpoint_url(network_id: int) -> str:
    """What a VM of the session calls: ``http://10.x.y.1/v1/feedback``."""
    return f"http://{endpoint_addresses(network_id)[0].ip}/v1/feedback"


def response(status: int, body: Mapping[str, Any], retry_after: float | None = None) -> bytes:
    """An HTTP/1.0 answer with a JSON body (the connection closes after it)."""
    data = json.dumps(body, default=str).encode()
    lines = [
        f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if retry_after is not None:
        lines.append(f"Retry-After: {max(1, math.ceil(retry_after))}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


@dataclass(eq=False)
class _Listener:
    session: str
    sock: socket.socket


@dataclass(eq=False)
class _Conn:
    """One VM connection; ``state``: reading, working (a worker answers), writing,
    lingering (answered; dropping what the VM still sends)."""

    session: str
    sock: socket.socket
    peer: str
    accepted: float
    last: float
    state: str = "reading"
    data: bytearray = field(default_factory=bytearray)
    head: Any = None  # feedback_http.Head once read
    body_at: int = 0
    out: bytes = b""
    sent: int = 0
    until: float = 0.0
    dropped: int = 0
    watched: bool = True  # registered with the selector

    @property
    def source(self) -> tuple[str, str]:
        return (self.session, self.peer)


class FeedbackEndpoints:
    """One endpoint per session with VMs on this host, started and stopped by the agent.

    ``who(session, ip)`` names the running VM with that address (None: none).
    ``clock``: monotonic seconds, for every deadline and the request budget.
    """

    def __init__(
        self,
        who: Callable[[str, str], str | None],
        clock: Callable[[], float] = time.monotonic,
        budget: SourceBudget | None = None,
    ) -> None:
        self.who = who
        self.clock = clock
        self.decider: FeedbackDecider | None = None
        self.budget = budget or SourceBudget()
        self._listeners: dict[str, list[_Listener]] = {}
        #: the (device, inode) of each session's namespace its listeners are in
        self._netns: dict[str, tuple[int, int] | None] = {}
        self._conns: set[_Conn] = set()
        self._per_source: dict[tuple[str, str], int] = {}
        self._per_session: dict[str, int] = {}
        self._lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._calls: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = (
            queue.SimpleQueue()
        )
        self._done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def ensure(self, session: str, network_id: int) -> None:
        """Listen in the session's namespace (idempotent). A namespace made anew since
        (a repair or reconcile rebuilt a deleted one) gets new listeners: the old ones
        would answer nobody, and keep the old namespace alive."""
        netns = names.session_netns(session)
        here = _netns_identity(netns)
        with self._lock:
            known = session in self._listeners
            if known and self._netns.get(session) == here:
                return
        if known:
            self.close(session)
        with self._lock:
            if session in self._listeners:
                return
            sockets = nsops.session_listener(netns, endpoint_addresses(network_id), FEEDBACK_PORT)
            self._netns[session] = here
            self._serve(session, sockets)

    def serve(self, session: str, sockets: list[socket.socket]) -> None:
        """Serve ``session``'s endpoint on listening ``sockets`` (taken over: closed by
        :meth:`close`); what :meth:`ensure` does once it has them, and what tests
        call with a socket on 127.0.0.1."""
        with self._lock:
            if session in self._listeners:
                for sock in sockets:
                    sock.close()
                return
            self._serve(session, sockets)

    def _serve(self, session: str, sockets: list[socket.socket]) -> None:
        self._start()
        listeners = [_Listener(session, sock) for sock in sockets]
        for listener in listeners:
            listener.sock.setblocking(False)

        def register() -> None:
            assert self._selector is not None
            for listener in listeners:
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)

        try:
            self._call(register)
        except BaseException:
            for listener in listeners:
                listener.sock.close()
            raise
        self._listeners[session] = listeners

    def attach(self, decider: FeedbackDecider) -> None:
        self.decider = decider

    def close(self, session: str) -> None:
        """Stop listening for ``session`` and close its connections; its sockets are
        closed when this returns (they would keep its namespace alive)."""
        with self._lock:
            listeners = self._listeners.pop(session, [])
            self._netns.pop(session, None)
        if not listeners:
            return

        def unregister() -> None:
            for listener in listeners:
                self._forget(listener.sock)
            for conn in [c for c in self._conns if c.session == session]:
                self._drop(conn)

        self._call(unregister)

    def close_all(self) -> None:
        """Close every session's endpoint and stop the loop and its workers."""
        for session in self.sessions():
            self.close(session)
        with self._lock:
            thread, pool = self._thread, self._pool
            self._stopping = True
            self._wake()
        if thread is not None:
            thread.join(timeout=5)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            if self._selector is not None:
                self._selector.close()
            self._thread = self._pool = self._selector = None
            self._wake_r = self._wake_w = None
            self._stopping = False

    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(self._listeners)

    def connections(self) -> int:
        """Connections open now (read by tests and metrics)."""
        return len(self._conns)

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="vnic-feedback-worker")
        self._thread = threading.Thread(target=self._loop, name="vnic-feedback", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full: the loop is being woken already
                self._wake_w.send(b"x")

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop's thread (it owns the selector) and wait for it."""
        done = threading.Event()
        failed: list[BaseException] = []

        def call() -> None:
            try:
                fn()
            except BaseException as exc:  # raised again in the caller's thread
                failed.append(exc)

        self._calls.put((call, done))
        self._wake()
        if not done.wait(timeout=10):
            raise OSError(errno.ETIMEDOUT, "the feedback endpoint's loop did not answer in 10 s")
        if failed:
            raise failed[0]

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        selector = self._selector
        assert selector is not None
        while not self._stopping:
            try:
                events = selector.select(TICK_S)
            except OSError as exc:  # pragma: no cover - a closed selector at shutdown
                log.warning("feedback endpoint loop: %s", exc)
                break
            for key, mask in events:
                self._event(key.data, mask)
            self._run_calls()
            try:
                self._answers()
                self._deadlines()
            except Exception:  # the loop serves every session: it must not die of one
                log.exception("feedback endpoint loop")
        for conn in list(self._conns):
            self._drop(conn)
        self._run_calls()

    def _event(self, data: Any, mask: int) -> None:
        try:
            if data is None:
                self._drain_wake()
            elif isinstance(data, _Listener):
                self._accept(data)
            elif data in self._conns:
                if mask & selectors.EVENT_READ:
                    self._read(data)
                if mask & selectors.EVENT_WRITE and data in self._conns:
                    self._write(data)
        except Exception as exc:  # one connection's failure closes it, not the endpoint
            if not isinstance(exc, OSError):
                log.exception("feedback endpoint connection")
            if isinstance(data, _Conn):
                self._drop(data)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            finally:
                done.set()

    def _forget(self, sock: socket.socket, watched: bool = True) -> None:
        assert self._selector is not None
        if watched:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        sock.close()

    def _accept(self, listener: _Listener) -> None:
        for _ in range(64):  # then let the other sockets have a turn
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("feedback endpoint of %s: %s", listener.session, exc)
                return
            sock.setblocking(False)
            now = self.clock()
            peer = str(address[0]).removeprefix("::ffff:")
            source = (listener.session, peer)
            wait = self.budget.take(source, now)
            if (
                len(self._conns) >= MAX_CONNECTIONS
                or self._per_session.get(listener.session, 0) >= MAX_PER_SESSION
                or self._per_source.get(source, 0) >= MAX_PER_SOURCE
            ):
                self._refuse_at_once(sock)
                continue
            conn = _Conn(listener.session, sock, peer, now, now)
            self._conns.add(conn)
            self._per_source[source] = self._per_source.get(source, 0) + 1
            self._per_session[listener.session] = self._per_session.get(listener.session, 0) + 1
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, conn)
            if wait > 0:
                self._reply(
                    conn,
                    response(
                        429,
                        {
                            "error": "too_many_requests",
                            "message": f"{peer} asked over {self.budget.rate:g} times a "
                            f"second (at most {self.budget.burst:g} at once); try again in "
                            f"{max(wait, 0.1):.1f} s",
                            "retry_after": round(wait, 3),
                        },
                        retry_after=wait,
                    ),
                )

    def _refuse_at_once(self, sock: socket.socket) -> None:
        """503 without keeping the connection: no thread, no table entry, no wait."""
        try:
            with contextlib.suppress(OSError):  # what already came, so closing does not reset
                sock.recv(MAX_BODY)
            sock.send(
                response(
                    503,
                    {"error": "unavailable", "message": "too many connections; try again later"},
                    retry_after=1,
                )
            )
        except OSError:
            pass
        finally:
            sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_BODY)
        except (BlockingIOError, InterruptedError):
            return
        if conn.state == "lingering":
            conn.dropped += len(chunk)
            if not chunk or conn.dropped > LINGER_BYTES:
                self._drop(conn)
            return
        if not chunk:
            self._drop(conn)
            return
        conn.last = self.clock()
        looked = len(conn.data)
        conn.data += chunk
        try:
            if conn.head is None:
                end = head_end(conn.data, looked)
                if end < 0:
                    return
                conn.head = parse_head(conn.data[:end])
                conn.body_at = end
            have = len(conn.data) - conn.body_at
            if have < conn.head.length:
                return
            if have > conn.head.length:
                raise BadRequest(
                    400,
                    "body",
                    f"{have} bytes",
                    f"the {conn.head.length} bytes its Content-Length says (one request)",
                )
            body = parse_body(conn.data[conn.body_at :])
        except BadRequest as exc:
            self._work(conn, None, exc)
            return
        self._work(conn, body, None)

    def _work(self, conn: _Conn, body: dict[str, Any] | None, bad: BadRequest | None) -> None:
        conn.state = "working"
        conn.data = bytearray()
        assert self._selector is not None and self._pool is not None
        # Not watched while a worker answers: a VM that half-closes after its request
        # still gets the answer; one that went away fails the write.
        self._selector.unregister(conn.sock)
        conn.watched = False
        method = conn.head.method if conn.head is not None else "?"
        self._pool.submit(self._answer, conn, method, body, bad)

    def _answer(
        self, conn: _Conn, method: str, body: dict[str, Any] | None, bad: BadRequest | None
    ) -> None:
        """In a worker: the answer to a complete request (or a malformed one)."""
        try:
            out = self._decide(conn, method, body, bad)
        except Exception:  # one request's failure is its answer, not the endpoint's
            log.exception("feedback request of %s in session %s", conn.peer, conn.session)
            out = response(500, {"error": "internal", "message": "the request failed"})
        self._done.put((conn, out))
        self._wake()

    def _decide(
        self, conn: _Conn, method: str, body: dict[str, Any] | None, bad: BadRequest | None
    ) -> bytes:
        vm = self.who(conn.session, conn.peer)
        decider = self.decider
        if bad is not None:
            if vm is not None and decider is not None:
                decider.malformed(conn.session, vm, str(bad))
            return response(bad.status, bad.answer())
        if vm is None:
            return response(
                403,
                {
                    "error": "forbidden",
                    "message": f"{conn.peer} is not a running VM of this session",
                },
            )
        if decider is None:
            return response(503, {"error": "unavailable", "message": "no manager attached"})
        status, answer = decider.feedback(conn.session, vm, method, body or {})
        retry = answer.get("retry_after")
        return response(status, answer, retry_after=retry if isinstance(retry, float) else None)

    def _answers(self) -> None:
        while True:
            try:
                conn, out = self._done.get_nowait()
            except queue.Empty:
                return
            if conn in self._conns:
                self._reply(conn, out)

    def _reply(self, conn: _Conn, out: bytes) -> None:
        conn.state, conn.out, conn.sent = "writing", out, 0
        conn.until = self.clock() + WRITE_DEADLINE_S
        self._watch(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        assert self._selector is not None
        if conn.watched:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
            conn.watched = True

    def _write(self, conn: _Conn) -> None:
        if conn.state != "writing":
            return
        try:
            conn.sent += conn.sock.send(conn.out[conn.sent :])
        except (BlockingIOError, InterruptedError):
            return
        if conn.sent < len(conn.out):
            return
        conn.out = b""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.state, conn.until = "lingering", self.clock() + LINGER_S
        self._watch(conn, selectors.EVENT_READ)

    def _deadlines(self) -> None:
        now = self.clock()
        for conn in list(self._conns):
            if conn.state == "reading":
                if now - conn.accepted > REQUEST_DEADLINE_S:
                    why = f"the request took over {REQUEST_DEADLINE_S:g} s"
                elif now - conn.last > IDLE_TIMEOUT_S:
                    why = f"nothing came for {IDLE_TIMEOUT_S:g} s"
                else:
                    continue
                self._reply(conn, response(408, {"error": "timeout", "message": why}))
            elif conn.state in ("writing", "lingering") and now > conn.until:
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        _less(self._per_source, conn.source)
        _less(self._per_session, conn.session)
        self._forget(conn.sock, conn.watched)


def _less(counts: dict[_K, int], key: _K) -> None:
    """One less of ``key`` in ``counts`` (gone at zero: the table does not grow)."""
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
