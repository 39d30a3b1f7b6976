"""One writer per host: a readers-writer lock shared by every process on the host.

Every agent mutation holds it: a launch, live change, destroy or teardown
*shared* (many at once, each touching its own VM), a reconcile, a sync or a
drift repair *exclusive* (alone: it reads everything and may remove what no
one desires). ``vnic serve``'s in-process agent, ``vnic agent`` and an
embedded command (``vnic vm launch`` without ``--server``) on one state
directory lock the same file, ``<state dir>/host.lock``, with ``flock``: the
kernel drops a dead process's lock, so SIGKILL at any moment leaves none
behind.

Inside one process the lock is a readers-writer lock over threads (a waiting
writer goes before new readers) and the process holds the file ``LOCK_SH``
while any of its threads reads, ``LOCK_EX`` while one writes. It is
reentrant per thread: a holder may enter again, shared inside exclusive
included; asking for exclusive while holding shared is a bug and raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vnic.errors import Unavailable

#: Seconds a mutation waits for the host before it gives up (a QEMU guest's boot
#: under TCG, held shared by its launch, is the longest thing that can be waiting).
WAIT = 600.0
#: Seconds between two tries of the file lock while another process holds it.
_POLL = 0.01


class _Depth(threading.local):
    """How deeply this thread holds the lock shared (0 in a thread that never took it)."""

    depth = 0


class HostLock:
    """The host's writer lock at ``path`` (None: this process's threads only)."""

    def __init__(self, path: Path | None, wait: float = WAIT) -> None:
        self.path = path
        self.wait = wait
        self._cond = threading.Condition()
        self._readers = 0  # threads of this process holding it shared
        self._writer: int | None = None  # the thread holding it exclusive
        self._writer_depth = 0
        self._writers_waiting = 0
        self._pending = False  # a first reader is taking the file lock
        self._fd: int | None = None
        self._mine = _Depth()

    # ------------------------------------------------------------------ public

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the host with other readers (waits up to :attr:`wait` seconds, then
        :class:`~vnic.errors.Unavailable`)."""
        me = threading.get_ident()
        if self._writer == me or self._depth() > 0:
            self._nest(+1)
            try:
                yield
            finally:
                self._nest(-1)
            return
        deadline = time.monotonic() + self.wait
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._writer is None and self._writers_waiting == 0 and not self._pending,
                timeout=self.wait,
            ):
                raise self._busy("shared", self.wait)
            first = self._readers == 0
            if first:
                self._pending = True  # the file lock is being taken, outside _cond
            else:
                self._readers += 1
        if first:
            # Polled without _cond: another process may hold the file for minutes, and
            # this process's other threads (a repair asking with wait=0) must not queue
            # behind the poll on _cond.
            try:
                self._file_lock(fcntl.LOCK_SH, deadline, "shared", self.wait)
            finally:
                with self._cond:
                    self._pending = False
                    if self._fd is not None or self.path is None:
                        self._readers += 1
                    self._cond.notify_all()
        self._mine.depth = 1
        try:
            yield
        finally:
            self._mine.depth = 0
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._file_unlock()
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, *, wait: float | None = None) -> Iterator[bool]:
        """Hold the host alone; yields True. ``wait`` seconds at most (default
        :attr:`wait`): past them :class:`~vnic.errors.Unavailable`, or with ``wait=0``
        yields False at once (and holds nothing) when anyone holds it."""
        me = threading.get_ident()
        if self._writer == me:
            self._writer_depth += 1
            try:
                yield True
            finally:
                self._writer_depth -= 1
            return
        if self._depth() > 0:
            raise RuntimeError("exclusive host lock asked for while holding it shared")
        limit = self.wait if wait is None else wait
        got = self._acquire_exclusive(me, limit)
        if not got:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._writer = None
                self._writer_depth = 0
                self._file_unlock()
                self._cond.notify_all()

    def held(self) -> bool:
        """Whether this thread holds the lock (either way)."""
        return self._writer == threading.get_ident() or self._depth() > 0

    # ------------------------------------------------------------------ inside

    def _depth(self) -> int:
        return self._mine.depth

    def _nest(self, step: int) -> None:
        if self._writer == threading.get_ident():
            self._writer_depth += step
        else:
            self._mine.depth = self._depth() + step

    def _acquire_exclusive(self, me: int, limit: float) -> bool:
        deadline = time.monotonic() + limit
        with self._cond:
            self._writers_waiting += 1
            try:
                free = self._cond.wait_for(
                    lambda: self._writer is None and self._readers == 0 and not self._pending,
                    timeout=max(limit, 0.0),
                )
                if not free:
                    if limit <= 0:
                        return False
                    raise self._busy("exclusive", limit)
                self._writer = me
                self._writer_depth = 1
            finally:
                self._writers_waiting -= 1
        try:
            self._file_lock(fcntl.LOCK_EX, deadline, "exclusive", limit, give_up=limit <= 0)
        except BaseException:
            with self._cond:
                self._writer = None
                self._writer_depth = 0
                self._cond.notify_all()
            raise
        if self._fd is None and self.path is not None:  # given up at once (wait=0)
            with self._cond:
                self._writer = None
                self._writer_depth = 0
                self._cond.notify_all()
            return False
        return True

    def _file_lock(
        self, how: int, deadline: float, what: str, limit: float, *, give_up: bool = False
    ) -> None:
        """Lock the file ``how``; poll (another process holds it) until ``deadline``."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if give_up:
                    os.close(fd)
                    return
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise self._busy(what, limit) from None
                time.sleep(_POLL)

    def _file_unlock(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of the open file unlocks it

    def _busy(self, what: str, limit: float) -> Unavailable:
        where = f" ({self.path})" if self.path is not None else ""
        return Unavailable(
            f"the host is busy: no {what} hold of its agent lock{where} within "
            f"{limit:g} s (another launch, reconcile or repair holds it)"
        )
