"""A session's network spread over several hosts: one L2 segment over VXLAN. Pure.

On each host with VMs of the network, a VXLAN device (VNI = the network's id, UDP
port :data:`VXLAN_PORT`) made in the host's own namespace (the underlay: its UDP
socket lives there, ``local`` the host's underlay address, no learning) and moved
into the session namespace, on the network's bridge. Unicast head-end replication:
an all-zero FDB entry towards every peer host (broadcast, unknown unicast, multicast
are sent to each) and a static entry for every remote vNIC's MAC.

Names (this module's, so cleanup, inventory and drift know them as the session's own):

* the device ``vt`` + 10 hex digits of a hash of the network's name (:func:`device_of`),
  with the interface alias ``vnic:<session>/net:<network>`` (:func:`alias_of`): not a
  VM's tag (``:`` is not in VM names), so the reconcile never takes it for an orphan
  VM; it goes with the session namespace;
* in the host's namespace, the nftables table ``inet vnic-overlay`` (:data:`TABLE`),
  one base chain per session ``ov.<session>`` (:func:`chain_of`) and two sets per
  VNI, ``ov.<session>.<vni>.4`` / ``.6`` (:func:`set_of`): the peers a VXLAN frame
  of that VNI is accepted from; the chain drops the rest (``.`` is in no session
  name, so a name is one session's exactly).

The wire form (the manager's ``overlays``, see ``docs/overlay.md``) is parsed here too
(:func:`overlays_from_wire`), bounded: :data:`MAX_NETWORKS` networks per session,
:data:`MAX_PEERS` peers, :data:`MAX_MACS` MACs per network.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput
from vnic.model.network import parse_network_name
from vnic.model.session import NETWORK_ID_MAX, parse_session_name
from vnic.model.units import MacAddress, UnitError

#: UDP port of the VXLAN devices (IANA's), explicit: the kernel's default is 8472.
VXLAN_PORT: Final = 4789
#: The host-namespace nftables table (family inet) holding every session's filter.
TABLE: Final = "vnic-overlay"
#: Bytes VXLAN adds to a vNIC's MTU over an IPv4 / IPv6 underlay (outer IP + UDP +
#: VXLAN header + inner Ethernet header: 20/40 + 8 + 8 + 14).
OVERHEAD: Final = {4: 50, 6: 70}
#: Bounds of one session's overlays in one document.
MAX_NETWORKS, MAX_PEERS, MAX_MACS = 8, 512, 4096
#: VNIs are the network ids: 24 bits, 0 not used.
VNI_MAX: Final = NETWORK_ID_MAX

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Overlay:
    """One network of ``session`` across hosts, as seen from one host: its VNI, the
    underlay addresses of the other hosts with VMs of it (``peers``) and where each
    remote vNIC's MAC lives (``macs``: MAC → peer address)."""

    session: str
    network: str
    vni: int
    peers: tuple[Address, ...]
    macs: tuple[tuple[MacAddress, Address], ...] = ()

    @property
    def device(self) -> str:
        return device_of(self.network)

    def to_wire(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "vni": self.vni,
            "peers": [str(p) for p in self.peers],
            "macs": {str(m): str(p) for m, p in self.macs},
        }


def device_of(network: str) -> str:
    """The VXLAN device of ``network``: ``vt`` and 10 hex digits of a hash of its name."""
    return f"vt{hashlib.sha1(network.encode()).hexdigest()[:10]}"


def alias_of(session: str, network: str) -> str:
    """The VXLAN device's interface alias: ``vnic:<session>/net:<network>``."""
    return f"vnic:{session}/net:{network}"


def network_of_alias(alias: str | None, session: str) -> str | None:
    """The network an overlay device's alias names, if it is one of ``session``'s."""
    prefix = f"vnic:{session}/net:"
    return alias[len(prefix) :] if alias and alias.startswith(prefix) else None


def chain_of(session: str) -> str:
    return f"ov.{session}"


def set_of(session: str, vni: int, family: int) -> str:
    return f"ov.{session}.{vni}.{family}"


def overhead(underlay: Address) -> int:
    """Bytes the overlay adds to a vNIC's MTU over this underlay address's family."""
    return OVERHEAD[underlay.version]


def mtu_error(vnic_mtu: int, underlay_mtu: int, family: int, path: str = "mtu") -> InvalidInput:
    """The refusal of a vNIC MTU that does not fit the underlay, with the numbers."""
    need = vnic_mtu + OVERHEAD[family]
    fits = underlay_mtu - OVERHEAD[family]
    return InvalidInput.one(
        path,
        vnic_mtu,
        f"an MTU that fits the overlay: {vnic_mtu} needs an underlay of {need}; the underlay "
        f"carries {underlay_mtu}: lower the profile's mtu to {fits} or raise the underlay's",
    )


def filter_script(session: str, overlays: Sequence[Overlay]) -> str:
    """The nft script that makes the session's filter exactly ``overlays`` (one transaction):
    its base chain on the input hook drops UDP :data:`VXLAN_PORT` frames of each of its
    VNIs (``@th,96,24``: the VNI field of the VXLAN header) whose source is not one of
    that network's peers. Frames of a VNI no device here has are the kernel's to drop.
    The session's sets no longer used are deleted by the caller (:func:`stale_sets`)."""
    t, chain = f"inet {TABLE}", chain_of(session)
    lines = [
        f"add table {t}",
        f"add chain {t} {chain} {{ type filter hook input priority -50; policy accept; }}",
        f"flush chain {t} {chain}",
    ]
    for o in overlays:
        for family, kind, match in ((4, "ipv4_addr", "ip"), (6, "ipv6_addr", "ip6")):
            name = set_of(session, o.vni, family)
            lines += [f"add set {t} {name} {{ type {kind}; }}", f"flush set {t} {name}"]
            members = [str(p) for p in o.peers if p.version == family]
            if members:
                lines.append(f"add element {t} {name} {{ {', '.join(members)} }}")
            lines.append(
                f"add rule {t} {chain} meta nfproto ipv{family} udp dport {VXLAN_PORT}"
                f" @th,96,24 {o.vni} {match} saddr != @{name} counter drop"
            )
    return "\n".join(lines) + "\n"


def stale_sets(session: str, present: Sequence[str], overlays: Sequence[Overlay]) -> list[str]:
    """The session's sets among ``present`` that ``overlays`` no longer use."""
    keep = {set_of(session, o.vni, f) for o in overlays for f in (4, 6)}
    return [s for s in present if is_set_of(s, session) and s not in keep]


def is_set_of(name: str, session: str) -> bool:
    """Whether nft set ``name`` is one of ``session``'s (``ov.<session>.<vni>.<4|6>``)."""
    parts = name.split(".")
    return (
        len(parts) == 4 and parts[:2] == ["ov", session] and parts[2].isdigit() and parts[3] in "46"
    )


# ----------------------------------------------------------------------------- the wire form


def overlays_from_wire(session: str, value: Any, path: str = "overlays") -> list[Overlay]:
    """One session's overlays from the manager's list form
    (``[{"network", "vni", "peers": [...], "macs": {MAC: peer}}]``); InvalidInput naming
    each bad field (``overlays[0].peers[2]``...) otherwise."""
    parse_session_name(session, "session")
    if not isinstance(value, list):
        raise InvalidInput.one(path, value, "a list of overlays")
    if len(value) > MAX_NETWORKS:
        raise InvalidInput.one(path, f"{len(value)} networks", f"at most {MAX_NETWORKS}")
    out: list[Overlay] = []
    errors: list[FieldError] = []
    for i, doc in enumerate(value):
        try:
            out.append(_one(session, doc, f"{path}[{i}]"))
        except InvalidInput as exc:
            errors += exc.errors
    if errors:
        raise InvalidInput(errors)
    columns: dict[str, list[object]] = {
        "network": [o.network for o in out],
        "vni": [o.vni for o in out],
    }
    for field_name, seen in columns.items():
        dup = next((x for x in seen if seen.count(x) > 1), None)
        if dup is not None:
            raise InvalidInput.one(f"{path}.{field_name}", dup, "each network once, each VNI once")
    return out


def _one(session: str, doc: Any, path: str) -> Overlay:
    if not isinstance(doc, dict):
        raise InvalidInput.one(path, doc, "an object with network, vni, peers, macs")
    unknown = sorted(set(doc) - {"network", "vni", "peers", "macs"})
    if unknown:
        raise InvalidInput.one(f"{path}.{unknown[0]}", doc[unknown[0]], "no such field")
    network = parse_network_name(doc.get("network"), f"{path}.network")
    vni = doc.get("vni")
    if not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni <= VNI_MAX:
        raise InvalidInput.one(f"{path}.vni", vni, f"a VNI, an integer 1 to {VNI_MAX}")
    peers_doc = doc.get("peers", [])
    if not isinstance(peers_doc, list) or len(peers_doc) > MAX_PEERS:
        raise InvalidInput.one(
            f"{path}.peers", peers_doc, f"a list of at most {MAX_PEERS} addresses"
        )
    peers = tuple(dict.fromkeys(_address(p, f"{path}.peers[{j}]") for j, p in enumerate(peers_doc)))
    macs_doc = doc.get("macs", {})
    if not isinstance(macs_doc, dict) or len(macs_doc) > MAX_MACS:
        raise InvalidInput.one(f"{path}.macs", macs_doc, f"an object of at most {MAX_MACS} MACs")
    macs: dict[MacAddress, Address] = {}
    for text, where in macs_doc.items():
        try:
            mac = MacAddress.parse(text)
        except UnitError:
            raise InvalidInput.one(f"{path}.macs", text, MacAddress.EXPECTED) from None
        if mac.is_multicast:
            raise InvalidInput.one(f"{path}.macs", text, "a unicast MAC")
        peer = _address(where, f"{path}.macs.{mac}")
        if peer not in peers:
            raise InvalidInput.one(f"{path}.macs.{mac}", where, "one of the network's peers")
        macs[mac] = peer
    return Overlay(
        session, network, vni, peers, tuple(sorted(macs.items(), key=lambda m: m[0].value))
    )


def _address(value: Any, path: str) -> Address:
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError
        address = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidInput.one(path, value, "an underlay IPv4 or IPv6 address") from None
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        raise InvalidInput.one(path, value, "a host's unicast underlay address")
    return address


def check_family(overlays: Sequence[Overlay], underlay: Address) -> None:
    """Every peer in the underlay address's family (VXLAN's socket is of one family)."""
    for i, o in enumerate(overlays):
        for j, p in enumerate(o.peers):
            if p.version != underlay.version:
                raise InvalidInput.one(
                    f"overlays[{i}].peers[{j}]",
                    str(p),
                    f"an IPv{underlay.version} address, as the underlay {underlay}",
                )
