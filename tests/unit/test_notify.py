"""The replicas' wake-ups (``LISTEN/NOTIFY``) across a PostgreSQL restart: the
listener connects again by itself and is woken by a notification sent afterwards; a
notification names what it wakes (one host's long polls, or the waits for reports)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from tests.conftest import _PgServer, new_pg_url
from vnic.manager.changelog import STATUS, Waiters, host_key
from vnic.manager.notify import Listener, notify
from vnic.store.db import Database


class Counting(Waiters):
    def __init__(self) -> None:
        super().__init__()
        self.wakes = 0
        self.keys: list[list[str] | None] = []
        self.woken = threading.Event()

    def wake(self, keys: Iterable[str] | None = None) -> None:
        self.wakes += 1
        self.keys.append(None if keys is None else list(keys))
        self.woken.set()
        super().wake(keys)


def _woken_by_a_notification(db: Database, waiters: Counting, timeout: float = 20.0) -> bool:
    """Send NOTIFY (committed) until the listener wakes ``waiters``; bounded."""
    start = waiters.wakes
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiters.woken.clear()
        with db.transaction() as s:
            notify(s)
        if waiters.woken.wait(1.0) and waiters.wakes > start:
            return True
    return False


@contextlib.contextmanager
def _listening(pg_server: Any) -> Iterator[tuple[Database, Counting, Listener]]:
    """A new database with a listener that has been woken by one notification."""
    db = Database(new_pg_url(pg_server))
    waiters = Counting()
    listener = Listener(db, waiters)
    try:
        listener.start()
        assert listener.connected.wait(20)
        assert _woken_by_a_notification(db, waiters)
        yield db, waiters, listener
    finally:
        db.dispose()


def test_the_listener_listens_again_after_postgresql_restarts(pg_server: Any) -> None:
    if not isinstance(pg_server, _PgServer):
        pytest.skip("restarting PostgreSQL needs the tests' own server")
    with _listening(pg_server) as (db, waiters, listener):
        pg_server.restart()
        # The restart cut the listening connection: it notices, and connects again.
        deadline = time.monotonic() + 30
        while listener.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a flag the listener clears; bounded
        assert listener.connected.wait(30), "the listener did not connect again"
        assert _woken_by_a_notification(db, waiters)


def test_a_notification_wakes_only_what_it_names(pg_server: Any) -> None:
    with _listening(pg_server) as (db, waiters, _):
        waiters.woken.clear()
        with db.transaction() as s:
            for _ in range(3):  # sent three times, delivered once
                notify(s, host_key(7))
            notify(s, STATUS)
        deadline = time.monotonic() + 20
        wanted = [[host_key(7)], [STATUS]]
        while time.monotonic() < deadline and any(k not in waiters.keys for k in wanted):
            waiters.woken.wait(0.5)
            waiters.woken.clear()
        assert waiters.keys.count([host_key(7)]) == 1 and waiters.keys.count([STATUS]) == 1


def test_a_wait_on_a_key_ignores_other_keys_but_not_a_wake_of_everything() -> None:
    waiters = Waiters(poll=60.0)
    mine, other = host_key(1), host_key(2)
    start = waiters._seen(mine)
    waiters.wake([other, STATUS])
    assert waiters._seen(mine) == start  # a wait on host 1 sleeps on
    assert waiters._seen(None) != start  # a wait on anything wakes
    returned = threading.Event()

    def wait() -> None:
        waiters.wait(60.0, mine)
        returned.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    while thread.is_alive() and not returned.is_set():
        waiters.wake([mine])  # until the thread is in its wait and sees one
        returned.wait(0.05)
    assert returned.is_set()  # woken long before its 60 s poll
    thread.join(10)
