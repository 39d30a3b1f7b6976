"""Small helpers of the root tests that several modules share."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vnic.model.launch import LaunchRequest


def with_nic(request: LaunchRequest, nic: str = "eth0", **changes: Any) -> LaunchRequest:
    """``request`` with the fields ``changes`` of its vNIC ``nic`` changed (``profile``,
    ``values``, ``mac``...), everything else as it was."""
    nics = tuple(replace(n, **changes) if n.name == nic else n for n in request.nics)
    return replace(request, nics=nics)
