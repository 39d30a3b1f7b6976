"""Reading a session's kernel counters for the agent's metrics (:mod:`vnic.agent.metrics`).

What one direction of one vNIC counted (:func:`direction_reading`, pure, from the
dumps of its session namespace), and the dumps themselves: per session namespace
one ``ip -s -j link show`` (:func:`read_link_counters`) and one ``nft -j list
table`` (:func:`read_guard_drops`); the qdisc dump is :func:`vnic.dataplane.tc.read_class_counters`.
Every vNIC is known here by its *unit* (:func:`vnic.model.launch.link_unit`: the VM's
name for ``eth0``, ``VM.NIC`` for the others), whose links :class:`vnic.plan.names.VmLinks`
names. Split from :mod:`vnic.agent.metrics` to keep both under 600 lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vnic.dataplane import namespaces as nsops
from vnic.dataplane import nft, tc
from vnic.errors import DataplaneError
from vnic.plan import names
from vnic.plan.compile import guard_chain
from vnic.plan.model import Plan

#: Why packets of a vNIC were dropped on the host side (values of the ``cause`` label):
#:
#: - ``rate_limit``: the shaper's queue was full. The FIFO leaf under an HTB
#:   class (sized from the bandwidth-delay product and the profile's ``queue``)
#:   refused the packet because more was offered than the profile's rate
#:   drains. Under netem without loss, netem's drops (its queue is then the
#:   shaper's queue).
#: - ``queue_overflow``: a delay line was full: the delay engine's held bytes
#:   reached its limit, it could not take a frame in (its receive ring
#:   overflowed), or it could not hand a frame to an unshaped device; with
#:   netem at the root of an unshaped direction without loss, netem's drops.
#: - ``emulated_loss``: the profile's loss model (random or Gilbert-Elliott)
#:   dropped the packet on purpose. Under netem, every drop of a netem qdisc
#:   whose direction has loss: netem counts its losses and its overflows in one
#:   counter.
#: - ``anti_spoofing``: frames from the VM whose source MAC, ARP sender or IP
#:   source is not the VM's own, dropped by the nftables guard (egress only).
DROP_CAUSES = ("rate_limit", "queue_overflow", "emulated_loss", "anti_spoofing")


@dataclass(frozen=True)
class LinkCounters:
    """One device's link counters (``ip -s link``): bytes and packets each way."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


@dataclass(frozen=True)
class Reading:
    """The raw kernel totals of one direction of one vNIC, as read this time."""

    bytes: int
    packets: int
    drops: Mapping[str, int]


def direction_reading(
    plan: Plan,
    direction: str,
    counters: Mapping[tuple[str, int], tc.ClassCounters],
    engine: Mapping[str, int] | None,
    links: Mapping[str, LinkCounters],
    guard_drops: int,
) -> Reading:
    """What one direction of a vNIC counted, from the readings of its session. Pure.

    ``counters``: (device, HTB class minor) -> the leaf qdisc's counters (FIFO
    or netem); ``engine``: the delay engine's counters of this direction (None
    without an engine); ``links``: link counters by device name (only needed
    for directions nothing shapes); ``guard_drops``: the VM's anti-spoofing
    drops (counted on egress only).
    """
    dplan = plan.egress if direction == "egress" else plan.ingress
    drops = dict.fromkeys(DROP_CAUSES, 0)
    nbytes = packets = 0
    counted = False
    for leaf in dplan.leaves:
        c = counters.get((leaf.device, leaf.class_minor))
        if c is not None:
            nbytes += c.bytes
            packets += c.packets
            drops["rate_limit"] += c.drops
        counted = True
    for q in dplan.netem:
        # netem replaces the FIFO leaf (or sits at the root of an unshaped
        # direction): it is the last queue, so its counters are the delivered ones.
        c = counters.get((q.device, q.parent_minor))
        if c is not None:
            nbytes += c.bytes
            packets += c.packets
            if q.impairment.loss:
                cause = "emulated_loss"  # netem counts losses and overflows together
            elif q.parent_minor:
                cause = "rate_limit"
            else:
                cause = "queue_overflow"
            drops[cause] += c.drops
        counted = True
    if engine is not None:
        drops["emulated_loss"] += engine.get("dropped_loss", 0)
        drops["queue_overflow"] += engine.get("dropped_overflow", 0) + engine.get("socket_drops", 0)
        if not dplan.leaves:
            # A failed send into a shaped device is the leaf's own drop, already
            # counted as rate_limit; only an unshaped device's refusal is new.
            drops["queue_overflow"] += engine.get("dropped_send", 0)
        if not counted:
            nbytes, packets = engine.get("tx_bytes", 0), engine.get("tx_frames", 0)
            counted = True
    if not counted:
        link = links.get(plan.devices.port)
        if link is not None:
            # The port's receive side is what the VM sent; its transmit side what it got.
            if direction == "egress":
                nbytes, packets = link.rx_bytes, link.rx_packets
            else:
                nbytes, packets = link.tx_bytes, link.tx_packets
    if direction == "egress":
        drops["anti_spoofing"] = guard_drops
    return Reading(nbytes, packets, drops)


def needs_links(plan: Plan) -> bool:
    """Whether a direction of ``plan`` is counted by link counters (nothing shapes it)."""
    return plan.engine is None and not (plan.egress.shaped and plan.ingress.shaped)


def read_link_counters(session_ns: str) -> dict[str, LinkCounters]:
    """Link counters of every device in the namespace, from one ``ip -s -j link show``."""
    proc = nsops.run_inside(
        session_ns, ["ip", "-s", "-j", "link", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot read link counters in {session_ns}: {proc.stderr.strip()}")
    out = {}
    for link in json.loads(proc.stdout or "[]"):
        stats = link.get("stats64") or link.get("stats") or {}
        rx, tx = stats.get("rx", {}), stats.get("tx", {})
        out[str(link.get("ifname"))] = LinkCounters(
            int(rx.get("bytes", 0)),
            int(rx.get("packets", 0)),
            int(tx.get("bytes", 0)),
            int(tx.get("packets", 0)),
        )
    return out


def read_guard_drops(session_ns: str) -> dict[str, int]:
    """Anti-spoofing drops per guard chain of a session, from one ``nft -j list table``."""
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-j", "list", "table", "bridge", nft.TABLE],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        return {}  # no VM of the session has a guard yet: nothing dropped
    chains: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("comment") not in nft.DROP_REASONS:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                chain = str(rule["chain"])
                chains[chain] = chains.get(chain, 0) + int(expr["counter"]["packets"])
    return chains


def guard_drops_by_unit(chains: Mapping[str, int], units: Iterable[str]) -> dict[str, int]:
    """Each vNIC's anti-spoofing drops, by unit: its guard is on its port or on its relay's
    bridge end. A unit whose guard is not there (not built yet) has 0."""
    out = {}
    for unit in units:
        links = names.VmLinks.of(unit)
        out[unit] = chains.get(guard_chain(links.port), 0) + chains.get(
            guard_chain(links.relay_port), 0
        )
    return out
