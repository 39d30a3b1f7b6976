"""The CLI against a running manager (--server) prints what it prints embedded, refuses
bad input with the same message (one validation path), and is held to its token's role;
``vm exec``, ``vm link`` and ``doctor`` reach the manager's agent (admins only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import Client, Server, admin_token, vnic
from tests.netns.conftest import guest_leftovers
from tests.netns.helpers import until
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
        assert " a/eth0 " in top.stdout and "out profile" in top.stdout and "1Gbit" in top.stdout

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


def test_cli_remote_exec_link_and_doctor(home: Path, session_name: str) -> None:
    """``vm exec``, ``vm link`` and ``doctor`` with --server act on the manager's agent, for
    admins only."""
    s = session_name
    server = Server(home, "serve", "--latency-interval", "600", "--drift-interval", "600")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    try:

        def remote(*args: str, as_: str = token) -> subprocess.CompletedProcess[str]:
            return cli(home, *args, server=server, token=as_)

        admin("POST", "/v1/sessions", 201, json={"name": s})
        admin("POST", f"/v1/sessions/{s}/vms", 201, json={"name": "a", "launch": True})
        vm = admin("GET", f"/v1/sessions/{s}/vms/a")

        r = remote("vm", "exec", s, "a", "--", "ip", "-o", "link")
        assert r.returncode == 0, r.stderr
        assert ": eth0@" in r.stdout and vm["mac"] in r.stdout, r.stdout
        r = remote("vm", "exec", s, "a", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        r = remote("vm", "exec", s, "a", "--timeout", "1", "--", "sleep", "3619")
        assert r.returncode == 124 and "did not end within 1 s" in r.stderr, r.stderr
        r = remote("vm", "exec", s, "a", "--timeout", "301", "--", "true")
        assert r.returncode == 2 and "timeout: got 301" in r.stderr, r.stderr
        r = remote("vm", "exec", s, "nope", "--", "true")
        assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr

        r = remote("vm", "link", s, "a", "down")
        assert r.returncode == 2, r.stdout
        assert f"vm: got '{s}/a'; expected a QEMU guest (it runs on the netns driver)" in r.stderr

        r = remote("doctor", "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert set(report) == {
            "kernel",
            "tools_missing",
            "drivers",
            "delay_engine",
            "qemu",
            "vnics",
        }
        assert [d["kind"] for d in report["drivers"]] == ["netns", "qemu"]
        assert (s, "a") in {(v["session"], v["vm"]) for v in report["vnics"]}
        text = remote("doctor")
        assert text.returncode == 0 and "delay and loss engine:" in text.stdout, text.stderr

        # Owners and readers may not: 403, exit 2, nothing run.
        for role in ("owner", "reader"):
            secret = admin("POST", "/v1/tokens", 201, json={"name": role, "role": role})["secret"]
            for args in (
                ("vm", "exec", s, "a", "--", "touch", "/tmp/by-" + role),
                ("vm", "link", s, "a", "up"),
                ("doctor", "--json"),
            ):
                r = remote(*args, as_=secret)
                assert r.returncode == 2 and "needs the admin role" in r.stderr, (role, args)
            r = remote("vm", "exec", s, "a", "--", "ls", "/tmp")
            assert "by-" + role not in r.stdout
    finally:
        try:
            admin.http.post(f"/v1/sessions/{s}/down")
        finally:
            server.kill()
            NetnsDriver().teardown_session(s)


def test_cli_remote_link_and_exec_of_a_qemu_guest(home: Path, session_name: str) -> None:
    """``vm link`` with --server takes a QEMU guest's carrier down and up (the guest sees
    it), and ``vm exec`` runs in the guest through its agent."""
    s = session_name
    server = Server(home, "serve", "--latency-interval", "600", "--drift-interval", "600")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    try:

        def remote(*args: str) -> subprocess.CompletedProcess[str]:
            return cli(home, *args, server=server, token=token)

        def carrier() -> str:
            r = remote("vm", "exec", s, "g", "--", "cat", "/sys/class/net/eth0/carrier")
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        admin("POST", "/v1/sessions", 201, json={"name": s})
        body = {"name": "g", "launch": True, "driver": "qemu"}
        admin("POST", f"/v1/sessions/{s}/vms", 201, json=body)
        r = remote("vm", "exec", s, "g", "--", "uname", "-r")
        assert r.returncode == 0 and "cloud-amd64" in r.stdout, r.stderr  # the guest's kernel
        assert carrier() == "1"
        r = remote("vm", "link", s, "g", "down")
        assert r.returncode == 0 and "link down" in r.stdout, r.stderr
        assert until(lambda: carrier() == "0")
        r = remote("vm", "link", s, "g", "up")
        assert r.returncode == 0 and "link up" in r.stdout, r.stderr
        assert until(lambda: carrier() == "1")
    finally:
        try:
            admin.http.delete(f"/v1/sessions/{s}", params={"force": True})
        finally:
            server.kill()
    assert guest_leftovers(s) == []


def test_cli_remote_networks_and_vnics_match_embedded(home: Path, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """``session network ...``, ``vm add --nic``, ``vm set VM/NIC`` and ``vm explain``
    through --server print and refuse what they do embedded (nothing launched: the
    kernel side of several vNICs is the data plane's tests)."""
    embedded = tmp_path_factory.mktemp("embedded-nics")
    server = Server(home, "serve")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    try:

        def both(*args: str) -> subprocess.CompletedProcess[str]:
            remote = cli(home, *args, server=server, token=token)
            local = cli(embedded, *args)
            assert (remote.returncode, remote.stdout, remote.stderr) == (
                local.returncode,
                local.stdout,
                local.stderr,
            ), args
            return remote

        assert both("profile", "apply", "-f", str(EXAMPLES)).returncode == 0
        assert both("session", "create", "nets", "-p", "lan").returncode == 0
        r = both("session", "network", "add", "nets", "data", "--id", "777", "--profile", "wan-dsl")
        assert r.returncode == 0 and "network id 777" in r.stdout, r.stderr
        r = both("session", "network", "add", "nets", "again", "--id", "777")
        assert r.returncode == 2 and "network_id: got 777" in r.stderr
        r = both("vm", "add", "nets", "a", "--nic", "net=default", "--nic", "net=data")
        assert r.returncode == 0 and "eth1 on data" in r.stdout, r.stderr
        r = both("vm", "add", "nets", "b", "--nic", "net=nope")
        assert r.returncode == 2 and "nics[0].network" in r.stderr
        assert both("vm", "set", "nets", "a/eth1", "egress.rate=3Mbit").returncode == 0
        assert both("vm", "explain", "nets", "a", "--json").returncode == 0
        shown = json.loads(
            cli(home, "vm", "explain", "nets", "a", "--json", server=server, token=token).stdout
        )
        assert shown == admin("GET", "/v1/sessions/nets/vms/a/explain")
        assert shown["nics"][1]["effective"]["fields"]["egress.rate"]["value"] == "3Mbit"
        assert both("vm", "list", "nets").returncode == 0
        assert both("session", "network", "list", "nets", "--json").returncode == 0
        r = both("session", "network", "remove", "nets", "data")
        assert r.returncode == 2 and "nets/a/eth1" in r.stderr
    finally:
        server.kill()
