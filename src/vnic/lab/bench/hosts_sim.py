"""``vnic bench hosts``, part 4: past this machine, by simulation.

``agents`` in-memory agents (:mod:`vnic.lab.bench.hosts_agents`: a real ``Follower`` and
``HttpSource`` each, over HTTP, on the fake driver; ``per_process`` of them as threads in
each of a few processes) against two ``vnic serve`` replicas on 127.0.0.1 (plain HTTP,
``--driver fake``) on a new database of the bench's PostgreSQL. Half the agents follow
each replica. Measured:

- **registration storm**: every agent process started at once; seconds until every host
  is ``ready``;
- **launch**: ``vnics`` vNICs as VMs of ``nics_per_vm`` vNICs each (in sessions of
  :data:`VMS_PER_SESSION` VMs: a session's network holds 253 vNICs), ``parallel`` API
  launches at once over both replicas (set-up for what follows; its time is reported);
- **idle**: the replicas' CPU seconds per second over :data:`IDLE_S` with nothing
  changing (what the fleet itself costs: leases, long polls, full reconciles);
- **change**: one profile import reaching every vNIC: per VM, API call to its status
  row's ``at`` (p50/p99/max; the max is the convergence time), the change-log rows it
  wrote, the replicas' CPU seconds (``/proc/PID/stat``) in all and per 1 000 vNICs;
- **replica killed**: the second replica SIGKILLed, a change made through the first, the
  second started again (its agents follow it alone: one URL per agent); seconds from the
  restart until every VM reported the change.

The replicas' lease (``--lease``) is :func:`sim_lease`: 10 s up to 66 agents, longer past
that so that the renewals stay at about 20 per second (a lease renewal is a call; 200
agents renewing a 10 s lease every 3.3 s saturated the two replicas on this 2-core
machine, their leases lapsed and they registered again, and the storm never settled).

Nothing here touches a kernel: the fake driver keeps its VMs in memory, the replicas'
own agent runs the fake driver too, and every process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from vnic.errors import VnicError
from vnic.lab.bench.hosts_fleet import VNIC, cpu_seconds, reported, statuses, until
from vnic.lab.pgserver import PgServer, free_port
from vnic.manager.auth import Tokens
from vnic.manager.service import Service
from vnic.store.db import Database
from vnic.store.models import HostChangeRow

#: VMs per session: a session's network is a /24 (253 vNICs at most), so the vNICs are
#: spread over sessions of at most 30 VMs (240 vNICs of 8 VMs' worth), all on one profile.
VMS_PER_SESSION = 30
#: Seconds the replicas' CPU is measured with nothing changing (the fleet's own cost).
IDLE_S = 10.0
#: Times one API call is tried while the manager answers 429.
RETRIES = 60


#: Lease renewals per second the two replicas are given at most (on 2 shared cores each
#: costs about 10 ms of a replica's CPU, and the agents' processes share the cores).
RENEWALS_PER_S = 20.0


def sim_lease(agents: int) -> float:
    """Seconds of lease for ``agents`` simulated agents: 10 (the default) or more, so
    that renewals (every third of it) stay under :data:`RENEWALS_PER_S`."""
    return max(10.0, round(3 * agents / RENEWALS_PER_S))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Sim:
    """The replicas, the agent processes and an HTTP client of each replica."""

    def __init__(self, pg: PgServer, tmp: Path, agents: int, capacity: int, lease: float) -> None:
        self.tmp, self.lease = tmp, lease
        self.db = Database(pg.create_database())
        self.svc = Service(self.db)
        self.admin = Tokens(self.db).create("admin", "admin")[1]
        self.names = [f"s{i:04d}" for i in range(agents)]
        self.tokens = {n: self.svc.add_host(n)[1] for n in self.names}
        self.capacity = capacity
        self.agents = agents
        self.ports = [free_port(), free_port()]
        self.replicas: dict[int, subprocess.Popen[bytes]] = {}
        self.procs: list[subprocess.Popen[str]] = []
        self.sessions: list[str] = []
        self.http = [
            httpx.Client(
                base_url=self.url(i),
                timeout=300,
                headers={"Authorization": f"Bearer {self.admin}"},
            )
            for i in (0, 1)
        ]

    def url(self, replica: int) -> str:
        return f"http://127.0.0.1:{self.ports[replica]}"

    def serve(self, replica: int) -> None:
        home = self.tmp / f"m{replica}"
        home.mkdir(exist_ok=True)
        argv = [*VNIC, "serve", "--host", "127.0.0.1", "--port", str(self.ports[replica])]
        argv += ["--driver", "fake", "--host-wait", "120", "--repair-interval", "0"]
        # Every agent holds one watch; each replica must be able to hold them all.
        argv += ["--drift-interval", "600", "--max-streams", str(self.agents + 8)]
        argv += ["--lease", f"{self.lease:g}"]
        env = {
            **os.environ,
            "VNIC_DATABASE_URL": self.db.url,
            "VNIC_HOME": str(home),
            "VNIC_RUNTIME_DIR": str(home / "run"),
        }
        with open(home / "serve.log", "ab") as log:
            self.replicas[replica] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)

    def answers(self, replica: int) -> bool:
        try:
            return self.http[replica].get("/v1/hosts").status_code == 200
        except httpx.HTTPError:
            return False

    def start_agents(self, per_process: int) -> None:
        for start in range(0, self.agents, per_process):
            hosts = [[n, self.tokens[n], self.url(i % 2)] for i, n in enumerate(self.names)]
            doc = {
                "root": str(self.tmp / "agents"),
                "vnics": self.capacity,
                "hosts": hosts[start : start + per_process],
            }
            argv = [sys.executable, "-m", "vnic.lab.bench.hosts_agents"]
            with open(self.tmp / f"agents{start}.log", "a") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=log, stderr=log, text=True
                )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(doc))
            proc.stdin.close()
            self.procs.append(proc)

    def call(self, replica: int, method: str, path: str, body: Any = None) -> httpx.Response:
        """One API call; a 429 (admission: writes in flight) is retried after the
        ``Retry-After`` it names, as a client should, up to :data:`RETRIES` times."""
        for _ in range(RETRIES):
            answer = self.http[replica].request(method, path, json=body)
            if answer.status_code != 429:
                break
            time.sleep(float(answer.headers.get("Retry-After", "1")))
        if not answer.is_success:
            raise VnicError(
                f"vnic bench hosts: {method} {path}: {answer.status_code} {answer.text[:300]}"
            )
        return answer

    def profile(self, replica: int, rate: str) -> None:
        doc = {"name": "psim", "egress": {"rate": rate}, "ingress": {"rate": rate}}
        self.call(replica, "POST", "/v1/import/profiles", [doc])

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.replicas.values())

    def changes(self) -> int:
        with self.db.reading() as s:
            return int(s.scalar(select(func.count()).select_from(HostChangeRow)) or 0)

    def stop(self) -> None:
        procs: list[subprocess.Popen[Any]] = [*self.procs, *self.replicas.values()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.http:
            c.close()
        self.db.dispose()


@contextlib.contextmanager
def _sim(pg: PgServer, agents: int, capacity: int, lease: float) -> Iterator[_Sim]:
    with tempfile.TemporaryDirectory(prefix="vnic-bench-sim-") as tmp:
        sim = _Sim(pg, Path(tmp), agents, capacity, lease)
        try:
            for i in (0, 1):
                sim.serve(i)
            until("replica 0 answers", lambda: sim.answers(0), 60)
            until("replica 1 answers", lambda: sim.answers(1), 60)
            yield sim
        finally:
            sim.stop()


def _run_all(fn: Callable[[int], None], items: Iterable[int], workers: int) -> None:
    """``fn`` of every item, ``workers`` at once; Ctrl-C cancels what has not started
    (a pool's ``map`` waited without a timeout, which SIGINT did not interrupt, and then
    ran every queued launch before the bench could clean up)."""
    pool = ThreadPoolExecutor(workers)
    futures = [pool.submit(fn, i) for i in items]
    try:
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=1.0)
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _all_reported(sim: _Sim) -> bool:
    return all(reported(sim.db, s) for s in sim.sessions)


def _late(sim: _Sim, t0: float) -> list[float]:
    """Per VM of every session: seconds from ``t0`` (wall clock) to its status row's ``at``."""
    return [
        at.timestamp() - t0 for s in sim.sessions for _, _, at, _ in statuses(sim.db, s).values()
    ]


def _changed(sim: _Sim, replica: int, rate: str) -> dict[str, Any]:
    """A profile change through ``replica`` (in a thread: its answer waits for every
    report), until every VM reported it; per-VM seconds from the call."""
    before = sim.changes()
    cpu0 = sim.cpu()
    t0 = time.time()
    errors: list[str] = []

    def change() -> None:
        try:
            sim.profile(replica, rate)
        except (VnicError, httpx.HTTPError) as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=change)
    thread.start()
    until("the change is in the log", lambda: sim.changes() > before or errors, 300)
    until("every VM reported the change", lambda: _all_reported(sim) or errors, 900)
    thread.join(timeout=300)
    if errors:
        raise VnicError(f"vnic bench hosts: the simulated change failed: {errors[0]}")
    late = _late(sim, t0)
    return {
        "p50_s": round(statistics.median(late), 3),
        "p99_s": round(_pct(late, 0.99), 3),
        "converged_s": round(max(late), 3),
        "change_log_rows": sim.changes() - before,
        "manager_cpu_s": round(sim.cpu() - cpu0, 2),
    }


def run(
    pg: PgServer,
    agents: int = 20,
    vnics: int = 800,
    *,
    per_process: int = 50,
    nics_per_vm: int = 8,
    parallel: int = 8,
    lease: float | None = None,
) -> dict[str, Any]:
    """Part 4's JSON (see the module); ``lease``: the replicas' ``--lease`` seconds
    (default :func:`sim_lease` of ``agents``)."""
    vms = math.ceil(vnics / nics_per_vm)
    capacity = 2 * math.ceil(vms * nics_per_vm / agents) + 16
    lease = sim_lease(agents) if lease is None else lease
    with _sim(pg, agents, capacity, lease) as sim:
        cpu0 = sim.cpu()
        t0 = time.monotonic()
        sim.start_agents(per_process)
        until(
            "every simulated host ready",
            lambda: all(h.state == "ready" for h in sim.svc.list_hosts()),
            600,
        )
        storm_s = time.monotonic() - t0
        storm_cpu = sim.cpu() - cpu0
        sim.profile(0, "20mbit")
        sim.sessions = [f"sim{i}" for i in range(math.ceil(vms / VMS_PER_SESSION))]
        for name in sim.sessions:
            sim.call(0, "POST", "/v1/sessions", {"name": name, "default_profile": "psim"})
        body = {"nics": [{"network": "default"}] * nics_per_vm, "launch": True, "driver": "fake"}
        t0 = time.monotonic()
        with_errors: list[str] = []

        def launch(i: int) -> None:
            try:
                session = sim.sessions[i // VMS_PER_SESSION]
                sim.call(i % 2, "POST", f"/v1/sessions/{session}/vms", {**body, "name": f"w{i}"})
            except (VnicError, httpx.HTTPError) as exc:
                with_errors.append(str(exc))

        _run_all(launch, range(vms), parallel)
        if with_errors:
            raise VnicError(
                f"vnic bench hosts: {len(with_errors)} launches failed: {with_errors[0]}"
            )
        until("every VM reported", lambda: _all_reported(sim), 1800)
        launch_s = time.monotonic() - t0
        # What the fleet costs the replicas while nothing changes: leases, long polls
        # ending and starting again, full reconciles (every agent's, once a minute).
        cpu_idle, t_idle = sim.cpu(), time.monotonic()
        time.sleep(IDLE_S)  # a measurement window, not a wait for readiness
        idle = (sim.cpu() - cpu_idle) / (time.monotonic() - t_idle)
        change = _changed(sim, 0, "30mbit")
        # The second replica killed; a change through the first; the second restarted.
        killed = sim.replicas.pop(1)
        killed.kill()
        killed.wait(timeout=30)
        before = sim.changes()
        cpu_kill = cpu_seconds(sim.replicas[0].pid)
        t_kill = time.time()
        thread = threading.Thread(target=sim.profile, args=(0, "40mbit"))
        thread.start()
        until("the change is in the log", lambda: sim.changes() > before, 300)
        t_restart = time.monotonic()
        sim.serve(1)
        until("every VM reported after the restart", lambda: _all_reported(sim), 900)
        restart_s = time.monotonic() - t_restart
        thread.join(timeout=300)
        late = _late(sim, t_kill)
        per_k = 1000 / (vms * nics_per_vm)
        return {
            "agents": agents,
            "agents_per_process": per_process,
            "processes": len(sim.procs),
            "vnics": vms * nics_per_vm,
            "vms": vms,
            "nics_per_vm": nics_per_vm,
            "sessions": len(sim.sessions),
            "replicas": 2,
            "lease_s": lease,
            "registration_storm_s": round(storm_s, 3),
            "registration_manager_cpu_s": round(storm_cpu, 2),
            "launch_s": round(launch_s, 2),
            "idle_manager_cpu_s_per_s": round(idle, 3),
            "change": change
            | {"manager_cpu_s_per_1000_vnics": round(change["manager_cpu_s"] * per_k, 3)},
            "replica_killed": {
                "restart_to_converged_s": round(restart_s, 3),
                "kill_to_last_report_s": round(max(late), 3),
                "change_log_rows": sim.changes() - before,
                # The first replica's share since the kill, and all of the restarted one.
                "manager_cpu_s": round(sim.cpu() - cpu_kill, 2),
            },
            "change_log_rows_total": sim.changes(),
        }
