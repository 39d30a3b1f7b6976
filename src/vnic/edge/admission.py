"""What the manager's API lets in, and what leaves when a handler fails.

Admission (:class:`Admission`) bounds the requests in flight, reads and writes
apart, as kube-apiserver's ``--max-requests-inflight`` and
``--max-mutating-requests-inflight`` do: a request takes a slot of its lane
(GET/HEAD/OPTIONS read, every other method writes), may wait a short time for
one, and is refused past that with 429, ``Retry-After`` and the JSON error
body. Reads never wait behind writes: each lane has its own slots, and the
thread pool that runs the (synchronous) handlers has a thread for every slot
of both, so writes cannot take the threads reads need.

A write's body is read whole before the write takes its slot, within
``BODY_DEADLINE_S`` (408 past it): a client that sends its body slowly, or not
at all, holds no slot, so it cannot keep everyone else's writes (the login
included) out. The body's size is bounded by the HTTP guard outside this
middleware (:mod:`vnic.edge.guard`). A client that goes away meanwhile
is forgotten without an answer or a log line.

Health checks pass without a slot: a liveness probe must not be refused because
the API is busy. A session's live event stream is held open for as long as a
page shows it, so it takes a slot of a third lane, ``streams``, with no queue:
past ``max_streams`` open at once, a new one is refused at once.

:class:`LastResort` turns any exception nothing else answered into the JSON
error body: 507 ``no_space`` for a full disk (naming the file or the database),
else 500 ``internal`` with a reference also written to the log, once, with the
traceback. The message names no internals (an attacker reads it too).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vnic.edge.guard import BodyTooLarge
from vnic.errors import Busy, FieldError, InvalidInput, TooSlow, VnicError, storage_error

log = logging.getLogger("vnic.manager")

#: Methods that only read; every other method takes a write slot.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Paths that never take a slot: liveness.
EXEMPT_PATHS = frozenset({"/v1/health"})
#: A session's long-lived event stream: the streams lane (matched whole:
#: ``/v1/profiles/live`` is a profile named live, an ordinary read).
STREAM = re.compile(r"/v1/sessions/[^/]+/live")
#: An agent's watch of its host's changes: a long poll, held up to 30 s: the streams lane.
WATCH = "/v1/agent/changes"
#: An agent's other calls (register, lease, snapshot, status): a lane of their own. A
#: launch holds a write slot while it waits for its agent's status report, which must
#: not wait behind it.
AGENT = re.compile(r"/v1/agent/[a-z]+")

#: Seconds a write's whole body may take to arrive (10 s: 1 MiB at 1 Mbit/s), before
#: the write takes a slot; past it, 408.
BODY_DEADLINE_S = 10.0

#: Threads kept besides the slots: for other thread-pool users.
SPARE_THREADS = 16


@dataclass(frozen=True)
class Limits:
    """Concurrency bounds of the API (``vnic serve`` options of the same names).

    Small on purpose: the handlers are Python under one GIL, so requests in flight
    share the same core; past a few, each only takes longer and the event loop (which
    answers health checks and 429s) gets the GIL less often. Measured with ``vnic bench
    load`` (200 readers + 20 writers, 2 busy cores): 8/4/16/0.25 s gave reads p99 0.6 s
    and more answers per second than 32/8/64/0.5 s (reads p99 1.6 s).

    - ``max_reads``: reads in flight (default 8);
    - ``max_writes``: writes in flight (default 4): writes to SQLite are serialized
      anyway, more of them at once only wait longer for its lock;
    - ``queue``: requests of one lane that may wait for a slot (default 16); past it,
      refused at once;
    - ``wait``: seconds a request may wait for a slot before its 429 (default 0.25);
    - ``retry_after``: seconds the 429 tells the client to wait (default 1);
    - ``max_streams``: live event streams and agents' watches open at once (default 32,
      no queue);
    - ``max_agents``: agents' other calls in flight (default 8, with ``queue`` waiting
      up to 5 s).
    """

    max_reads: int = 8
    max_writes: int = 4
    queue: int = 16
    wait: float = 0.25
    retry_after: int = 1
    max_streams: int = 32
    max_agents: int = 8

    def __post_init__(self) -> None:
        # Named as the vnic serve options that set them.
        for name, option, low in (
            ("max_reads", "--max-reads", 1),
            ("max_writes", "--max-writes", 1),
            ("queue", "--queue", 0),
            ("retry_after", "retry_after", 1),
            ("max_streams", "--max-streams", 1),
            ("max_agents", "--max-agents", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInput.one(option, value, f"a whole number, at least {low}")
        wait = self.wait
        if not isinstance(wait, int | float) or math.isnan(wait) or not 0 <= wait <= 60:
            raise InvalidInput.one("--queue-wait", wait, "seconds between 0 and 60")


class Lane:
    """Slots of one kind of request: ``limit`` at once, ``queue`` waiting, first come first
    served. Used from the event loop's thread only (no lock needed)."""

    def __init__(self, name: str, limit: int, queue: int, wait: float) -> None:
        self.name = name
        self.limit = limit
        self.queue = queue
        self.wait = wait
        self.in_flight = 0
        self.refused = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def enter(self) -> bool:
        """Take a slot (True), or give up (False): the queue is full, or ``wait`` passed."""
        if self.in_flight < self.limit and not self._waiting:
            self.in_flight += 1
            return True
        if len(self._waiting) >= self.queue or self.wait <= 0:
            self.refused += 1
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await asyncio.wait({turn}, timeout=self.wait)
        except BaseException:  # the client went away while waiting
            self._give_up(turn)
            raise
        if turn.done():
            return True  # a leaving request handed its slot over
        self._give_up(turn)
        self.refused += 1
        return False

    def _give_up(self, turn: asyncio.Future[None]) -> None:
        if turn.done() and not turn.cancelled():
            self.leave()  # handed over just now: pass it on
            return
        turn.cancel()
        self._waiting.remove(turn)

    def leave(self) -> None:
        """Give the slot back: to the longest waiter, else free it."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot moves over; in_flight stays
                return
        self.in_flight -= 1


class Admission:
    """ASGI middleware: a slot of the request's lane, or 429 with ``Retry-After``."""

    def __init__(self, app: ASGIApp, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()
        lim = self.limits
        self.reads = Lane("reads", lim.max_reads, lim.queue, lim.wait)
        self.writes = Lane("writes", lim.max_writes, lim.queue, lim.wait)
        self.streams = Lane("streams", lim.max_streams, 0, 0)
        self.agents = Lane("agents", lim.max_agents, lim.queue, 5.0)
        self._threads_sized = False

    def _size_thread_pool(self) -> None:
        # Sync handlers run in anyio's default thread pool (40 threads): with fewer
        # threads than slots, writes holding threads would make reads wait after all.
        import anyio.to_thread

        pool = anyio.to_thread.current_default_thread_limiter()
        lim = self.limits
        wanted = lim.max_reads + lim.max_writes + lim.max_streams + lim.max_agents
        wanted += SPARE_THREADS
        pool.total_tokens = max(int(pool.total_tokens), wanted)
        self._threads_sized = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._threads_sized:
            self._size_thread_pool()
        if scope["method"] not in READ_METHODS:
            try:
                receive = await asyncio.wait_for(_buffered(receive), BODY_DEADLINE_S)
            except TimeoutError:
                await _too_slow(scope, receive, send)
                return
            except ClientDisconnect:
                return  # gone before its body arrived: nothing to answer
        if path == WATCH:
            lane = self.streams
        elif AGENT.fullmatch(path):
            lane = self.agents
        elif scope["method"] not in READ_METHODS:
            lane = self.writes
        else:
            lane = self.streams if STREAM.fullmatch(path) else self.reads
        if not await lane.enter():
            await self._refuse(lane, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            lane.leave()

    async def _refuse(self, lane: Lane, scope: Scope, receive: Receive, send: Send) -> None:
        after = self.limits.retry_after
        exc = Busy(
            f"too many {lane.name} in flight ({lane.limit} running, {len(lane._waiting)} "
            f"waiting); retry after {after} s"
        )
        response = JSONResponse(
            exc.to_dict(), status_code=exc.http_status, headers={"Retry-After": str(after)}
        )
        await response(scope, receive, send)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Slots in use, waiters and refusals so far, per lane."""
        return {
            lane.name: {
                "in_flight": lane.in_flight,
                "waiting": len(lane._waiting),
                "refused": lane.refused,
            }
            for lane in (self.reads, self.writes, self.streams, self.agents)
        }


async def _buffered(receive: Receive) -> Receive:
    """Read a request's whole body from ``receive``; a ``receive`` that replays it, then
    passes on what follows (a disconnect). ClientDisconnect if the client leaves first."""
    messages: list[Message] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        messages.append(message)
        if not message.get("more_body", False):
            break

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


async def _too_slow(scope: Scope, receive: Receive, send: Send) -> None:
    field = FieldError("body", "incomplete", f"a whole body within {BODY_DEADLINE_S:g} s")
    exc = TooSlow(str(field))
    body = {**exc.to_dict(), "fields": [field.to_dict()]}
    response = JSONResponse(body, status_code=exc.http_status)
    await response(scope, receive, send)


class LastResort:
    """ASGI middleware: an exception no handler answered leaves as the JSON error body.

    ``database`` names the database in a full-disk message (its URL, no password).
    """

    def __init__(self, app: ASGIApp, database: str = "the database") -> None:
        self.app = app
        self.database = database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            return  # the client left while its request was read: nobody to answer
        except BodyTooLarge:
            raise  # the HTTP guard outside answers it: 413
        except Exception as exc:
            if started:
                # Too late for a body (the server closes the connection); still logged.
                log.error("error after the answer began on %s", scope.get("path"), exc_info=exc)
                return
            await self.answer(exc, scope)(scope, receive, send)

    def answer(self, exc: Exception, scope: Scope) -> JSONResponse:
        """The response for ``exc`` (logged here, once, unless it is a full disk)."""
        known: VnicError | None = exc if isinstance(exc, VnicError) else None
        known = known or storage_error(exc, self.database)
        if known is not None:
            log.warning("%s %s: %s", scope.get("method"), scope.get("path"), known)
            return JSONResponse(known.to_dict(), status_code=known.http_status)
        ref = secrets.token_hex(4)
        log.error(
            "internal error %s on %s %s", ref, scope.get("method"), scope.get("path"), exc_info=exc
        )
        body: dict[str, Any] = {
            "error": "internal",
            "message": f"internal error {ref}: the manager's log has its details",
        }
        return JSONResponse(body, status_code=500)
