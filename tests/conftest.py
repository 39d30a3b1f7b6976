"""Shared fixtures: databases (a SQLite file and a real, throwaway PostgreSQL server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnic.errors import VnicError
from vnic.lab.pgserver import PgServer
from vnic.manager.service import Service
from vnic.store.db import Database


@pytest.fixture(scope="session", autouse=True)
def _own_vnic_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never touch this host's own vnic state (``/var/lib/vnic``: the agent's desired
    VMs, which a later ``vnic serve`` would relaunch): without a VNIC_HOME of their own,
    they get one for the run. Tests that run the CLI set theirs as before."""
    if os.environ.get("VNIC_HOME"):
        yield
        return
    os.environ["VNIC_HOME"] = str(tmp_path_factory.mktemp("vnic-home"))
    try:
        yield
    finally:
        del os.environ["VNIC_HOME"]


#: The tests' own PostgreSQL server (vnic.lab.pgserver, which the benchmarks use too).
_PgServer = PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[_PgServer | str]:
    """A PostgreSQL server for the test run (VNIC_TEST_POSTGRES_URL overrides with an existing one)."""
    given = os.environ.get("VNIC_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    try:
        server = _PgServer()
    except VnicError as exc:  # no server binaries: say how to get them
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


def new_pg_url(server: _PgServer | str) -> str:
    if isinstance(server, str):
        return server
    return server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL, once on a SQLite file and once on real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'vnic.db'}"
    return new_pg_url(request.getfixturevalue("pg_server"))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def service(db: Database) -> Service:
    return Service(db)


@pytest.fixture
def examples_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "examples" / "profiles"
