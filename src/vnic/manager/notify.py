"""Waking the manager replicas that share one PostgreSQL: ``LISTEN/NOTIFY``.

A transaction that writes a change of desired state or an agent's report also sends
``NOTIFY vnic_fleet`` (:func:`notify`), which PostgreSQL delivers when — and only if —
the transaction commits. Each manager process listens on one connection of its own
(:class:`Listener`) and wakes its waiting long polls and launches. The notification
only wakes: a waiter reads the database afterwards, and polls anyway
(:attr:`~vnic.manager.changelog.Waiters.poll`), so a lost notification (a broken
listener connection, a replica restarting) costs latency, never a change. SQLite has
no NOTIFY: one process there, woken in process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from vnic.store.db import Database


class Waiters(Protocol):
    """What a listener wakes (:class:`vnic.manager.changelog.Waiters`)."""

    def wake(self) -> None: ...


CHANNEL = "vnic_fleet"
#: Seconds a waiter polls at most between two looks, with a listener (without: 0.2 s).
POLL_LISTENING = 1.0

log = logging.getLogger("vnic.manager.notify")


def notify(s: Session) -> None:
    """Send the wake-up when ``s`` commits (PostgreSQL; nothing on SQLite)."""
    bind = s.get_bind()
    if bind.dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


class Listener(threading.Thread):
    """Wakes ``waiters`` on every notification of :data:`CHANNEL`; reconnects after
    an error (a second later), as long as the process runs."""

    def __init__(self, db: Database, waiters: Waiters) -> None:
        super().__init__(name="vnic-fleet-listen", daemon=True)
        self.db, self.waiters = db, waiters
        self.connected = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self._listen()
            except Exception as exc:
                self.connected.clear()
                log.warning("fleet listener: %s; reconnecting in 1 s", exc)
                time.sleep(1.0)

    def _listen(self) -> None:
        raw = self.db.engine.raw_connection()
        # Taken before detach(): SQLAlchemy 2.1 forgets driver_connection on detach.
        conn = raw.driver_connection
        raw.detach()  # a connection of its own, never back in the pool
        try:
            conn.autocommit = True  # type: ignore[union-attr]
            conn.execute(f"LISTEN {CHANNEL}")  # type: ignore[union-attr]
            self.connected.set()
            self.waiters.wake()  # whatever was missed while not listening
            while True:
                for _ in conn.notifies(timeout=5.0):  # type: ignore[union-attr]
                    self.waiters.wake()
        finally:
            raw.close()
