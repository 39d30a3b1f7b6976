"""A full disk: the database and the agent's desired state each on a small tmpfs this test
mounts (and unmounts) itself, filled to the last page.

The CLI exits 2 with ``error:`` naming the database and "no space left"; the API
answers 507 with the JSON error body naming the file; no temp file is left, and
the database and the desired state read back as before.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server
from vnic.agent.core import Agent
from vnic.drivers.fake import FakeDriver
from vnic.errors import NoSpace, storage_error
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.profile import parse_profile_document
from vnic.store.db import Database

pytestmark = pytest.mark.root


def mount_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(where: Path) -> Path:
    """Write ``where/filler`` until the filesystem refuses another byte (bounded)."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            for _ in range(10_000):
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            else:
                pytest.fail(f"{where} never filled")
    return filler


def many_profiles(path: Path, count: int = 300) -> Path:
    """A multi-document file big enough that SQLite must grow its files to take it."""
    docs = [
        f"name: full{i}\ndescription: {'x' * 200}\negress:\n  rate: {i + 1}Mbit\n"
        for i in range(count)
    ]
    path.write_text("---\n".join(docs))
    return path


def desired_files(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.name != "filler"}


@pytest.fixture
def full_db(tmp_path: Path) -> Iterator[Path]:
    yield from mount_tmpfs(tmp_path / "dbfs", "2m")


def test_cli_on_a_full_database_disk_exits_2_naming_it(tmp_path: Path, full_db: Path) -> None:
    db_file = full_db / "vnic.db"
    env = {**os.environ, "VNIC_HOME": str(tmp_path), "VNIC_DATABASE_URL": f"sqlite:///{db_file}"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vnic.cli.app", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    base = tmp_path / "base.yaml"
    base.write_text("name: base\negress:\n  rate: 5Mbit\n")
    assert cli("profile", "apply", "-f", str(base)).returncode == 0
    before = cli("profile", "list", "--json").stdout
    filler = fill(full_db)

    run = cli("profile", "apply", "-f", str(many_profiles(tmp_path / "many.yaml")))
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error:"), run.stderr
    assert "no space left" in run.stderr and str(db_file) in run.stderr
    assert "Traceback" not in run.stderr
    # A new process cannot even read: SQLite must make its shared-memory index first.
    listing = cli("profile", "list", "--json")
    assert listing.returncode == 2 and "no space left" in listing.stderr, listing.stderr
    filler.unlink()
    assert cli("profile", "list", "--json").stdout == before  # nothing half-written showed up


def test_desired_state_on_a_full_disk_leaves_no_temp_file(tmp_path: Path) -> None:
    for state in mount_tmpfs(tmp_path / "agent", "1m"):
        db = Database(f"sqlite:///{tmp_path / 'vnic.db'}")
        svc = Service(db)
        svc.apply_profiles([parse_profile_document({"name": "p", "egress": {"rate": "5Mbit"}})])
        svc.create_session("s", default_profile="p")
        agent = Agent(state, {"fake": FakeDriver()}, default="fake")
        svc.add_vm(VmRequest("s", "a"))
        svc.launch_vm("s", "a", agent)
        for i in range(40):  # a desired state of some size, so the next write needs pages
            svc.add_vm(VmRequest("s", f"b{i}"))
        before = desired_files(state)
        filler = fill(state)
        with pytest.raises(NoSpace) as caught:  # the agent's OSError, named as a full disk
            svc.launch_vm("s", "b0", agent)
        assert str(state / "desired.json") in str(caught.value)
        assert storage_error(caught.value.__cause__ or caught.value) is not None
        assert desired_files(state) == before  # no desired.tmp<pid>, the file as it was
        assert [vm.key for vm in agent.state.all()] == [("s", "a")]
        assert svc.get_vm("s", "b0").state == "defined"
        filler.unlink()
        svc.launch_vm("s", "b0", agent)  # with space again, it works
        assert {vm.key for vm in agent.state.all()} == {("s", "a"), ("s", "b0")}
        db.dispose()


def test_api_on_a_full_disk_answers_507_and_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    mounts = [mount_tmpfs(home / "agent", "1m"), mount_tmpfs(tmp_path / "dbfs", "2m")]
    state, dbfs = (next(m) for m in mounts)
    try:
        url = f"sqlite:///{dbfs / 'vnic.db'}"
        db = Database(url)
        from vnic.manager.auth import Tokens

        _, secret = Tokens(db).create("admin", "admin")
        db.dispose()
        os.environ["VNIC_DATABASE_URL"] = url  # the server's database; its log stays in home
        try:
            server = Server(home, "serve", "--driver", "fake", "--drift-interval", "600").start()
        finally:
            del os.environ["VNIC_DATABASE_URL"]
        try:
            api = httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60
            )
            s = f"f{uuid.uuid4().hex[:6]}"
            assert api.post(
                "/v1/profiles", json={"name": "p", "egress": {"rate": "5Mbit"}}
            ).is_success
            assert api.post("/v1/sessions", json={"name": s, "default_profile": "p"}).is_success
            assert api.post(f"/v1/sessions/{s}/vms", json={"name": "a", "launch": True}).is_success
            assert api.post(f"/v1/sessions/{s}/vms", json={"name": "b"}).is_success
            profiles = api.get("/v1/export/profiles").json()
            vms = api.get(f"/v1/sessions/{s}/vms").json()
            desired = desired_files(state)
            fillers = [fill(dbfs), fill(state)]

            docs = [
                {"name": f"full{i}", "description": "x" * 200, "egress": {"rate": f"{i + 1}Mbit"}}
                for i in range(300)
            ]
            r = api.post("/v1/import/profiles", json=docs)
            assert r.status_code == 507, r.text
            assert r.json()["error"] == "no_space"
            assert str(dbfs / "vnic.db") in r.json()["message"]

            r = api.post(f"/v1/sessions/{s}/vms/b/launch")
            assert r.status_code == 507, r.text
            assert r.json()["error"] == "no_space"
            assert str(state / "desired.json") in r.json()["message"]

            assert api.get("/v1/export/profiles").json() == profiles
            assert api.get(f"/v1/sessions/{s}/vms").json() == vms
            assert desired_files(state) == desired  # no temp file, the file unchanged
            for f in fillers:
                f.unlink()
            r = api.post(f"/v1/sessions/{s}/vms/b/launch")  # space again: it works
            assert r.status_code == 200, r.text
            assert api.post(f"/v1/sessions/{s}/down").is_success
        finally:
            server.kill()
    finally:
        for m in mounts:
            next(m, None)  # unmount
