"""The CLI against a running manager (--server) prints what it prints embedded, refuses
bad input with the same message (one validation path), and is held to its token's role."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import Client, Server, admin_token, vnic
from vnic.drivers.netns import NetnsDriver

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "profiles"


def cli(
    home: Path, *args: str, server: Server | None = None, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VNIC_HOME": str(home)}
    env.pop("VNIC_SERVER", None)
    if server is not None:
        env["VNIC_SERVER"] = server.url
        env["VNIC_TOKEN"] = token or ""
    return subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_remote_matches_embedded(home: Path, tmp_path_factory, session_name: str) -> None:  # type: ignore[no-untyped-def]
    embedded = tmp_path_factory.mktemp("embedded")
    server = Server(home, "serve", "--latency-interval", "1", "--drift-interval", "2")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    try:
        remote = cli(home, "profile", "apply", "-f", str(EXAMPLES), server=server, token=token)
        local = cli(embedded, "profile", "apply", "-f", str(EXAMPLES))
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
        for where, srv in ((home, server), (embedded, None)):
            r = cli(where, "session", "create", session_name, "-p", "lan", server=srv, token=token)
            assert r.returncode == 0, r.stderr

        # Same refusal, same words, nothing changed.
        bad = ("vm", "add", session_name, "b", "--set", "egress.rate=fast")
        remote, local = cli(home, *bad, server=server, token=token), cli(embedded, *bad)
        assert remote.returncode == local.returncode == 2
        assert "egress.rate: got 'fast'" in remote.stderr
        assert remote.stderr == local.stderr
        assert admin("GET", f"/v1/sessions/{session_name}/vms") == []

        r = cli(home, "vm", "launch", session_name, "a", server=server, token=token)
        assert r.returncode == 0, r.stderr
        assert "running" in r.stdout
        shown = json.loads(
            cli(
                home, "vm", "explain", session_name, "a", "--json", server=server, token=token
            ).stdout
        )
        assert shown == admin("GET", f"/v1/sessions/{session_name}/vms/a/explain")
        assert shown["effective"]["fields"]["egress.rate"]["value"] == "1Gbit"

        top = cli(
            home,
            "top",
            session_name,
            "--count",
            "1",
            "--interval",
            "0.5",
            server=server,
            token=token,
        )
        assert top.returncode == 0, top.stderr
        assert " a " in top.stdout and "egress" in top.stdout and "1Gbit" in top.stdout

        # An owner token may not touch profiles: refused by the manager, exit 2.
        owner = admin("POST", "/v1/tokens", 201, json={"name": "carol", "role": "owner"})["secret"]
        r = cli(home, "profile", "delete", "lan", server=server, token=owner)
        assert r.returncode == 2 and "needs the admin role" in r.stderr, r.stderr
        r = cli(home, "profile", "list", server=server, token="vnic_wrong")
        assert r.returncode == 2 and "not known" in r.stderr, r.stderr

        r = cli(home, "session", "down", session_name, server=server, token=token)
        assert r.returncode == 0 and "1 VMs stopped" in r.stdout, r.stdout + r.stderr
    finally:
        try:
            admin.http.post(f"/v1/sessions/{session_name}/down")
        finally:
            server.kill()
            NetnsDriver().teardown_session(session_name)
    assert vnic(embedded, "session", "list", "--json")
