"""Launch requests as JSON, for the desired-state file and the manager-to-agent API.

The profile travels as its canonical document; the receiving side parses it
with the same code that validated it, so the agent never trusts a value the
model would refuse.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from vnic.errors import FieldError, InvalidInput
from vnic.model.launch import (
    DEFAULT_NETWORK,
    MAX_NICS,
    PRIMARY_NIC,
    LaunchRequest,
    NicRequest,
)
from vnic.model.network import parse_nic_name
from vnic.model.profile import build_profile, document_to_values, values_to_document
from vnic.model.units import MacAddress


def request_to_wire(request: LaunchRequest) -> dict[str, Any]:
    """The request as JSON: its vNICs under ``nics``, and the first vNIC's fields at the
    top level too, as a request had before VMs had several vNICs (an agent of the
    previous release still reads it as a one-vNIC VM)."""
    nics = [_nic_to_wire(n) for n in request.nics]
    first = {k: v for k, v in nics[0].items() if k not in ("name", "network")}
    return {"session": request.session, "vm": request.vm, **first, "nics": nics}


def _nic_to_wire(nic: NicRequest) -> dict[str, Any]:
    return {
        "name": nic.name,
        "network": nic.network,
        "network_id": nic.network_id,
        "mac": str(nic.mac),
        "ipv4": str(nic.ipv4),
        "ipv6": str(nic.ipv6),
        "profile": values_to_document(nic.values),
        "revisions": dict(nic.revisions),
    }


def request_from_wire(doc: Any) -> LaunchRequest:
    """Parse a wire request; any problem is an :class:`InvalidInput` naming the field.

    A request without ``nics`` (written before VMs had several vNICs: a desired-state
    file of the previous release) is one ``eth0`` on ``default``."""
    if not isinstance(doc, dict):
        raise InvalidInput.one("request", doc, "a launch request object")
    nics_doc = doc.get("nics")
    paths = [f"nics[{i}]." for i in range(len(nics_doc))] if isinstance(nics_doc, list) else []
    if nics_doc is None:
        nics_doc, paths = [{**doc, "name": PRIMARY_NIC, "network": DEFAULT_NETWORK}], [""]
    if not isinstance(nics_doc, list) or not 1 <= len(nics_doc) <= MAX_NICS:
        raise InvalidInput.one("nics", nics_doc, f"a list of 1 to {MAX_NICS} vNICs")
    try:
        nics = tuple(_nic_from_wire(n, p) for n, p in zip(nics_doc, paths, strict=True))
        return LaunchRequest(session=str(doc["session"]), vm=str(doc["vm"]), nics=nics)
    except KeyError as exc:
        raise InvalidInput.one(str(exc.args[0]), None, "a value (the field is required)") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput.one("request", str(exc), "a well-formed launch request") from None


def _nic_from_wire(doc: Any, path: str) -> NicRequest:
    """One vNIC; ``path`` is its place in the request (``nics[1].``; empty for the
    top level of a one-vNIC request of the previous release)."""
    if not isinstance(doc, dict):
        raise InvalidInput.one(path.rstrip(".") or "request", doc, "a vNIC object")
    errors: list[FieldError] = []
    values = document_to_values(doc.get("profile") or {}, errors)
    if errors:
        raise InvalidInput([e.under(f"{path}profile") for e in errors])
    return NicRequest(
        name=parse_nic_name(doc["name"], f"{path}name"),
        network=str(doc["network"]),
        network_id=int(doc["network_id"]),
        mac=MacAddress.parse(doc["mac"]),
        ipv4=ipaddress.IPv4Interface(doc["ipv4"]),
        ipv6=ipaddress.IPv6Interface(doc["ipv6"]),
        profile=build_profile(values),
        values=values,
        revisions={str(k): int(v) for k, v in dict(doc.get("revisions") or {}).items()},
    )
