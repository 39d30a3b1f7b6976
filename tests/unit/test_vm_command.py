"""A command run in a VM through the agent port: the bounds of its arguments (one check,
:func:`vnic.model.command.check_exec`, for the CLI, both HTTP APIs and the in-process
agent), its result's wire form, the bounded capture of a process's output, and the
routes of the agent and of the manager (admins only) on the fake driver."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.unit.api_fixtures import FAKE_DOCTOR, RATE_DOC, Api, make_api
from tests.unit.test_agent_api import request
from vnic.agent.api import agent_key, create_agent_app
from vnic.agent.client import AgentClient
from vnic.agent.core import Agent
from vnic.dataplane.capture import capture
from vnic.drivers.fake import FakeDriver
from vnic.errors import Conflict, InvalidInput
from vnic.model.command import (
    ARGV_BYTES_MAX,
    ARGV_ITEMS_MAX,
    OUTPUT_MAX,
    TIMED_OUT_STATUS,
    TIMEOUT_MAX,
    ExecResult,
    call_timeout,
    check_exec,
)

# ----------------------------------------------------------------------------- bounds


def fields_of(exc: pytest.ExceptionInfo[InvalidInput]) -> dict[str, str]:
    return {e.path: e.expected for e in exc.value.errors}


def test_the_bounds_accept_their_edges() -> None:
    argv = ["x" * (ARGV_BYTES_MAX // ARGV_ITEMS_MAX)] * ARGV_ITEMS_MAX
    assert check_exec(argv, TIMEOUT_MAX, OUTPUT_MAX) == (tuple(argv), TIMEOUT_MAX, OUTPUT_MAX)
    assert check_exec(("ip", "-o", "link"), 1, 0) == (("ip", "-o", "link"), 1.0, 0)
    assert check_exec(["true"], 0.001, 1) == (("true",), 0.001, 1)


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        ([], "argv", "at least one item"),
        ("ip link", "argv", "a list of strings"),
        (None, "argv", "a list of strings"),
        (["x"] * (ARGV_ITEMS_MAX + 1), "argv", f"at most {ARGV_ITEMS_MAX} items"),
        (["x" * (ARGV_BYTES_MAX + 1)], "argv", f"at most {ARGV_BYTES_MAX} bytes"),
        (["é" * (ARGV_BYTES_MAX // 2 + 1)], "argv", "bytes in all"),  # UTF-8 bytes count
        (["ls", "a\0b"], "argv[1]", "without NUL"),
        (["ls", 3], "argv[1]", "a string"),
        (["ls", "\ud800"], "argv[1]", "valid Unicode"),
        ([""], "argv[0]", "not empty"),
    ],
)
def test_bad_argv_is_refused_by_field(argv: Any, field: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        check_exec(argv, 30, 100)
    assert expected in fields_of(exc)[field], exc.value


@pytest.mark.parametrize(
    "timeout", [0, -1, TIMEOUT_MAX + 0.5, float("nan"), float("inf"), True, "30"]
)
def test_a_bad_timeout_is_refused(timeout: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        check_exec(["true"], timeout, 100)
    assert "at most 300" in fields_of(exc)["timeout"]


@pytest.mark.parametrize("max_output", [-1, OUTPUT_MAX + 1, True, 1.5, "10"])
def test_a_bad_max_output_is_refused(max_output: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        check_exec(["true"], 1, max_output)
    assert "max_output" in fields_of(exc)


def test_every_bad_field_is_named_at_once() -> None:
    with pytest.raises(InvalidInput) as exc:
        check_exec([], 0, -1)
    assert set(fields_of(exc)) == {"argv", "timeout", "max_output"}
    assert "timeout: got 0" in str(exc.value)


def test_a_call_waits_longer_than_its_command() -> None:
    assert call_timeout(30) > 30 and call_timeout(TIMEOUT_MAX) > TIMEOUT_MAX
    for bad in (float("nan"), "x", None, True, 1e9):
        assert 0 < call_timeout(bad) <= TIMEOUT_MAX + 60


# ----------------------------------------------------------------------------- the result


def test_the_result_round_trips_and_says_its_status() -> None:
    for result in (
        ExecResult(0, "out\n", "", False, False, False),
        ExecResult(3, "", "err", True, False, False),
        ExecResult(None, "partial", "", False, True, True),
        ExecResult(-9),
    ):
        assert ExecResult.from_dict(result.to_dict()) == result
    assert ExecResult(3).status == 3
    assert ExecResult(-9).status == 137
    assert ExecResult(None, timed_out=True).status == TIMED_OUT_STATUS == 124


def test_a_malformed_result_is_refused_by_field() -> None:
    with pytest.raises(InvalidInput) as exc:
        ExecResult.from_dict({"returncode": "0", "stdout": 1, "timed_out": "no"})
    assert set(fields_of(exc)) == {"returncode", "stdout", "timed_out"}


def test_captured_output_is_cut_at_the_limit_in_bytes() -> None:
    r = ExecResult.captured(0, b"abcdef", "é".encode(), 3)
    assert (r.stdout, r.stdout_truncated) == ("abc", True)
    assert (r.stderr, r.stderr_truncated) == ("é", False)
    cut = ExecResult.captured(0, "é".encode(), b"", 1)  # half a character: replaced
    assert cut.stdout == "\ufffd" and cut.truncated


# ----------------------------------------------------------------------------- capture


def started(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )


def test_capture_keeps_the_limit_and_drains_the_rest() -> None:
    # 8 MiB on stdout: more than a pipe holds, so a reader that stopped would block it.
    proc = started("head -c 8388608 /dev/zero; echo done >&2; exit 5")
    r = capture(proc, timeout=60, max_output=1000)
    assert r.returncode == 5 and not r.timed_out
    assert len(r.stdout) == 1000 and r.stdout_truncated
    assert r.stderr == "done\n" and not r.stderr_truncated


def test_capture_kills_the_process_group_at_the_deadline() -> None:
    # A shell and its child: the child (sleep) must go with it.
    proc = started("echo started; sleep 600; echo never")
    r = capture(proc, timeout=1, max_output=100)
    assert r.timed_out and r.returncode is None and r.status == 124
    assert r.stdout == "started\n"
    assert proc.poll() is not None
    assert wait_for(lambda: live_members(proc.pid) == []), live_members(proc.pid)


def test_a_command_that_writes_without_end_meets_its_deadline() -> None:
    proc = started("yes")
    r = capture(proc, timeout=1, max_output=10)
    assert r.timed_out and r.stdout == "y\n" * 5 and r.stdout_truncated
    assert proc.poll() is not None


def live_members(group: int) -> list[int]:
    """Processes of process group ``group`` that still run (killed ones wait, as zombies,
    for their new parent to reap them)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------------- the agent's API


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[AgentClient, FakeDriver, TestClient]]:
    driver = FakeDriver()
    agent = Agent(
        tmp_path / "agent", {"fake": driver}, default="fake", doctor=lambda: dict(FAKE_DOCTOR)
    )
    key = agent_key(tmp_path / "agent.key")
    with TestClient(create_agent_app(agent, key), base_url="http://127.0.0.1") as http:
        yield AgentClient("http://127.0.0.1", key, default="fake", http=http), driver, http


def test_the_agent_runs_a_command_through_its_api(
    remote: tuple[AgentClient, FakeDriver, TestClient],
) -> None:
    client, driver, _ = remote
    with pytest.raises(Conflict, match="not running"):
        client.exec("lab", "a", ["ip", "link"])
    client.launch(request("a"))
    assert client.exec("lab", "a", ["ip", "-o", "link"], timeout=5) == ExecResult(0)
    assert driver.commands == [("lab", "a", ("ip", "-o", "link"))]
    with pytest.raises(InvalidInput) as exc:
        client.exec("lab", "a", ["x"] * 65, timeout=0)
    assert set(fields_of(exc)) == {"argv", "timeout"}
    assert client.doctor() == FAKE_DOCTOR


def test_the_agents_routes_refuse_bad_bodies(
    remote: tuple[AgentClient, FakeDriver, TestClient],
) -> None:
    client, _, http = remote
    client.launch(request("a"))
    auth = {"Authorization": str(http.headers["Authorization"])}
    for body, field in (
        ({"argv": ["true"], "shell": True}, "shell"),
        ({"timeout": 3}, "argv"),
    ):
        r = http.post("/v1/vms/lab/a/exec", json=body, headers=auth)
        assert r.status_code == 422, r.text
        assert [f["field"] for f in r.json()["fields"]] == [field], r.text
    assert http.post("/v1/vms/lab/a/exec", json=["true"], headers=auth).status_code == 422
    r = http.post("/v1/vms/lab/a/link", json={"up": "yes"}, headers=auth)
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "up"
    wrong = {"Authorization": "Bearer wrong"}  # (the client's key is on ``http`` itself)
    assert http.get("/v1/doctor", headers=wrong).status_code == 401
    r = http.post("/v1/vms/lab/a/exec", json={"argv": ["true"]}, headers=wrong)
    assert r.status_code == 401


def test_a_link_of_a_vm_without_one_names_the_vm(
    remote: tuple[AgentClient, FakeDriver, TestClient],
) -> None:
    client, _, _ = remote
    client.launch(request("a"))
    with pytest.raises(InvalidInput) as exc:
        client.set_link("lab", "a", False)
    assert fields_of(exc) == {"vm": "a QEMU guest (it runs on the fake driver)"}


# ----------------------------------------------------------------------------- the manager's API


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def lab(api: Api) -> None:
    """Session lab1 (alice's) with VM web running and VM idle defined."""
    assert api.call("admin", "POST", "/v1/profiles", json=RATE_DOC).status_code == 201
    body = {"name": "lab1", "default_profile": "campus", "owner": "alice"}
    assert api.call("admin", "POST", "/v1/sessions", json=body).status_code == 201
    for vm, launch in (("web", True), ("idle", False)):
        r = api.call("admin", "POST", "/v1/sessions/lab1/vms", json={"name": vm, "launch": launch})
        assert r.status_code == 201, r.text


def test_exec_link_and_doctor_are_for_admins(api: Api) -> None:
    lab(api)
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/v1/sessions/lab1/vms/web/exec", {"argv": ["hostname"]}),
        ("POST", "/v1/sessions/lab1/vms/web/link", {"up": False}),
        ("GET", "/v1/doctor", None),
    ]
    for who in ("alice", "bob", "reader"):
        for method, path, body in calls:
            r = api.call(who, method, path, json=body)
            assert r.status_code == 403, (who, path, r.text)
            assert "needs the admin role" in r.json()["message"]
    assert api.driver.commands == []
    r = api.call("admin", "POST", "/v1/sessions/lab1/vms/web/exec", json={"argv": ["hostname"]})
    assert r.status_code == 200, r.text
    assert r.json() == ExecResult(0).to_dict()
    assert api.driver.commands == [("lab1", "web", ("hostname",))]
    assert api.call("admin", "GET", "/v1/doctor").json() == FAKE_DOCTOR


def test_exec_needs_a_running_vm_and_bounded_arguments(api: Api) -> None:
    lab(api)
    exec_ = "/v1/sessions/lab1/vms/{}/exec"
    r = api.call("admin", "POST", exec_.format("nope"), json={"argv": ["true"]})
    assert r.status_code == 404, r.text
    r = api.call("admin", "POST", exec_.format("idle"), json={"argv": ["true"]})
    assert r.status_code == 409 and "not running" in r.json()["message"], r.text
    for body, field in (
        ({"argv": []}, "argv"),
        ({"argv": ["true"], "timeout": 301}, "timeout"),
        ({"argv": ["true"], "timeout": "30"}, "timeout"),
        ({"argv": ["true"], "max_output": 2 << 20}, "max_output"),
        ({"argv": ["a\0"]}, "argv[0]"),
        ({"argv": ["true"], "shell": True}, "shell"),
    ):
        r = api.call("admin", "POST", exec_.format("web"), json=body)
        assert r.status_code == 422, (body, r.text)
        assert [f["field"] for f in r.json()["fields"]] == [field], (body, r.text)
    assert api.driver.commands == []


def test_link_of_a_vm_of_another_driver_names_the_vm(api: Api) -> None:
    lab(api)
    r = api.call("admin", "POST", "/v1/sessions/lab1/vms/web/link", json={"up": True})
    assert r.status_code == 422, r.text
    assert r.json()["fields"] == [
        {
            "field": "vm",
            "value": "'lab1/web'",
            "expected": "a QEMU guest (it runs on the fake driver)",
        }
    ]
    r = api.call("admin", "POST", "/v1/sessions/lab1/vms/web/link", json={"up": "down"})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "up", r.text
