"""Each host's overlays: the VXLAN segments that join a session's network across hosts.

A network whose running VMs sit on several hosts is one L2 segment (docs/overlay.md):
on each of those hosts, an overlay with VNI = the network id, the other hosts'
underlay addresses as peers (head-end replication) and every remote vNIC's MAC with
its host's address. Derived from placement alone, here; a host with no VM of a network
gets no overlay of it, and a network on one host only needs none.

Whenever placement in a session changes (a launch, a stop, a move), every host that
runs or ran VMs of it gets a change of the session's overlays (:func:`hosts_of`), in the
same transaction; agents read the overlays as of their read (level-based).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vnic.model.units import MacAddress
from vnic.store.models import HostRow, MacAllocationRow, NetworkRow, NicRow, VmRow

#: One overlay as the agents read it: network, vni, peers, macs.
OverlayDoc = dict[str, Any]


def _placed(s: Session, session_id: int) -> list[tuple[int, str, list[tuple[str, int, str]]]]:
    """Running hosted VMs of the session: (host id, host underlay, [(network, vni, mac)]).

    One query of plain rows, no ORM objects: every host of a session reads this on
    every launch in it (a session of 30 VMs over 30 hosts read it 30 times a launch)."""
    query = (
        select(
            VmRow.id,
            VmRow.host_id,
            HostRow.underlay,
            NetworkRow.name,
            NetworkRow.network_id,
            MacAllocationRow.mac,
        )
        .join(HostRow, HostRow.id == VmRow.host_id)
        .join(NicRow, NicRow.vm_id == VmRow.id)
        .join(NetworkRow, NetworkRow.id == NicRow.network_id)
        .join(MacAllocationRow, MacAllocationRow.nic_id == NicRow.id)
        .where(VmRow.session_id == session_id, VmRow.state == "running")
        .order_by(VmRow.id, NicRow.position)
    )
    by_vm: dict[int, tuple[int, str, list[tuple[str, int, str]]]] = {}
    for vm_id, host_id, underlay, net, vni, mac in s.execute(query).all():
        entry = by_vm.setdefault(vm_id, (int(host_id or 0), str(underlay or ""), []))
        entry[2].append((str(net), int(vni), str(MacAddress(mac))))
    return list(by_vm.values())


def overlays_of(s: Session, host_id: int, session_id: int) -> list[OverlayDoc]:
    """The overlays host ``host_id`` must have for the session, by network name."""
    placed = _placed(s, session_id)
    here = {net for h, _, nics in placed if h == host_id for net, _, _ in nics}
    docs = []
    for net in sorted(here):
        vni = next(v for _, _, nics in placed for n, v, _ in nics if n == net)
        macs = {
            mac: underlay
            for h, underlay, nics in placed
            if h != host_id and underlay
            for n, _, mac in nics
            if n == net
        }
        peers = sorted(set(macs.values()))
        if peers:
            docs.append({"network": net, "vni": vni, "peers": peers, "macs": macs})
    return docs


def hosts_of(s: Session, session_id: int) -> set[int]:
    """Hosts that run VMs of the session now."""
    query = (
        select(VmRow.host_id)
        .where(VmRow.session_id == session_id, VmRow.state == "running")
        .where(VmRow.host_id.is_not(None))
        .distinct()
    )
    return {int(h or 0) for h in s.scalars(query)}
