"""Waking the manager replicas that share one PostgreSQL: ``LISTEN/NOTIFY``.

A transaction that writes a change of desired state or an agent's report also sends
``NOTIFY vnic_fleet`` (:func:`notify`), which PostgreSQL delivers when — and only if —
the transaction commits. Each manager process listens on one connection of its own
(:class:`Listener`) and wakes its waiting long polls and launches. The notification
only wakes: a waiter reads the database afterwards, and polls anyway
(:attr:`~vnic.manager.changelog.Waiters.poll_listening`), so a lost notification (a broken
listener connection, a replica restarting) costs latency, never a change. SQLite has
no NOTIFY: one process there, woken in process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from vnic.store.db import Database


class Waiters(Protocol):
    """What a listener wakes (:class:`vnic.manager.changelog.Waiters`)."""

    def wake(self, keys: Iterable[str] | None = None) -> None: ...


CHANNEL = "vnic_fleet"

log = logging.getLogger("vnic.manager.notify")


def notify(s: Session, key: str = "") -> None:
    """Send the wake-up of ``key`` (what was written; "": everything) when ``s`` commits
    (PostgreSQL; nothing on SQLite). PostgreSQL sends one notification per distinct
    key of a transaction, however many times it is sent."""
    bind = s.get_bind()
    if bind.dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, :key)"), {"channel": CHANNEL, "key": key})


class Listener(threading.Thread):
    """Wakes ``waiters`` on every notification of :data:`CHANNEL`; reconnects after
    an error (a second later), until the database is disposed (it looks every 5 s)."""

    def __init__(
        self, db: Database, waiters: Waiters, connected: threading.Event | None = None
    ) -> None:
        super().__init__(name="vnic-fleet-listen", daemon=True)
        self.db, self.waiters = db, waiters
        self.connected = threading.Event() if connected is None else connected

    def run(self) -> None:
        while not self.db.disposed:
            try:
                self._listen()
            except Exception as exc:  # any failure: reconnect; waiters poll meanwhile
                self.connected.clear()
                if self.db.disposed:
                    return
                log.warning("fleet listener: %s; reconnecting in 1 s", exc)
                time.sleep(1.0)

    def _listen(self) -> None:
        # A connection of its own, made by the driver, not the pool: a pooled connection
        # detached after the server restarted came back without its driver connection
        # (None), and the listener never listened again.
        engine = self.db.engine
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        conn = engine.dialect.connect(*cargs, **cparams)
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
            self.waiters.wake()  # whatever was missed while not listening
            self.connected.set()  # after that wake: any later one is a notification
            while not self.db.disposed:
                for note in conn.notifies(timeout=5.0):
                    self.waiters.wake([note.payload] if note.payload else None)
        finally:
            conn.close()
