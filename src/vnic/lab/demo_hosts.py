"""The demo's second part, ``vnic demo --hosts N`` (needs root): one session stretched over
N emulated hypervisor hosts.

It makes a host bed (:mod:`vnic.lab.hostbed`: N hosts and a manager host as namespaces on
an underlay bridge), a throwaway PostgreSQL (:mod:`vnic.lab.pgserver`), a ``vnic serve``
on it in the manager host (HTTPS, a CA made for the run) and a ``vnic agent --manager`` on
every host (:class:`~vnic.lab.bench.hosts_fleet.BenchFleet`). Then:

1. the hosts as the manager lists them (state, epoch, underlay);
2. a session ``spread`` over the hosts: one VM per host on profile ``edge`` (40 Mbit/s
   each way) and one more on host 1 with ``edge-slow`` (10 Mbit/s), all on one L2 network
   carried between hosts by VXLAN;
3. TCP measured both ways between VMs on different hosts (iperf3), configured against
   measured (Ethernet frames, at the profiles' MTU of 1450 bytes: VXLAN over the bed's
   1500-byte underlay);
4. ``edge`` changed live through the API (every host's agent applies it and reports),
   and the first pair measured again;
5. everything taken down: the session on every host, the agents, the manager, the
   database and the bed, checking that nothing of it is left.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vnic.errors import DataplaneError, InvalidInput, VnicError
from vnic.lab.bench.hosts_fleet import BenchFleet, until
from vnic.lab.bench.hosts_xhost import tcp_frames_bps
from vnic.lab.hostbed import HostBed
from vnic.lab.pgserver import PgServer
from vnic.lab.testca import make_test_ca

SESSION = "spread"
#: Hosts the demo may make (each is a namespace, an agent process and ~90 MiB).
MAX_HOSTS = 8
#: Seconds of each TCP flow (after 0.5 s of slow start).
SECONDS = 2.0
#: The profiles, Mbit/s each way; ``edge`` becomes :data:`LIVE_RATE` by the live change.
RATES = {"edge": 40, "edge-slow": 10}
LIVE_RATE = 80


def _doc(name: str, mbit: int) -> dict[str, Any]:
    rate = f"{mbit}mbit"
    return {"name": name, "mtu": "1450B", "egress": {"rate": rate}, "ingress": {"rate": rate}}


@contextlib.contextmanager
def _fleet(hosts: int, out: Console) -> Iterator[BenchFleet]:
    with tempfile.TemporaryDirectory(prefix="vnic-demo-hosts-") as tmp:
        pg = PgServer()
        bed = HostBed(uuid.uuid4().hex[:8], hosts, root=Path(tmp) / "hosts")
        fleet = None
        try:
            bed.create()
            certs = make_test_ca(Path(tmp) / "ca", [bed.manager.address4])
            fleet = BenchFleet(bed, pg.create_database(), certs, 64)
            fleet.serve(0)
            for h in bed.hosts:
                fleet.start_agent(h)
            f = fleet
            until("every host ready", lambda: all(h.state == "ready" for h in f.svc.list_hosts()))
            yield fleet
        finally:
            try:
                if fleet is not None:
                    with contextlib.suppress(VnicError):
                        if SESSION in {s.name for s in fleet.svc.list_sessions()}:
                            fleet.down(SESSION)
                    fleet.stop()
            finally:
                with contextlib.suppress(DataplaneError):
                    bed.destroy()
                pg.stop()
                left = bed.leftovers()
                out.print(
                    f"hosts: {hosts} agents, the manager, PostgreSQL and the bed stopped; "
                    f"{len(left)} objects left",
                    markup=False,
                )
                if left:
                    raise DataplaneError(f"vnic demo --hosts: the host bed left {left}")


def check_hosts(hosts: object) -> None:
    """InvalidInput unless ``hosts`` is a number of hosts from 2 to :data:`MAX_HOSTS`."""
    if isinstance(hosts, bool) or not isinstance(hosts, int) or not 2 <= hosts <= MAX_HOSTS:
        raise InvalidInput.one("--hosts", hosts, f"a number of hosts from 2 to {MAX_HOSTS}")


def run_demo_hosts(hosts: int, out: Console) -> None:
    """The multi-host demo (see the module); ``hosts``: 2 to :data:`MAX_HOSTS`."""
    check_hosts(hosts)
    with _fleet(hosts, out) as fleet:
        listed = Table("host", "state", "epoch", "underlay", title="hosts (vnic host list)")
        for h in fleet.svc.list_hosts():
            listed.add_row(h.name, h.state, str(h.epoch), str(h.underlay))
        out.print(listed)
        fleet.ok([("POST", "/v1/import/profiles", [_doc(n, r) for n, r in RATES.items()])])
        fleet.ok([("POST", "/v1/sessions", {"name": SESSION, "default_profile": "edge"})])
        vms = [f"vm{i + 1}" for i in range(hosts)]
        fleet.launch(SESSION, vms, parallel=1)  # one at a time: spread puts one per host
        fleet.ok(
            [
                (
                    "POST",
                    f"/v1/sessions/{SESSION}/vms",
                    {"name": "slow", "launch": True, "host": "h1", "profile": "edge-slow"},
                )
            ]
        )
        until("the session runs on every host", lambda: fleet.converged(SESSION))
        placed = fleet.placement(SESSION)
        out.print(
            f"session {SESSION}: "
            + ", ".join(f"{vm} on {host}" for vm, host in sorted(placed.items()))
            + " (one L2 network, VXLAN between hosts)",
            markup=False,
        )
        pairs = [(vms[i], vms[(i + 1) % hosts]) for i in range(hosts if hosts > 2 else 1)]
        pairs.append(("slow", next(vm for vm in vms if placed[vm] != placed["slow"])))
        out.print(_measured(fleet, placed, pairs, RATES, "TCP between VMs on different hosts"))
        fleet.ok([("POST", "/v1/import/profiles", [_doc("edge", LIVE_RATE)])])
        until("every host applied the change", lambda: fleet.converged(SESSION))
        live = {**RATES, "edge": LIVE_RATE}
        out.print(
            _measured(fleet, placed, pairs[:1], live, f"edge changed live to {LIVE_RATE} Mbit/s")
        )


def _measured(
    fleet: BenchFleet,
    placed: dict[str, str | None],
    pairs: list[tuple[str, str]],
    rates: dict[str, int],
    title: str,
) -> Table:
    """Both directions of each pair: configured (Mbit/s of ``rates`` by profile) against
    measured."""
    table = Table("from", "to", "direction", "configured", "measured", "ratio", title=title)
    for a, b in pairs:
        ha, hb = fleet.bed.host(placed[a] or "h1"), fleet.bed.host(placed[b] or "h1")
        # The slower of the two ends' profiles is what a flow between them gets.
        mbit = min(rates["edge-slow" if vm == "slow" else "edge"] for vm in (a, b))
        for reverse in (False, True):
            got = tcp_frames_bps(fleet, (ha, a), (hb, b), reverse, SECONDS, SESSION)
            src, dst = (b, a) if reverse else (a, b)
            table.add_row(
                f"{src} ({placed[src]})",
                f"{dst} ({placed[dst]})",
                "reverse" if reverse else "forward",
                f"{mbit} Mbit/s",
                f"{got / 1e6:.2f} Mbit/s",
                f"{got / (mbit * 1e6):.3f}",
            )
    return table
