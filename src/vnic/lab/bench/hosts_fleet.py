"""The fleet ``vnic bench hosts`` measures: a throwaway PostgreSQL, ``vnic serve`` replicas
in a host bed's manager host (TLS, a CA made for the run), a ``vnic agent --manager`` on
each emulated host, and what the database, each agent and each kernel say runs.

A trimmed copy of the e2e tests' fleet (``tests/e2e/fleet.py``; the bench imports nothing
from ``tests/``). API calls go through :mod:`vnic.lab.bench.hosts_api` run inside the
manager host, the one place the manager's address is reached.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from vnic.errors import VnicError
from vnic.lab.hostbed import Host, HostBed
from vnic.manager.auth import Tokens
from vnic.manager.service import Service
from vnic.plan import names
from vnic.store.db import Database
from vnic.store.models import HostChangeRow, HostRow, VmRow, VmStatusRow

VNIC = [sys.executable, "-m", "vnic.cli.app"]
PORTS = (8470, 8480)  # the two manager replicas
#: Seconds a launch or change through the API waits for the agent's report.
HOST_WAIT = 20
#: Seconds :func:`until` waits by default.
UNTIL = 120.0
#: Seconds between two looks while waiting for a state (polling the database and
#: ``/run/netns``; it bounds the resolution of every convergence time).
POLL = 0.05


def until(what: str, check: Callable[[], Any], timeout: float = UNTIL) -> Any:
    """Poll ``check`` until it returns something true; VnicError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise VnicError(f"vnic bench hosts: not within {timeout:g} s: {what}")
        time.sleep(POLL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The peak resident set of process ``pid`` (``VmHWM``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def statuses(db: Database, session: str) -> dict[str, tuple[int, int, datetime, bool]]:
    """Per VM of ``session``: its status row's revision, epoch, ``at`` and whether it
    carries an error."""
    query = (
        select(VmRow.name, VmStatusRow.revision, VmStatusRow.epoch, VmStatusRow.at)
        .add_columns(VmStatusRow.error)
        .join(VmStatusRow, VmStatusRow.vm_id == VmRow.id)
        .where(VmRow.session.has(name=session))
    )
    with db.reading() as s:
        return {n: (r, e, at, err is not None) for n, r, e, at, err in s.execute(query)}


def wanted(db: Database, session: str) -> dict[str, int]:
    """Per VM of ``session``: the newest revision of the change log naming it. The
    session's overlay rows (``vm`` empty: its VXLAN devices, when it spans hosts) are left
    out: no VM's status reports them, and waiting for one never ended."""
    query = (
        select(HostChangeRow.vm, func.max(HostChangeRow.revision))
        .where(HostChangeRow.session == session, HostChangeRow.vm != "")
        .group_by(HostChangeRow.vm)
    )
    with db.reading() as s:
        return {vm: int(rev) for vm, rev in s.execute(query)}


def reported(db: Database, session: str) -> bool:
    """Whether every VM of ``session`` the change log names reported its newest change
    without error."""
    got, want = statuses(db, session), wanted(db, session)
    return all(vm in got and got[vm][0] >= rev and not got[vm][3] for vm, rev in want.items())


class BenchFleet:
    """Manager replicas, agents (``vnics`` of capacity each) and the API of one bed."""

    def __init__(
        self, bed: HostBed, db_url: str, certs: tuple[Path, Path, Path], vnics: int
    ) -> None:
        self.bed, self.db_url, self.vnics = bed, db_url, vnics
        self.ca, self.cert, self.key = certs
        self.db = Database(db_url)
        self.svc = Service(self.db)
        self.admin = Tokens(self.db).create("admin", "admin")[1]
        self.managers: dict[int, subprocess.Popen[bytes]] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.tokens = {h.short: self.svc.add_host(h.short)[1] for h in bed.hosts}

    def url(self, replica: int = 0) -> str:
        return f"https://{self.bed.manager.address4}:{PORTS[replica]}"

    def serve(self, replica: int, wait: bool = True) -> None:
        hm = self.bed.manager
        argv = [*VNIC, "serve", "--host", hm.address4, "--port", str(PORTS[replica])]
        argv += ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        argv += ["--host-wait", str(HOST_WAIT), "--repair-interval", "0", "--drift-interval", "600"]
        with open(hm.home / f"serve{replica}.log", "ab") as log:
            self.managers[replica] = self.bed.spawn(
                hm, argv, env={"VNIC_DATABASE_URL": self.db_url}, stdout=log, stderr=log
            )
        if wait:
            until(f"replica {replica} answers", lambda: self.answers(replica), 60)

    def answers(self, replica: int) -> bool:
        status: int = self.api([("GET", "/v1/hosts", None)], replica=replica)[0]["status"]
        return status == 200

    def kill(self, replica: int) -> None:
        proc = self.managers.pop(replica)
        proc.kill()
        proc.wait(timeout=30)

    def start_agent(self, host: Host, replicas: tuple[int, ...] = (0,)) -> None:
        """``vnic agent --manager`` on ``host``, following the ``replicas`` (their URLs in
        that order: the next one when one does not answer)."""
        (host.home / "host.token").write_text(self.tokens[host.short])
        urls = ",".join(self.url(r) for r in replicas)
        argv = [*VNIC, "agent", "--manager", urls, "--host", host.short]
        argv += ["--host-token-file", str(host.home / "host.token"), "--ca", str(self.ca)]
        argv += ["--underlay", host.address4, "--vnics", str(self.vnics)]
        argv += ["--drift-interval", "600"]
        with open(host.home / "agent.log", "ab") as log:
            self.agents[host.short] = self.bed.spawn(host, argv, stdout=log, stderr=log)

    def stop_agents(self) -> None:
        """SIGTERM to every agent at once (one each: a second one would kill it
        mid-shutdown), then wait for each to exit 0."""
        procs = dict(self.agents)
        self.agents.clear()
        for proc in procs.values():
            proc.terminate()
        for host, proc in procs.items():
            if proc.wait(timeout=60) != 0:
                raise VnicError(f"the agent of {host} exited {proc.returncode}")

    # ---------------------------------------------------------------- the API

    def api_spawn(
        self, calls: Iterable[tuple[str, str, Any]], parallel: int = 4, replica: int = 0
    ) -> subprocess.Popen[str]:
        """Start the calls (method, path, JSON body) from the manager host; see :meth:`api`."""
        doc = {
            "url": self.url(replica),
            "token": self.admin,
            "ca": str(self.ca),
            "parallel": parallel,
            "calls": [{"method": m, "path": p, "json": j} for m, p, j in calls],
        }
        argv = [sys.executable, "-m", "vnic.lab.bench.hosts_api"]
        proc = self.bed.spawn("hm", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(doc))
        proc.stdin.close()
        return proc

    @staticmethod
    def api_results(proc: subprocess.Popen[str], timeout: float = 600) -> list[dict[str, Any]]:
        assert proc.stdout is not None
        proc.wait(timeout=timeout)
        out = proc.stdout.read()
        proc.stdout.close()
        if proc.returncode != 0:
            raise VnicError(f"vnic bench hosts: the API caller exited {proc.returncode}")
        results: list[dict[str, Any]] = json.loads(out)
        return results

    def api(
        self, calls: Iterable[tuple[str, str, Any]], parallel: int = 4, replica: int = 0
    ) -> list[dict[str, Any]]:
        """Each call's ``t0``/``t1`` (wall clock, s), ``status`` and ``error``, in order."""
        return self.api_results(self.api_spawn(calls, parallel, replica))

    def ok(self, calls: Iterable[tuple[str, str, Any]], parallel: int = 4) -> list[dict[str, Any]]:
        """:meth:`api`, failing on the first answer that is not 2xx."""
        results = self.api(calls, parallel)
        for r in results:
            if not 200 <= r["status"] < 300:
                raise VnicError(f"vnic bench hosts: API answered {r['status']}: {r['error']}")
        return results

    def profile(self, name: str, rate: str) -> dict[str, Any]:
        doc = {"name": name, "egress": {"rate": rate}, "ingress": {"rate": rate}}
        return self.ok([("POST", "/v1/import/profiles", [doc])])[0]

    def session(self, name: str, profile: str) -> None:
        self.ok([("POST", "/v1/sessions", {"name": name, "default_profile": profile})])

    def launch(
        self, session: str, vms: Iterable[str], host: str | None = None, parallel: int = 4
    ) -> list[dict[str, Any]]:
        body = [{"name": vm, "launch": True, "host": host} for vm in vms]
        return self.ok([("POST", f"/v1/sessions/{session}/vms", b) for b in body], parallel)

    def down(self, session: str) -> dict[str, Any]:
        return self.ok([("POST", f"/v1/sessions/{session}/down", None)])[0]

    # ---------------------------------------------------------------- what runs

    def placement(self, session: str) -> dict[str, str | None]:
        return {v.name: v.host for v in self.svc.list_vms(session) if v.state == "running"}

    def kernel(self, session: str) -> dict[str, set[str]]:
        """The session's VM namespaces in each host's ``/run/netns`` (a directory listing:
        cheap enough to poll with hundreds of VMs)."""
        out = {}
        for h in self.bed.hosts:
            found = (names.parse_vm_netns(n, session) for n in os.listdir(h.netns_dir()))
            out[h.short] = {vm for vm in found if vm}
        return out

    def session_namespaces(self, session: str) -> list[str]:
        """Anything of ``session`` left in any host's ``/run/netns``."""
        return [
            f"{h.short}:{n}"
            for h in self.bed.hosts
            for n in os.listdir(h.netns_dir())
            if names.of_session(n, session)
        ]

    def desired(self, host: Host, session: str) -> set[str]:
        path = host.home / "agent" / "desired.json"
        if not path.exists():
            return set()
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            return set()  # caught while being replaced: look again
        entries = doc.get("vms", doc) if isinstance(doc, dict) else doc
        return {e["request"]["vm"] for e in entries if e["request"]["session"] == session}

    def agree(self, session: str) -> bool:
        """Database running set = each agent's desired set = each kernel's inventory."""
        placed = self.placement(session)
        want = {h.short: {vm for vm, on in placed.items() if on == h.short} for h in self.bed.hosts}
        desired = {h.short: self.desired(h, session) for h in self.bed.hosts}
        return want == self.kernel(session) == desired

    def statuses(self, session: str) -> dict[str, tuple[int, int, datetime, bool]]:
        return statuses(self.db, session)

    def wanted(self, session: str) -> dict[str, int]:
        return wanted(self.db, session)

    def epochs(self) -> dict[str, int]:
        with self.db.reading() as s:
            return {n: int(e) for n, e in s.execute(select(HostRow.name, HostRow.epoch))}

    def converged(self, session: str, on: tuple[str, ...] | None = None) -> bool:
        """:meth:`agree`, and every running VM reported, without error, the newest change
        the log holds for it; ``on``: only the VMs on those hosts reported (no
        :meth:`agree`: the other hosts may still be behind)."""
        if on is None and not self.agree(session):
            return False
        wanted, got = self.wanted(session), self.statuses(session)
        for vm, host in self.placement(session).items():
            if on is not None and host not in on:
                continue
            status = got.get(vm)
            if status is None or status[0] < wanted.get(vm, 0) or status[3]:
                return False
        return True

    def htb(self, host: Host, session: str, vm: str) -> str:
        """``tc class show`` of the VM's port in its session's namespace on ``host``."""
        argv = ["ip", "netns", "exec", names.session_netns(session), "tc", "class", "show"]
        done = self.bed.run(host, [*argv, "dev", names.VmLinks.of(vm).port])
        return done.stdout

    def stop(self) -> None:
        procs = [*self.agents.values(), *self.managers.values()]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.db.dispose()
