"""The manager's LISTEN connection on a real PostgreSQL: it connects, and a NOTIFY sent in
another connection's committed transaction wakes its waiters (a rolled-back one does not)."""

from __future__ import annotations

import threading
from typing import Any

from tests.conftest import new_pg_url
from vnic.manager.notify import Listener, notify
from vnic.store.db import Database


class Woken:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def wake(self) -> None:
        self.count += 1
        self.event.set()


def test_the_listener_listens_and_wakes_on_a_committed_notify(pg_server: Any) -> None:
    db = Database(new_pg_url(pg_server))
    try:
        woken = Woken()
        listener = Listener(db, woken)
        listener.start()
        assert listener.connected.wait(30), "the listener never connected"
        assert woken.event.wait(5)  # it wakes once on connecting: whatever was missed
        woken.event.clear()
        with db.transaction() as s:
            notify(s)
        assert woken.event.wait(30), "a committed NOTIFY did not wake the waiters"
    finally:
        db.dispose()
