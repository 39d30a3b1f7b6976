"""Launch requests as JSON, for the desired-state file and the manager-to-agent API.

The profile travels as its canonical document; the receiving side parses it
with the same code that validated it, so the agent never trusts a value the
model would refuse.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from vnic.errors import FieldError, InvalidInput
from vnic.model.launch import LaunchRequest
from vnic.model.profile import build_profile, document_to_values, values_to_document
from vnic.model.units import MacAddress


def request_to_wire(request: LaunchRequest) -> dict[str, Any]:
    return {
        "session": request.session,
        "network_id": request.network_id,
        "vm": request.vm,
        "mac": str(request.mac),
        "ipv4": str(request.ipv4),
        "ipv6": str(request.ipv6),
        "profile": values_to_document(request.values),
        "revisions": dict(request.revisions),
    }


def request_from_wire(doc: Any) -> LaunchRequest:
    """Parse a wire request; any problem is an :class:`InvalidInput` naming the field."""
    if not isinstance(doc, dict):
        raise InvalidInput.one("request", doc, "a launch request object")
    errors: list[FieldError] = []
    values = document_to_values(doc.get("profile") or {}, errors)
    if errors:
        raise InvalidInput([e.under("profile") for e in errors])
    try:
        return LaunchRequest(
            session=str(doc["session"]),
            network_id=int(doc["network_id"]),
            vm=str(doc["vm"]),
            mac=MacAddress.parse(doc["mac"]),
            ipv4=ipaddress.IPv4Interface(doc["ipv4"]),
            ipv6=ipaddress.IPv6Interface(doc["ipv6"]),
            profile=build_profile(values),
            values=values,
            revisions={str(k): int(v) for k, v in dict(doc.get("revisions") or {}).items()},
        )
    except KeyError as exc:
        raise InvalidInput.one(str(exc.args[0]), None, "a value (the field is required)") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput.one("request", str(exc), "a well-formed launch request") from None
