"""The database's connections when PostgreSQL restarts or is out of reach: the pool
replaces dead connections (``pool_pre_ping``), and a lost or refused connection is
:class:`~vnic.errors.Unavailable` (503), not an internal error; SQLite's errors stay."""

from __future__ import annotations

import socket
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.conftest import _PgServer, new_pg_url
from vnic.errors import Unavailable
from vnic.store.db import Database


def _terminate_others(pg: _PgServer, url: str) -> int:
    """Cut every connection to the database of ``url`` but this one (what a restart does)."""
    name = make_url(url).database
    with psycopg.connect(
        host=str(pg.dir), port=pg.port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def test_the_pool_replaces_connections_the_server_cut(pg_server: Any) -> None:
    if not isinstance(pg_server, _PgServer):
        pytest.skip("needs the tests' own PostgreSQL server")
    url = new_pg_url(pg_server)
    db = Database(url)
    try:
        with db.reading() as s:
            assert s.execute(text("SELECT 1")).scalar() == 1
        assert _terminate_others(pg_server, url) >= 1  # the pooled connection is dead now
        with db.transaction() as s:
            assert s.execute(text("SELECT 2")).scalar() == 2
    finally:
        db.dispose()


def test_a_postgresql_out_of_reach_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        db = Database(f"postgresql+psycopg://vnic@127.0.0.1:{port}/vnic", migrate=False)
        try:
            with pytest.raises(Unavailable) as got, db.reading() as s:
                s.execute(text("SELECT 1"))
            assert got.value.http_status == 503
            assert "the database did not answer" in str(got.value)
            with pytest.raises(Unavailable), db.transaction() as s:
                s.execute(text("SELECT 1"))
        finally:
            db.dispose()


def test_sqlite_errors_are_not_taken_for_an_unreachable_server(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'vnic.db'}")
    try:
        with pytest.raises(sa_exc.OperationalError), db.reading() as s:
            s.execute(text("SELECT * FROM no_such_table"))
    finally:
        db.dispose()
