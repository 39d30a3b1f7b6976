"""The fleet of the e2e tests of many hosts: a manager (replicas) on a throwaway
PostgreSQL in the manager host of a host bed, a `vnic agent --manager` per emulated host
dialling out over HTTPS (a CA made for the test), a CLI that reaches a replica, and what
the database, each agent and each kernel say runs."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import new_pg_url
from tests.netns.hostbeds import VNIC
from vnic.lab.hostbed import Host, HostBed
from vnic.lab.testca import make_test_ca
from vnic.manager.auth import Tokens
from vnic.manager.service import Service
from vnic.store.db import Database

PORTS = (8470, 8480)  # the two manager replicas
METRICS_PORT = 8472
SESSION = "fleet"
#: Frames per TCP goodput byte: 1514 on the wire for 1448 of payload.
FRAME = 1514 / 1448

#: Inside a host: iperf3 between two of its VMs, the rate in bit/s on stdout.
IPERF = """
import sys
from vnic.lab import measure
session, client, server, ip = sys.argv[1:5]
print(measure.iperf3(session, client, server, ip, seconds=2.0).bits_per_second)
"""


#: From the manager host: one POST to /v1/agent/<path> with a host's token; prints
#: [status code, answer].
AGENT_CALL = """
import json, ssl, sys
import httpx
url, ca, token, path, body = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
r = httpx.post(f"{url}/v1/agent/{path}", json=json.loads(body), verify=ctx,
               headers={"Authorization": f"Bearer {token}"}, timeout=30)
print(json.dumps([r.status_code, r.json()]))
"""

#: From the manager host: define and launch each VM named (POST .../vms, launch: true)
#: with 4 threads, through the replicas' URLs in turn; one JSON line per VM:
#: {"vm", "url", "status" (None: no answer), "detail"}.
LAUNCHER = """
import json, ssl, sys
from concurrent.futures import ThreadPoolExecutor, as_completed
import httpx
urls, ca, token, session = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
names = sys.argv[5:]
ctx = ssl.create_default_context(cafile=ca)
client = httpx.Client(verify=ctx, headers={"Authorization": f"Bearer {token}"}, timeout=90)
def one(i, name):
    url = urls[i % len(urls)]
    try:
        r = client.post(f"{url}/v1/sessions/{session}/vms", json={"name": name, "launch": True})
        return {"vm": name, "url": url, "status": r.status_code, "detail": r.text[:300]}
    except httpx.HTTPError as exc:
        return {"vm": name, "url": url, "status": None, "detail": repr(exc)[:300]}
with ThreadPoolExecutor(4) as pool:
    for f in as_completed([pool.submit(one, i, n) for i, n in enumerate(names)]):
        print(json.dumps(f.result()), flush=True)
"""


class Burst:
    """A running :data:`LAUNCHER` client."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def outcomes(self, timeout: float = 180.0) -> list[dict[str, Any]]:
        """Wait for the client to end (bounded); one outcome per VM."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err.decode(errors="replace")
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something true (bounded; the test names ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


class Fleet:
    """The manager replicas, the agents and a CLI that reaches the first replica."""

    #: Seconds a launch, stop or live change waits for its agent's report (``--host-wait``).
    host_wait = 20
    #: vNICs each agent offers (``--vnics``).
    vnics = 16

    def __init__(self, bed: HostBed, db_url: str, certs: tuple[Path, Path, Path]) -> None:
        self.bed, self.db_url = bed, db_url
        self.ca, self.cert, self.key = certs
        self.db = Database(db_url)
        self.svc = Service(self.db)
        self.admin = Tokens(self.db).create("admin", "admin")[1]
        self.procs: list[subprocess.Popen[bytes]] = []
        #: The process serving each replica now.
        self.replicas: dict[int, subprocess.Popen[bytes]] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.tokens = {h.short: self.svc.add_host(h.short, {"rack": h.short})[1] for h in bed.hosts}

    def url(self, replica: int = 0) -> str:
        return f"https://{self.bed.manager.address4}:{PORTS[replica]}"

    def _log(self, host: Host, name: str) -> Any:
        return open(host.home / f"{name}.log", "ab")

    def serve(self, replica: int) -> None:
        hm = self.bed.manager
        argv = [*VNIC, "serve", "--host", hm.address4, "--port", str(PORTS[replica])]
        argv += ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        argv += ["--host-wait", str(self.host_wait)]
        argv += ["--repair-interval", "0", "--drift-interval", "600"]
        env = {"VNIC_DATABASE_URL": self.db_url}
        with self._log(hm, f"serve{replica}") as log:
            proc = self.bed.spawn(hm, argv, env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        self.replicas[replica] = proc
        until(
            f"replica {replica} answers",
            lambda: self.cli("host", "list", replica=replica, check=False).returncode == 0,
        )

    def kill(self, replica: int) -> None:
        """SIGKILL the replica's process (no shutdown of any kind), and reap it."""
        proc = self.replicas.pop(replica)
        proc.kill()
        proc.wait(timeout=30)

    def start_agent(self, host: Host, replica: int = 0) -> None:
        (host.home / "host.token").write_text(self.tokens[host.short])
        argv = [*VNIC, "agent", "--manager", self.url(replica), "--host", host.short]
        argv += ["--host-token-file", str(host.home / "host.token"), "--ca", str(self.ca)]
        argv += ["--underlay", host.address4, "--vnics", str(self.vnics)]
        argv += ["--metrics-listen", f"{host.address4}:{METRICS_PORT}", "--drift-interval", "600"]
        with self._log(host, "agent") as log:
            self.agents[host.short] = self.bed.spawn(host, argv, stdout=log, stderr=log)

    def cli(
        self, *args: str, replica: int = 0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [*VNIC, "--server", self.url(replica), "--token", self.admin, *args]
        done = self.bed.run("hm", argv, env={"SSL_CERT_FILE": str(self.ca)}, timeout=120)
        if check:
            assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done

    def cli_json(self, *args: str, replica: int = 0) -> Any:
        return json.loads(self.cli(*args, "--json", replica=replica).stdout)

    def agent_call(self, host: Host, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST ``body`` to ``/v1/agent/<path>`` as ``host``'s agent would (its token), from
        the manager host: the status code and the JSON answer."""
        argv = [sys.executable, "-c", AGENT_CALL, self.url(), str(self.ca), self.tokens[host.short]]
        done = self.bed.run("hm", [*argv, path, json.dumps(body)], timeout=60)
        assert done.returncode == 0, done.stderr
        code, answer = json.loads(done.stdout)
        return int(code), answer

    def launch_burst(self, names: list[str], replicas: tuple[int, ...] = (0,)) -> Burst:
        """Start launching ``names`` from a client in the manager host (4 threads, each
        launch through the next of ``replicas`` in turn); :meth:`Burst.outcomes` ends it."""
        urls = ",".join(self.url(r) for r in replicas)
        argv = [sys.executable, "-c", LAUNCHER, urls, str(self.ca), self.admin, SESSION, *names]
        proc = self.bed.spawn("hm", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Burst(proc)

    def log(self, host: Host, name: str) -> str:
        path = host.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def hosts(self) -> dict[str, Any]:
        return {h.name: h for h in self.svc.list_hosts()}

    def placement(self) -> dict[str, str | None]:
        """Running VMs of the session and their hosts, as the database says."""
        return {v.name: v.host for v in self.svc.list_vms(SESSION) if v.state == "running"}

    def kernel(self) -> dict[str, set[str]]:
        """The session's VMs each host's kernel has."""
        return {
            h.short: {vm for s, vm in self.bed.inventory(h).vms() if s == SESSION}
            for h in self.bed.hosts
        }

    def desired(self, host: Host) -> set[str]:
        """The session's VMs in the host agent's own desired-state file."""
        path = host.home / "agent" / "desired.json"
        if not path.exists():
            return set()
        doc = json.loads(path.read_text())
        entries = doc.get("vms", doc) if isinstance(doc, dict) else doc
        return {e["request"]["vm"] for e in entries if e["request"]["session"] == SESSION}

    def agree(self) -> bool:
        """Database running set = each agent's desired set = each kernel's inventory."""
        placed = self.placement()
        want = {h.short: {vm for vm, on in placed.items() if on == h.short} for h in self.bed.hosts}
        kernel = self.kernel()
        desired = {h.short: self.desired(h) for h in self.bed.hosts}
        return want == kernel == desired

    def rate(self, host: Host, client: str, server: str) -> float:
        ip = self.svc.get_vm(SESSION, server).ipv4
        assert ip
        done = self.bed.run(
            host, [sys.executable, "-c", IPERF, SESSION, client, server, ip.split("/")[0]]
        )
        assert done.returncode == 0, done.stderr
        return float(done.stdout.strip().splitlines()[-1]) * FRAME

    def stop(self) -> None:
        for proc in [*self.agents.values(), *self.procs]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in [*self.agents.values(), *self.procs]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.db.dispose()


@contextlib.contextmanager
def new_fleet(
    hostbed: HostBed, pg_server: Any, tmp_path: Path, *, host_wait: int = 20, vnics: int = 16
) -> Iterator[Fleet]:
    """A fleet on ``hostbed`` with replica 0 serving; every VM stopped and every process
    ended afterwards."""
    certs = make_test_ca(tmp_path / "ca", [hostbed.manager.address4])
    f = Fleet(hostbed, new_pg_url(pg_server), certs)
    f.host_wait, f.vnics = host_wait, vnics
    try:
        f.serve(0)
        yield f
    finally:
        # Stop every VM first (agents clean their hosts), then every process.
        if any(f.agents.values()):
            f.cli("session", "down", SESSION, check=False)
        f.stop()


@pytest.fixture
def fleet(hostbed: HostBed, pg_server: Any, tmp_path: Path) -> Iterator[Fleet]:
    with new_fleet(hostbed, pg_server, tmp_path) as f:
        yield f


def write_profiles(fleet: Fleet, rate: str) -> None:
    doc = f"name: edge\negress: {{rate: {rate}}}\ningress: {{rate: {rate}}}\n"
    path = fleet.bed.manager.home / "edge.yaml"
    path.write_text(doc)
    fleet.cli("profile", "apply", "-f", str(path))
