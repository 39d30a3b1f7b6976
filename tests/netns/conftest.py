"""Root tier: real namespaces, links, qdiscs and traffic. Every session made here is
torn down after its test, and the test fails if anything of it is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vnic.agent.core import Agent
from vnic.dataplane import delayd, qemu, vminit
from vnic.dataplane import namespaces as nsops
from vnic.drivers.netns import NetnsDriver
from vnic.manager.results import Explanation, VmRequest
from vnic.manager.service import Service
from vnic.model.launch import LaunchRequest
from vnic.model.profile import parse_assignments, parse_profile_document
from vnic.model.session import AssignmentRule
from vnic.plan import names
from vnic.store.db import Database

pytestmark = pytest.mark.root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            if "tests/netns" in str(item.fspath) or "tests/e2e" in str(item.fspath):
                item.add_marker(
                    pytest.mark.skip(reason="needs root and a real kernel (CI runs as root)")
                )


class Lab:
    """A database, the netns driver, an agent with it alone (on a state directory of its
    own), and the sessions a test made. The service launches through :attr:`agent`;
    :attr:`driver` is for checks of the dataplane itself."""

    def __init__(self, db_path: Path) -> None:
        self.db = Database(f"sqlite:///{db_path}")
        self.service = Service(self.db)
        self.driver = NetnsDriver()
        self.state_dir = db_path.parent / "agent"
        self.agent = Agent(self.state_dir, {"netns": self.driver})
        self.sessions: list[str] = []

    def agents(self, kind: str) -> Agent:
        """A new agent like :attr:`agent` (its own driver, the same state directory): what
        each process of :meth:`Service.launch_many` launches with."""
        return Agent(self.state_dir, {kind: NetnsDriver()}, default=kind)

    def profile(self, **doc: Any) -> str:
        spec = parse_profile_document(doc)
        self.service.apply_profiles([spec])
        return spec.name

    def session(self, default: str | None = None, rules: list[AssignmentRule] | None = None) -> str:
        name = f"t{uuid.uuid4().hex[:8]}"
        self.service.create_session(name, default_profile=default, rules=rules or [])
        self.sessions.append(name)
        return name

    def launch(
        self,
        session: str,
        vm: str,
        *,
        profile: str | None = None,
        sets: list[str] | None = None,
        role: str | None = None,
    ) -> Explanation:
        patch = parse_assignments(sets) if sets else None
        self.service.add_vm(VmRequest(session, vm, role=role, profile=profile, patch=patch))
        return self.service.launch_vm(session, vm, self.agent)

    def exec(self, session: str, vm: str, *argv: str) -> str:
        proc = self.driver.exec(session, vm, list(argv), capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def teardown(self) -> None:
        for session in self.sessions:
            self.service.session_down(session, self.agent)
        self.db.dispose()


def launch_in_child(lab: Lab, session: str, vms: list[str]) -> subprocess.Popen[bytes]:
    """Launch ``vms`` (already defined) from a separate process, as `vnic session up` would,
    so a test can kill that process part-way through."""
    script = "; ".join(
        [
            "import sys",
            "from vnic.manager.service import Service",
            "from vnic.store.db import Database",
            "from pathlib import Path",
            "from vnic.agent.core import Agent",
            "from vnic.drivers.netns import NetnsDriver",
            "svc = Service(Database(sys.argv[1]))",
            "a = Agent(Path(sys.argv[2]), {'netns': NetnsDriver()})",
            "[svc.launch_vm(sys.argv[3], vm, a) for vm in sys.argv[4:]]",
        ]
    )
    env = {**os.environ, "VNIC_DATABASE_URL": str(lab.db.url)}
    argv = [str(lab.db.url), str(lab.state_dir), session, *vms]
    return subprocess.Popen([sys.executable, "-c", script, *argv], env=env)


def doctor_json() -> dict[str, Any]:
    """`vnic doctor --json`, run as a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def leftovers(session: str) -> list[str]:
    """Namespaces of ``session`` that still exist."""
    return [n for n in nsops.listing() if names.of_session(n, session)]


def guest_leftovers(session: str) -> list[str]:
    """What of ``session``'s QEMU guests is still on the host: processes carrying one of
    its owner tags, and its run directory."""
    found = [f"qemu pid {p}" for p in qemu.owned_processes(names.owner_tag(session, ""))]
    run = qemu.run_root() / session
    if run.exists():
        found.append(f"run dir {run}")
    return found


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "vnic.db")
    try:
        yield lab
    finally:
        lab.teardown()
        left = [n for s in lab.sessions for n in leftovers(s)]
        assert left == [], f"namespaces left behind: {left}"


@dataclass
class Multi:
    """The netns driver and the sessions a test made (torn down after it)."""

    driver: NetnsDriver = field(default_factory=NetnsDriver)
    sessions: list[str] = field(default_factory=list)

    def session(self) -> str:
        name = f"m{uuid.uuid4().hex[:8]}"
        self.sessions.append(name)
        return name

    def launch(self, *requests: LaunchRequest) -> None:
        for request in requests:
            self.driver.launch(request)

    def exec(self, session: str, vm: str, *argv: str, ok: bool = True) -> str:
        proc = self.driver.exec(session, vm, list(argv), capture_output=True, timeout=30)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc.stdout


def left_of(session: str) -> list[str]:
    """Everything of ``session`` still on the host: namespaces, engine processes and run
    files, init run directories."""
    found = leftovers(session)
    found += [f"engine pid {p}" for p, (s, _) in delayd.engine_processes().items() if s == session]
    found += [f"engine files {u}" for u in delayd.run_files().get(session, set())]
    found += [f"init run dir {v}" for v in vminit.run_dirs().get(session, set())]
    return found


@pytest.fixture
def multi() -> Iterator[Multi]:
    lab = Multi()
    try:
        yield lab
    finally:
        for session in lab.sessions:
            lab.driver.teardown_session(session)
        left = [x for s in lab.sessions for x in left_of(s)]
        assert left == [], f"left behind: {left}"
