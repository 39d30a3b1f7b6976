"""Shared fixtures: databases (a SQLite file and a real, throwaway PostgreSQL server)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found; run scripts/install.sh (installs Debian's postgresql)"
        )
    return Path(found[-1]).parent


class _PgServer:
    """A PostgreSQL server of our own: a fresh cluster in a temp dir, Unix socket only."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="vnic-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            # PostgreSQL refuses to run as root: hand the cluster to the postgres user.
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ]
        )
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "log"),
                "-w",
                "-o",
                f"-c listen_addresses='' -c unix_socket_directories={self.dir} -p {self.port} -c fsync=off",
                "start",
            ]
        )

    def _run(self, cmd: list[str]) -> None:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(
            cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}&port={self.port}"

    def create_database(self) -> str:
        name = f"vnic_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=str(self.dir), port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def restart(self) -> None:
        """Restart the server (``pg_ctl -m fast restart``: every connection is cut, the
        server is back, with the same options, when this returns)."""
        pg_ctl = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log")]
        self._run([*pg_ctl, "-m", "fast", "-w", "restart"])

    def stop(self) -> None:
        try:
            self._run(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
            )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[_PgServer | str]:
    """A PostgreSQL server for the test run (VNIC_TEST_POSTGRES_URL overrides with an existing one)."""
    given = os.environ.get("VNIC_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    server = _PgServer()
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
