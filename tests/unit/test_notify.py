"""The replicas' wake-ups (``LISTEN/NOTIFY``) across a PostgreSQL restart: the
listener connects again by itself and is woken by a notification sent afterwards."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.conftest import _PgServer, new_pg_url
from vnic.manager.changelog import Waiters
from vnic.manager.notify import Listener, notify
from vnic.store.db import Database


class Counting(Waiters):
    def __init__(self) -> None:
        super().__init__()
        self.wakes = 0
        self.woken = threading.Event()

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()
        super().wake()


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


def test_the_listener_listens_again_after_postgresql_restarts(pg_server: Any) -> None:
    if not isinstance(pg_server, _PgServer):
        pytest.skip("restarting PostgreSQL needs the tests' own server")
    db = Database(new_pg_url(pg_server))
    waiters = Counting()
    listener = Listener(db, waiters)
    try:
        listener.start()
        assert listener.connected.wait(20)
        assert _woken_by_a_notification(db, waiters)
        pg_server.restart()
        # The restart cut the listening connection: it notices, and connects again.
        deadline = time.monotonic() + 30
        while listener.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a flag the listener clears; bounded
        assert listener.connected.wait(30), "the listener did not connect again"
        assert _woken_by_a_notification(db, waiters)
    finally:
        db.dispose()
