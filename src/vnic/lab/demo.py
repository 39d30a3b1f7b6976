"""The demo behind the README's first command (needs root).

Loads the demo profiles, (re)creates the session ``demo`` with a default
profile, an assignment rule (role=server) and a per-VM override, launches
three shaped VMs plus a measuring peer as network namespaces and one QEMU
guest (a real kernel and virtio NIC on the same bridge, same default profile);
``web`` and the meter also have a second vNIC on the session's second network,
``storage``, whose own default profile shapes it. It measures each vNIC's
throughput both ways with iperf3 (web's two at once, each against its own
profile), its delay and loss with
irtt (the namespaces: one-way needs the host's clock at both ends), prints
configured vs measured, changes
a VM's rate while a TCP flow runs through it (live: the flow goes on, the
rate follows), and tears everything down, checking that nothing is left.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vnic.agent.core import Agent, local_agent
from vnic.dataplane import namespaces as nsops
from vnic.dataplane import qemu
from vnic.errors import NotFound, VnicError
from vnic.lab.explain import explanation_table
from vnic.lab.measure import TCP_GOODPUT, Throughput, iperf3, one_way
from vnic.lab.stats import quantile, stdev
from vnic.manager.results import Explanation, VmRequest
from vnic.manager.service import Service
from vnic.model.documents import parse_documents, read_documents
from vnic.model.network import NicSpec
from vnic.model.session import AssignmentRule
from vnic.plan import names

SESSION = "demo"
#: The demo's QEMU guest (its profile comes from the session default, like desk's).
GUEST = "lab"
SECONDS = 2.0
#: The live change: a TCP flow this long, the rate doubled halfway through.
LIVE_SECONDS = 6.0
LIVE_PATCH = {"egress": {"rate": "40Mbit"}}
#: The session's second network, and its own default profile (web's and meter's eth1).
STORAGE = "storage"
#: irtt probes per VM for the latency table: every 10 ms for this long.
PROBE_TIME = "3s"


def run_demo(service: Service, profiles_dir: Path, out: Console) -> None:
    results = service.apply_profiles(parse_documents(read_documents([str(profiles_dir)])))
    for r in results:
        out.print(f"profile {r.name}: {r.action} (revision {r.revision})", markup=False)
    driver = local_agent("netns")
    with contextlib.suppress(NotFound):  # a previous run: take it down and start afresh
        service.session_down(SESSION, driver)
        service.delete_session(SESSION, force=True)
    session = service.create_session(
        SESSION,
        default_profile="office",
        rules=[
            AssignmentRule(profile="server", role="server", network="default"),
            AssignmentRule(profile="meter", role="meter"),
        ],
    )
    storage = service.add_network(SESSION, STORAGE, default_profile=STORAGE)
    out.print(
        f"session {session.name}: network default (id {session.network_id}, default office), "
        f"network {STORAGE} (id {storage.network_id}, {storage.ipv4}, default {STORAGE}); "
        "rules role=server network=default -> server, role=meter -> meter",
        markup=False,
    )
    two = (NicSpec(), NicSpec(network=STORAGE))
    requests = [
        VmRequest(SESSION, "desk", role="desktop"),
        VmRequest(SESSION, "web", role="server", nics=two),
        VmRequest(SESSION, "phone", role="desktop", profile="mobile"),
        VmRequest(SESSION, "meter", role="meter", nics=two),
        VmRequest(SESSION, GUEST, role="desktop"),
    ]
    try:
        launched: dict[str, Explanation] = {}
        for req in requests:
            service.add_vm(req)
            kind = "qemu" if req.name == GUEST else "netns"
            started = time.monotonic()
            launched[req.name] = service.launch_vm(SESSION, req.name, driver, kind)
            v = launched[req.name].vm
            what = (
                f"QEMU guest ({qemu.accelerator().name}), network ready in "
                f"{time.monotonic() - started:.1f} s: "
                if kind == "qemu"
                else ""
            )
            nics = "; ".join(
                f"{n.name} on {n.network}: MAC {n.mac}, {n.ipv4}, {n.ipv6}" for n in v.nics
            )
            out.print(f"launched {SESSION}/{v.name}: {what}{nics}", markup=False)
        out.print()
        out.print(explanation_table(launched["phone"]))
        meter_ip = launched["meter"].vm.ipv4
        if meter_ip is None:  # pragma: no cover - every launched VM has an address
            raise VnicError("the meter VM has no address")
        table = _rate_table(launched)
        out.print()
        out.print(table)
        out.print()
        out.print(_delay_table(launched))
        out.print()
        _live_change(service, driver, meter_ip, out)
    finally:
        stopped = service.session_down(SESSION, driver)
        left = [n for n in nsops.listing() if names.of_session(n, SESSION)]
        guests = qemu.owned_processes(names.owner_tag(SESSION, ""))
        out.print(
            f"session {SESSION}: down, {len(stopped)} VMs stopped, {len(left)} namespaces "
            f"and {len(guests)} QEMU processes left",
            markup=False,
        )


def _rate_table(launched: dict[str, Explanation]) -> Table:
    """Each vNIC's TCP goodput both ways against its own profile's rate, through the
    meter's vNIC on the same network; web's two vNICs carry their flows at the same time."""
    table = Table(
        "vm/nic",
        "network",
        "profile from",
        "direction",
        "configured",
        "measured TCP goodput",
        "frame rate / configured",
        title=f"iperf3, {SECONDS:g} s per direction, TCP; the profile rate counts Ethernet frames",
        title_justify="left",
    )
    meter = {n.network: n.ipv4 for n in launched["meter"].vm.nics}
    for name in ("desk", "web", "phone", GUEST):
        vm = launched[name]
        for direction, reverse in (("egress", False), ("ingress", True)):
            flows = []
            with ThreadPoolExecutor(len(vm.vm.nics)) as pool:  # a VM's vNICs all at once
                for i, nic in enumerate(vm.vm.nics):
                    target = meter[nic.network]
                    assert target is not None
                    flows.append(
                        pool.submit(
                            iperf3,
                            SESSION,
                            name,
                            "meter",
                            target,
                            seconds=SECONDS,
                            reverse=reverse,
                            port=5201 + i,
                        )
                    )
            for nic, flow in zip(vm.vm.nics, flows, strict=True):
                eff = vm.nics.get(nic.name, vm.effective)
                rate = eff.profile.direction(direction).rate
                assert rate is not None
                got = flow.result()
                ratio = got.bits_per_second / TCP_GOODPUT / rate.value
                table.add_row(
                    f"{name}/{nic.name}" + (" (qemu)" if name == GUEST else ""),
                    nic.network,
                    str(eff.sources[f"{direction}.rate"]),
                    direction,
                    str(rate),
                    f"{got.bits_per_second / 1e6:.2f} Mbit/s",
                    f"{ratio:.3f}",
                )
    return table


def _live_change(service: Service, agent: Agent, meter_ip: str, out: Console) -> None:
    """desk's egress rate doubled while an iperf3 flow runs through it: what changed in
    the kernel, and the flow's rate each second."""
    result: dict[str, Throughput] = {}
    flow = threading.Thread(
        target=lambda: result.update(
            t=iperf3(SESSION, "desk", "meter", meter_ip, seconds=LIVE_SECONDS, omit=0, interval=1)
        )
    )
    flow.start()
    time.sleep(LIVE_SECONDS / 2)
    _, changes = service.update_vm_live(SESSION, "desk", {"patch": LIVE_PATCH}, agent)
    flow.join(timeout=LIVE_SECONDS + 30)
    out.print(
        f"live change at {LIVE_SECONDS / 2:g} s of a {LIVE_SECONDS:g} s TCP flow desk -> meter "
        "(vnic vm set demo desk egress.rate=40Mbit):",
        markup=False,
    )
    for change in changes:
        for path, (old, new) in change.fields.items():
            out.print(f"  {path}: {old} -> {new}", markup=False)
        for line in change.kernel:
            out.print(f"  kernel: {line}", markup=False)
    got = result.get("t")
    if got is None:
        out.print("  the flow did not finish: see the error above", markup=False)
        return
    per_second = "  ".join(f"{bps / 1e6:.1f}" for bps in got.intervals)
    out.print(f"  flow, Mbit/s each second: {per_second} (one connection, no reset)", markup=False)


def _delay_table(launched: dict[str, Explanation]) -> Table:
    """One-way delay, jitter and loss per vNIC and direction, measured with irtt through
    the meter's vNIC on the same network."""
    meter = {n.network: n.ipv4 for n in launched["meter"].vm.nics}
    table = Table(
        "vm/nic",
        "direction",
        "configured",
        "measured one-way median",
        "σ",
        "lost",
        title=f"irtt, a probe every 10 ms for {PROBE_TIME}, one-way (both ends on this host's clock)",
        title_justify="left",
    )
    vnics = [(name, nic) for name in ("desk", "web", "phone") for nic in launched[name].vm.nics]
    for name, nic in vnics:
        d = launched[name].nics.get(nic.name, launched[name].effective).profile
        target = meter[nic.network]
        assert target is not None
        got = one_way(SESSION, name, "meter", target, interval="10ms", duration=PROBE_TIME)
        for direction, delays, lost in (
            ("egress", got.up(), got.lost_up),
            ("ingress", got.down(), got.lost_down),
        ):
            p = d.direction(direction)
            parts = [str(p.delay) if p.delay else "no delay"]
            if p.jitter:
                parts.append(f"± {p.jitter} {p.distribution}")
            if p.loss:
                parts.append(f"loss {p.loss.to_document()}")
            table.add_row(
                f"{name}/{nic.name}",
                direction,
                " ".join(parts),
                f"{quantile(delays, 0.5) / 1e6:.2f} ms",
                f"{stdev(delays) / 1e6:.2f} ms",
                f"{len(lost)} of {got.sent}",
            )
    return table
