"""Small helpers of the root tests that several modules share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vnic.model.launch import LaunchRequest, NicRequest
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names


def with_nic(request: LaunchRequest, nic: str = "eth0", **changes: Any) -> LaunchRequest:
    """``request`` with the fields ``changes`` of its vNIC ``nic`` changed (``profile``,
    ``values``, ``mac``...), everything else as it was."""
    nics = tuple(replace(n, **changes) if n.name == nic else n for n in request.nics)
    return replace(request, nics=nics)


#: The network ids of the two networks of every session here.
NETWORK_IDS = {"default": 301, "data": 302}
WIDE = ["egress.rate=1Gbit", "ingress.rate=1Gbit"]


def nic(name: str, network: str, host: int, sets: list[str]) -> NicRequest:
    """A vNIC on ``network`` with host index ``host`` and the profile ``sets`` gives."""
    network_id = NETWORK_IDS[network]
    ipv4, ipv6 = names.vm_addresses(network_id, host)
    eff = complete([Layer("vm-patch", "", parse_assignments(sets))])
    mac = MacAddress.parse(f"02:00:{network_id >> 8:02x}:{network_id & 0xFF:02x}:{host:02x}:01")
    return NicRequest(
        name, network, network_id, mac, ipv4, ipv6, build_profile(eff.values), dict(eff.values)
    )


def vm(session: str, name: str, *nics: NicRequest) -> LaunchRequest:
    return LaunchRequest(session, name, nics)


def with_sets(request: LaunchRequest, nic_name: str, sets: list[str]) -> LaunchRequest:
    """``request`` with vNIC ``nic_name``'s profile made from ``sets`` (all else kept)."""
    eff = complete([Layer("vm-patch", "", parse_assignments(sets))])
    nics = tuple(
        replace(n, profile=build_profile(eff.values), values=dict(eff.values))
        if n.name == nic_name
        else n
        for n in request.nics
    )
    return replace(request, nics=nics)


def until(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Whether ``check`` holds within ``seconds`` (asked again every 0.2 s)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
