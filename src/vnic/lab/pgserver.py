"""A throwaway PostgreSQL server of our own (benchmarks and tests): a fresh cluster in a
temporary directory, reached by its Unix socket only (``listen_addresses=''``), with
``fsync=off`` (nothing in it outlives the run). As root, the cluster belongs to the
``postgres`` user, since PostgreSQL refuses to run as root.

Needs Debian's server binaries (``/usr/lib/postgresql/*/bin``; ``scripts/install.sh``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

from vnic.errors import InvalidInput, VnicError

#: Seconds any one pg_ctl or initdb call may take.
PG_TIMEOUT = 120


def pg_bin() -> Path:
    """The newest installed PostgreSQL server's ``bin`` directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise VnicError(
            "PostgreSQL server binaries not found; run scripts/install.sh "
            "(installs Debian's postgresql)"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (its number names the Unix socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A fresh cluster in a temporary directory, started; :meth:`stop` removes it all."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="vnic-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        try:
            initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres"]
            self._run([*initdb, "--auth=trust", "-E", "UTF8"])
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, cmd: list[str]) -> None:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(
            cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=PG_TIMEOUT
        )

    def start(self) -> None:
        """Start the cluster (waits until it accepts connections)."""
        options = f"-c listen_addresses='' -c unix_socket_directories={self.dir}"
        options += f" -p {self.port} -c fsync=off"
        ctl = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log")]
        self._run([*ctl, "-w", "-o", options, "start"])

    def restart(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: pg_ctl's ``smart``, ``fast`` or ``immediate``: a
        crash) and start it again on the same socket, its data kept."""
        if mode not in ("smart", "fast", "immediate"):
            raise InvalidInput.one("mode", mode, "one of smart, fast, immediate")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"vnic_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=str(self.dir), port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        try:
            self._run(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
            )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
