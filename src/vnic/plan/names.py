"""Names and ownership tags of everything the netns data plane creates. Pure.

Every object carries its session and VM, so cleanup deletes exactly what vnic
made and a restarted agent can tell its objects from anyone else's:

* session namespace ``vnic.<session>`` holding one bridge per network: ``vbr0``
  for ``default``, ``vb<hash>`` for the others (:func:`bridge_of`);
* VM namespace ``vnic.<session>.<vm>`` holding ``eth0``, ``eth1``...;
* in the session namespace, per vNIC: the bridge port ``vh<id>`` (host end of
  the vNIC's veth) and the IFB ``vi<id>``, both with the interface alias
  ``vnic:<session>/<unit>``; the *unit* is the VM's name for ``eth0`` and
  ``<vm>.<nic>`` for the others (:func:`vnic.model.launch.link_unit`), and
  ``<id>`` is 10 hex digits of a hash of the unit (interface names are limited
  to 15 bytes);
* when the vnic delay engine runs: the relay veth ``vx<id>`` (engine side)
  with its peer ``vy<id>`` on the bridge instead of the port, same alias.

Session and VM names are ``[a-z0-9-]`` (see :mod:`vnic.model.session`), so
``.`` separates them unambiguously.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from vnic.model.launch import MAX_NICS, link_unit
from vnic.model.network import nic_addresses

PREFIX = "vnic"
BRIDGE = "vbr0"
VM_IFNAME = "eth0"


def bridge_of(network: str) -> str:
    """The bridge of a session's network in the session namespace: ``vbr0`` for
    ``default`` (the one bridge a session had before it had several networks), else
    ``vb`` and 10 hex digits of a hash of the network's name."""
    if network == "default":
        return BRIDGE
    return f"vb{hashlib.sha1(network.encode()).hexdigest()[:10]}"


def session_netns(session: str) -> str:
    return f"{PREFIX}.{session}"


def vm_netns(session: str, vm: str) -> str:
    return f"{PREFIX}.{session}.{vm}"


def owner_tag(session: str, vm: str | None = None) -> str:
    return f"{PREFIX}:{session}/{vm}" if vm else f"{PREFIX}:{session}"


def of_session(name: str, session: str) -> bool:
    """Whether namespace ``name`` is ``session``'s own or one of its VMs'."""
    return name == session_netns(session) or name.startswith(vm_netns(session, ""))


def parse_vm_netns(name: str, session: str) -> str | None:
    """The VM name if ``name`` is a VM namespace of ``session``, else None."""
    prefix = vm_netns(session, "")
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    if rest and "." not in rest:
        return rest
    return None


def vm_units(vm: str) -> tuple[str, ...]:
    """The units every vNIC a VM may have is known by on the host side (``eth0`` first:
    the VM's own name), so that removal finds a VM's objects by their names and tags
    without being told which vNICs it had."""
    return tuple(link_unit(vm, f"eth{i}") for i in range(MAX_NICS))


def _vm_id(vm: str) -> str:
    return hashlib.sha1(vm.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class VmLinks:
    """Interface names of one VM inside its session namespace."""

    port: str
    ifb: str
    relay: str
    relay_port: str

    @classmethod
    def of(cls, unit: str) -> VmLinks:
        """The links of the vNIC the host side knows as ``unit`` (the VM's name for
        ``eth0``, ``VM.NIC`` for the others)."""
        ident = _vm_id(unit)
        return cls(port=f"vh{ident}", ifb=f"vi{ident}", relay=f"vx{ident}", relay_port=f"vy{ident}")

    def all(self) -> tuple[str, ...]:
        return (self.port, self.ifb, self.relay, self.relay_port)


def session_ipv4(network_id: int) -> ipaddress.IPv4Network:
    """The session's IPv4 subnet: 10.<hi>.<lo>.0/24 from the low 16 bits of the network id.

    Sessions are isolated namespaces, so two sessions may share a subnet.
    """
    return ipaddress.IPv4Network(((10 << 24) | ((network_id & 0xFFFF) << 8), 24))


def session_ipv6(network_id: int) -> ipaddress.IPv6Network:
    """The session's IPv6 subnet: fd76:6e<network id, 24 bits>::/64 (unique local)."""
    value = (0xFD766E << 104) | ((network_id & 0xFFFFFF) << 80)
    return ipaddress.IPv6Network((value, 64))


def vm_addresses(
    network_id: int, host_index: int
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    """The VM's IPv4 and IPv6 interface addresses (host index 2..254; .1 is the session's)
    in the subnets derived from ``network_id``."""
    return nic_addresses(session_ipv4(network_id), session_ipv6(network_id), host_index)
