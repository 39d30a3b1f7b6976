"""Benchmark: many hypervisor hosts (``vnic bench hosts``, root).

Every part runs on one host bed of 3 emulated hosts (:mod:`vnic.lab.hostbed`) in one run,
against one throwaway PostgreSQL (:mod:`vnic.lab.pgserver`), with two ``vnic serve``
replicas in the bed's manager host (TLS) and a ``vnic agent --manager`` per host on the
netns driver (:mod:`vnic.lab.bench.hosts_fleet`):

1. **change**: ``n`` VMs placed over the 3 hosts (spread) and ``n`` VMs all on one host,
   each set with a profile of its own; each profile changed through the API (a profile
   import). Per VM: the time from the API call to the ``at`` of the status row its
   agent's report wrote (the kernel changed); p50/p99/max of each set and the ratio of
   the p99s (target: spread ≤ 2 × single host). One VM's HTB class is read with ``tc``
   in its host to check the kernel has the new rate.
2. **convergence**: one host partitioned (``HostBed.partition``) until its lease runs
   out, a profile change made meanwhile, then healed; and the replica the agents follow
   killed (SIGKILL), a change made through the other, the replica started again: h1 and
   h2 follow both replicas (failover: seconds from the kill until they are correct), h3
   the killed one alone (seconds from its restart). Each
   time: seconds until every host is correct (database running set = each agent's
   desired set = each kernel's VMs, and every VM reported its newest change) — target 5 s.
3. **scale**: ``m`` VMs launched over the 3 hosts (``parallel`` API calls at once), a
   full resync (each agent restarted: it registers, relists and reconciles every VM; until
   every VM's status carries the new epoch), a session down (until no host has anything
   of the session); the times, each agent's CPU seconds per phase (``/proc/PID/stat``)
   and its peak RSS (``VmHWM``).
4. **simulation**: :mod:`vnic.lab.bench.hosts_sim` (``agents`` in-memory agents, ``vnics``
   vNICs), on the same PostgreSQL.
5. **cross-host fidelity**: :mod:`vnic.lab.bench.hosts_xhost` (TCP both ways between VMs
   on two hosts over VXLAN, beside two VMs on one host, at each rate; the round trip the
   underlay adds).

Times are wall-clock seconds; convergence is polled every 50 ms
(:data:`~vnic.lab.bench.hosts_fleet.POLL`). Traffic: only between the bed's VMs (part 5).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vnic.errors import DataplaneError, FieldError, InvalidInput, VnicError
from vnic.lab.bench import hosts_xhost
from vnic.lab.bench.hosts_fleet import (
    BenchFleet,
    cpu_seconds,
    peak_rss_mib,
    until,
)
from vnic.lab.hostbed import Host, HostBed
from vnic.lab.pgserver import PgServer
from vnic.lab.testca import make_test_ca

#: The defaults finish the whole bench in about 6 minutes on a 2-core machine (364 s).
DEFAULTS = {"n": 10, "m": 30, "parallel": 4, "agents": 20, "vnics": 800}
#: The sizes issue #18 asks for.
ISSUE = {"n": 100, "m": 300, "parallel": 4, "agents": 200, "vnics": 20000}
#: The parts ``run`` may run (``--parts``).
PARTS = ("change", "convergence", "cross_host", "scale", "simulation")


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_s": round(statistics.median(values), 4),
        "p99_s": round(_pct(values, 0.99), 4),
        "max_s": round(max(values), 4),
    }


def _replicas_of(host: Host) -> tuple[int, ...]:
    """The replicas ``host``'s agent follows: h1 and h2 both (the next when one does not
    answer), h3 the first alone (it waits for that replica to come back)."""
    return (0,) if host.short == "h3" else (0, 1)


@contextlib.contextmanager
def _fleet(pg: PgServer, vnics: int) -> Iterator[BenchFleet]:
    """A bed of 3 hosts, a database on ``pg``, 2 replicas and 3 agents; all removed
    afterwards, failed or not (VMs first, by a session down of every session, then the
    processes, then the bed, which checks nothing of it is left)."""
    with tempfile.TemporaryDirectory(prefix="vnic-bench-hosts-") as tmp:
        bed = HostBed(uuid.uuid4().hex[:8], 3, root=Path(tmp) / "hosts")
        fleet = None
        try:
            bed.create()
            certs = make_test_ca(Path(tmp) / "ca", [bed.manager.address4])
            f = fleet = BenchFleet(bed, pg.create_database(), certs, vnics)
            f.serve(0)
            f.serve(1)
            for h in bed.hosts:
                f.start_agent(h, _replicas_of(h))
            until("3 hosts ready", lambda: [h.state for h in f.svc.list_hosts()] == ["ready"] * 3)
            yield f
        finally:
            try:
                if fleet is not None:
                    with contextlib.suppress(VnicError):
                        if 0 in fleet.managers and fleet.agents:
                            for s in fleet.svc.list_sessions():
                                fleet.api([("POST", f"/v1/sessions/{s.name}/down", None)])
                    fleet.stop()
            finally:
                with contextlib.suppress(DataplaneError):
                    bed.destroy()
                left = bed.leftovers()
                if left:
                    raise DataplaneError(f"vnic bench hosts: the host bed left {left}")


def _change_latency(fleet: BenchFleet, session: str, profile: str, rate: str) -> list[float]:
    """Seconds from the profile change's API call to each VM's report of it."""
    before = fleet.wanted(session)
    call = fleet.profile(profile, rate)
    until(
        f"every VM of {session} changed",
        lambda: fleet.wanted(session) != before and fleet.converged(session),
    )
    return [at.timestamp() - call["t0"] for _, _, at, _ in fleet.statuses(session).values()]


def part_change(fleet: BenchFleet, n: int, parallel: int) -> dict[str, Any]:
    vms = [f"v{i}" for i in range(n)]
    fleet.profile("pspread", "20mbit")
    fleet.profile("pone", "20mbit")
    fleet.session("bs", "pspread")
    fleet.session("b1", "pone")
    fleet.launch("bs", vms, parallel=parallel)
    fleet.launch("b1", vms, host="h1", parallel=parallel)
    until("both sessions run", lambda: fleet.converged("bs") and fleet.converged("b1"))
    spread_hosts = sorted({h for h in fleet.placement("bs").values() if h})
    spread = _change_latency(fleet, "bs", "pspread", "30mbit")
    single = _change_latency(fleet, "b1", "pone", "30mbit")
    # The kernel changed: one spread VM's HTB class has the new rate (on a host other
    # than h1 when spread put one elsewhere).
    placed = sorted(fleet.placement("bs").items(), key=lambda item: (item[1] == "h1", item))
    vm, on = placed[0]
    htb = fleet.htb(fleet.bed.host(on or "h1"), "bs", vm)
    out = {
        "vms": n,
        "spread_hosts": spread_hosts,
        "spread": _summary(spread),
        "single_host": _summary(single),
        "p99_ratio": round(_pct(spread, 0.99) / _pct(single, 0.99), 3),
        "target_ratio": 2.0,
        "kernel_check": {"vm": vm, "host": on, "rate_30mbit_in_htb": "30Mbit" in htb},
    }
    fleet.down("b1")
    return out


def part_convergence(fleet: BenchFleet) -> dict[str, Any]:
    """On session ``bs`` of :func:`part_change` (still running)."""
    h3 = fleet.bed.hosts[2]
    # A partition until the host's lease ran out, a change meanwhile, then healed.
    fleet.bed.partition(h3, True)
    healed = False
    try:
        waiting = fleet.api_spawn([("POST", "/v1/import/profiles", [_doc("pspread", "40mbit")])])
        until("h3 unknown", lambda: fleet.svc.get_host("h3").state == "unknown", 60)
        fleet.bed.partition(h3, False)
        healed = True
        t0 = time.monotonic()
        until("converged after the partition", lambda: fleet.converged("bs"), 60)
        partition_s = time.monotonic() - t0
    finally:
        if not healed:
            fleet.bed.partition(h3, False)
    fleet.api_results(waiting)
    # The replica the agents follow killed; a change through the other; started again.
    t_kill = time.monotonic()
    fleet.kill(0)
    before = fleet.wanted("bs")
    waiting = fleet.api_spawn(
        [("POST", "/v1/import/profiles", [_doc("pspread", "50mbit")])], replica=1
    )
    until("the change is in the log", lambda: fleet.wanted("bs") != before, 60)
    both = ("h1", "h2")
    until("h1 and h2 converged on the other replica", lambda: fleet.converged("bs", both), 60)
    failover_s = time.monotonic() - t_kill
    t0 = time.monotonic()
    fleet.serve(0, wait=False)
    until("the replica answers again", lambda: fleet.answers(0), 60)
    answers_s = time.monotonic() - t0
    until("converged after the restart", lambda: fleet.converged("bs"), 120)
    restart_s = time.monotonic() - t0
    fleet.api_results(waiting)
    fleet.down("bs")
    return {
        "partition_heal_s": round(partition_s, 3),
        "manager_sigkill_failover_s": round(failover_s, 3),
        "manager_sigkill_restart_s": round(restart_s, 3),
        "manager_restart_answers_s": round(answers_s, 3),
        "target_s": 5.0,
        "notes": [
            "partition: h3's underlay dropped until its lease ran out (unknown), a profile "
            "change made meanwhile; timed from the heal",
            "failover: the replica all agents call SIGKILLed, a profile change made "
            "through the other; h1 and h2 (given both replicas' URLs) converged this long "
            "after the kill, on the other replica",
            "restart: h3 (given the killed replica's URL alone) converged this long after "
            "that replica's restart (its start-up, manager_restart_answers_s of it, and "
            "h3's retry of the refused connection, at most 0.5 s)",
        ],
    }


def _doc(name: str, rate: str) -> dict[str, Any]:
    return {"name": name, "egress": {"rate": rate}, "ingress": {"rate": rate}}


def _cpu(fleet: BenchFleet) -> dict[str, float]:
    return {h: cpu_seconds(p.pid) for h, p in fleet.agents.items()}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {h: round(after[h] - before[h], 3) for h in sorted(after)}


#: VMs per session of the scale part: a session's network holds 253 vNICs.
SCALE_PER_SESSION = 200


def part_scale(fleet: BenchFleet, m: int, parallel: int) -> dict[str, Any]:
    fleet.profile("pscale", "20mbit")
    sessions = [f"bm{i}" for i in range(-(-m // SCALE_PER_SESSION))]
    for name in sessions:
        fleet.session(name, "pscale")
    vms = [(sessions[i // SCALE_PER_SESSION], f"s{i}") for i in range(m)]

    def every(check: Callable[[str], bool]) -> bool:
        return all(check(name) for name in sessions)

    cpu0 = _cpu(fleet)
    calls = []
    for name in sessions:
        mine = [vm for session, vm in vms if session == name]
        calls += fleet.launch(name, mine, parallel=parallel)
    until("every VM runs", lambda: every(fleet.converged), 600)
    launch_s = max(c["t1"] for c in calls) - min(c["t0"] for c in calls)
    cpu_launch = _delta(_cpu(fleet), cpu0)
    rss = {h: peak_rss_mib(p.pid) for h, p in fleet.agents.items()}
    per_host = {host.short: 0 for host in fleet.bed.hosts}
    for name in sessions:
        for short, found in fleet.kernel(name).items():
            per_host[short] += len(found)
    # A full resync: each agent stopped (a SIGTERM ends the long poll in flight first),
    # then started again: it registers (a new epoch), relists and reconciles every VM.
    epochs = fleet.epochs()
    t0 = time.monotonic()
    fleet.stop_agents()
    stop_s = time.monotonic() - t0
    t0 = time.monotonic()
    for host in fleet.bed.hosts:
        fleet.start_agent(host, _replicas_of(host))
    cpu1 = _cpu(fleet)

    def resynced(name: str) -> bool:
        now = fleet.epochs()
        if any(now[h.short] <= epochs[h.short] for h in fleet.bed.hosts):
            return False
        placed = fleet.placement(name)
        got = fleet.statuses(name)
        return all(vm in got and got[vm][1] == now[host or ""] for vm, host in placed.items())

    until("every VM reported under the new epochs", lambda: every(resynced), 600)
    resync_s = time.monotonic() - t0
    cpu_resync = _delta(_cpu(fleet), cpu1)
    cpu2 = _cpu(fleet)
    t0 = time.monotonic()
    for name in sessions:
        fleet.down(name)

    def left() -> list[str]:
        return [n for name in sessions for n in fleet.session_namespaces(name)]

    until("nothing of the sessions is left", lambda: not left(), 600)
    down_s = time.monotonic() - t0
    cpu_down = _delta(_cpu(fleet), cpu2)
    for name, proc in fleet.agents.items():
        rss[name] = round(max(rss[name], peak_rss_mib(proc.pid)), 1)
    return {
        "vms": m,
        "sessions": len(sessions),
        "parallel": parallel,
        "per_host": per_host,
        "launch_s": round(launch_s, 3),
        "agents_stop_s": round(stop_s, 3),
        "resync_s": round(resync_s, 3),
        "down_s": round(down_s, 3),
        "left": left(),
        "agent_cpu_s": {"launch": cpu_launch, "resync": cpu_resync, "down": cpu_down},
        "agent_peak_rss_mib": rss,
        "notes": [
            f"sessions of at most {SCALE_PER_SESSION} VMs (a session's network holds 253 "
            "vNICs), launched one session after another",
            "launch: first call to last answer (each answers after its agent's report)",
            "agents_stop: SIGTERM to exit of all 3 agents (each ends its long poll first)",
            "resync: from the agents' start until every VM's status carries its host's "
            "new epoch (start-up, registration, relist, full reconcile)",
        ],
    }


def _part(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A part's figures, or ``{"error": why}`` when it failed (the other parts still run;
    the fleet's clean-up still runs at the end)."""
    try:
        return fn(*args, **kwargs)
    except VnicError as exc:
        return {"error": str(exc)}


def check_sizes(sizes: dict[str, int]) -> None:
    """InvalidInput naming each size that is not a positive count (nothing runs)."""
    bad = [FieldError(f"--{k}", repr(v), "a count >= 1") for k, v in sizes.items() if v < 1]
    if bad:
        raise InvalidInput(bad)


def run(
    n: int = DEFAULTS["n"],
    m: int = DEFAULTS["m"],
    parallel: int = DEFAULTS["parallel"],
    agents: int = DEFAULTS["agents"],
    vnics: int = DEFAULTS["vnics"],
    parts: Sequence[str] = PARTS,
    cross_rates_mbit: tuple[int, ...] = hosts_xhost.RATES_MBIT,
    cross_seconds: float = 3.0,
) -> dict[str, Any]:
    """The benchmark's JSON document (see the module); ``cross_rates_mbit`` and
    ``cross_seconds``: the rates and the seconds of each flow of part 5."""
    check_sizes({"n": n, "m": m, "parallel": parallel, "agents": agents, "vnics": vnics})
    started = time.monotonic()
    out: dict[str, Any] = {
        "benchmark": "hosts",
        "hosts": 3,
        "sizes": {"n": n, "m": m, "parallel": parallel, "agents": agents, "vnics": vnics},
    }
    pg = PgServer()
    try:
        if {"change", "convergence", "cross_host", "scale"} & set(parts):
            with _fleet(pg, max(2 * n, m) + 16) as fleet:
                if "change" in parts or "convergence" in parts:
                    out["change"] = _part(part_change, fleet, n, parallel)
                    if "convergence" in parts and "error" not in out["change"]:
                        out["convergence"] = _part(part_convergence, fleet)
                if "cross_host" in parts:
                    out["cross_host_fidelity"] = _part(
                        hosts_xhost.part_cross_host, fleet, cross_rates_mbit, cross_seconds
                    )
                if "scale" in parts:
                    out["scale"] = _part(part_scale, fleet, m, parallel)
        if "simulation" in parts:
            from vnic.lab.bench import hosts_sim

            out["simulation"] = _part(hosts_sim.run, pg, agents=agents, vnics=vnics)
    finally:
        pg.stop()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out
