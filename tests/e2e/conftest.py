"""End-to-end tier: real `vnic serve` / `vnic agent` processes, real HTTP, real kernel,
real traffic, a real Prometheus server. Root only (see tests/netns/conftest.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.fleet import fleet  # noqa: F401  (a manager and agents on them)
from tests.netns.conftest import leftovers, pytest_collection_modifyitems  # noqa: F401
from tests.netns.hostbeds import hostbed  # noqa: F401  (emulated hosts, a fixture)

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vnic(home: Path, *args: str, timeout: float = 120) -> str:
    """Run the `vnic` CLI embedded on ``home``'s database; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", *args],
        env={**os.environ, "VNIC_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class Server:
    """A `vnic serve` or `vnic agent` process of the test's own."""

    def __init__(self, home: Path, command: str, *args: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"{command}-{uuid.uuid4().hex[:6]}.log"
        self.argv = [sys.executable, "-m", "vnic.cli.app", command, "--port", str(self.port), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, "VNIC_HOME": str(self.home)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"{self.argv} did not answer: {self.log.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


class Client:
    """HTTP calls with a token; asserts on the status."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )

    def __call__(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        assert r.status_code == expect, (method, path, r.status_code, r.text)
        return r.json() if r.content else None


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A VNIC_HOME of the test's own (database, agent state, run files)."""
    yield tmp_path


@pytest.fixture
def session_name() -> Iterator[str]:
    name = f"e{uuid.uuid4().hex[:8]}"
    yield name
    left = leftovers(name)
    assert left == [], f"namespaces left behind: {left}"


def admin_token(home: Path) -> str:
    return vnic(home, "token", "create", "admin", "--role", "admin").split(": ")[-1].strip()


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus not found; scripts/install.sh installs Debian's package")
    return found
