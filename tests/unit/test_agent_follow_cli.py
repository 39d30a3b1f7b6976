"""``vnic agent --manager``: bad flags named before anything is made, and a real agent
process following a manager stand-in (fake driver): snapshot and change applied, metrics
served on the registered URL, SIGTERM exits 0 and leaves the VMs desired."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.unit.test_follow import request
from tests.unit.test_upstream_http import TOKEN, FakeManager, manager, vm_doc  # noqa: F401
from vnic.agent.wire import request_to_wire

VNIC = [sys.executable, "-m", "vnic.cli.app", "agent"]


def agent(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VNIC_HOME": str(home)}
    return subprocess.run([*VNIC, *args], env=env, capture_output=True, text=True, timeout=60)


def test_bad_flags_are_named_and_nothing_is_made(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = agent(
        tmp_path,
        "--manager", "ftp://manager",
        "--host-token-file", str(tmp_path / "missing"),
        "--host", "no spaces",
        "--underlay", "10.250.0.300",
        "--vnics", "0",
        "--label", "rack",
        "--label", "a=1", "--label", "a=2",
        "--metrics-listen", "::1:80",
        "--state-dir", str(state),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    for text in [
        "--manager: got 'ftp://manager'; expected an https:// or http:// URL",
        "--host-token-file: got",
        "--host: got 'no spaces'",
        "--underlay: got '10.250.0.300'",
        "--vnics: got 0; expected a count of vNICs >= 1",
        "--label: got 'rack'; expected KEY=VALUE",
        "--label: got 'a=2'; expected one value per key",
        "--metrics-listen: got '::1:80'",
    ]:
        assert text in proc.stderr
    assert not state.exists()


def test_follow_flags_without_manager_and_api_flags_with_it_are_refused(tmp_path: Path) -> None:
    proc = agent(tmp_path, "--underlay", "10.0.0.1", "--label", "a=b")
    assert proc.returncode == 2
    assert "--underlay: got '10.0.0.1'; expected only with --manager" in proc.stderr
    assert "--label: got" in proc.stderr
    token = tmp_path / "token"
    token.write_text("t\n")
    proc = agent(
        tmp_path, "--manager", "http://127.0.0.1:9", "--host-token-file", str(token),
        "--host", "hv1", "--underlay", "10.0.0.1", "--port", "9000",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--port: got '9000'; expected no control API is served with --manager" in proc.stderr
    proc = agent(
        tmp_path, "--manager", "http://127.0.0.1:9", "--host-token-file", str(token),
        "--host", "hv1", "--underlay", "10.0.0.1", "--ca", str(token),
    )  # fmt: skip
    assert "--ca: got" in proc.stderr and "an https:// --manager" in proc.stderr


def test_an_agent_process_follows_the_manager(
    manager: tuple[FakeManager, str],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    state, url = manager
    state.vms = [vm_doc("a")]
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    env = {**os.environ, "VNIC_HOME": str(tmp_path / "home")}
    args = [
        "--manager", url, "--host-token-file", str(token), "--host", "hv1",
        "--underlay", "127.0.0.1", "--label", "rack=a", "--driver", "fake",
        "--state-dir", str(tmp_path / "state"), "--metrics-listen", "0.0.0.0:0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*VNIC, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert state.wait_for(lambda: any(s["vm"] == "a" for s in state.statuses()))
        ((_, register),) = [b for b in state.bodies if b[0] == "/v1/agent/register"]
        assert register["host"] == "hv1" and register["labels"] == {"rack": "a"}
        assert register["capacity"]["vnics"] == 64
        metrics_url = register["metrics_url"]
        assert metrics_url.startswith("http://127.0.0.1:") and metrics_url.endswith("/metrics")
        scraped = httpx.get(metrics_url, timeout=10)
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith(
            "text/plain"
        )
        assert httpx.get(metrics_url.replace("/metrics", "/v1/vms"), timeout=10).status_code == 404
        state.put({"session": "lab", "vm": "b", "desired": {"driver": "fake",
                   "request": request_to_wire(request("b"))}})  # fmt: skip
        assert state.wait_for(lambda: any(s["vm"] == "b" for s in state.statuses()))
        (b,) = [s for s in state.statuses() if s["vm"] == "b"]
        assert b["error"] is None and b["changes"] == ["launched on the fake driver"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert "following http://127.0.0.1" in out and "stopped (the VMs keep running)" in out
    desired = json.loads((tmp_path / "state" / "desired.json").read_text())
    assert sorted(v["request"]["vm"] for v in desired["vms"]) == ["a", "b"]


def test_the_flags_bound_the_replicas_as_the_source_does() -> None:
    """Two constants, so that ``vnic agent --help`` does not import the HTTP client: the
    flags must refuse exactly what :class:`HttpSource` would."""
    from vnic.agent import upstream
    from vnic.cli import follow_flags

    assert follow_flags.MAX_REPLICAS == upstream.MAX_REPLICAS
