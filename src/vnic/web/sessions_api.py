"""Endpoints the web UI's sessions pages need beyond the REST API's.

* ``GET /v1/sessions/{session}/vm-profiles`` — every VM of the session with its
  effective profile (eth0's, and under ``nics`` every vNIC's) (the most specific profile that contributes, and the revision of
  each contributing one) and its configured rate and delay each way, so the session
  page draws its table from one request instead of one ``explain`` per VM. The values
  are the service's resolution (:meth:`~vnic.manager.service.Service.explain_all`), not a
  second copy of the rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from vnic.api import schemas as sc
from vnic.api.deps import Caller
from vnic.manager import views
from vnic.model.units import Duration, Rate

if TYPE_CHECKING:
    from vnic.model.resolve import Effective

if TYPE_CHECKING:
    from vnic.manager.dispatch import Manager

#: Effective fields the session page shows in its table (the rest: "explain").
SHOWN = ("egress.rate", "ingress.rate", "egress.delay", "ingress.delay")


class NicProfilePublic(BaseModel):
    name: str = Field(description="The vNIC (eth0, eth1...)")
    network: str = Field(description="Its network in the session")
    mac: str | None
    ipv4: str | None
    ipv6: str | None
    profile: str | None = Field(description="The most specific profile that contributes")
    revisions: dict[str, int]
    values: dict[str, Any]
    numbers: dict[str, float | None]


class VmProfilePublic(BaseModel):
    vm: sc.VmPublic
    profile: str | None = Field(
        description="The most specific profile that contributes (None: no profile applies)"
    )
    revisions: dict[str, int] = Field(description="Each contributing profile -> its revision")
    values: dict[str, Any] = Field(
        description="egress/ingress rate and delay as effective, as text (None = unset)"
    )
    numbers: dict[str, float | None] = Field(
        description="The same in base units: rates in bit/s, delays in seconds (None = unset)"
    )
    nics: list[NicProfilePublic] = Field(
        default_factory=list,
        description="Every vNIC the same way, eth0 first (the keys above are eth0's)",
    )


def vm_profiles(manager: Manager, session: str) -> list[dict[str, Any]]:
    """The session's VMs with their effective profile, eth0's and every vNIC's (404 if the
    session is unknown)."""
    out = []
    for explanation in manager.service.explain_all(session):
        nics = []
        for nic in explanation.vm.nics:
            eff = explanation.nics.get(nic.name, explanation.effective)
            nics.append(
                {
                    "name": nic.name,
                    "network": nic.network,
                    "mac": nic.mac,
                    "ipv4": nic.ipv4,
                    "ipv6": nic.ipv6,
                    **_profile(eff),
                }
            )
        out.append(
            {"vm": views.vm_json(explanation.vm), **_profile(explanation.effective), "nics": nics}
        )
    return out


def _profile(eff: Effective) -> dict[str, Any]:
    """The headline of an effective profile: its most specific profile, the revisions, and
    the :data:`SHOWN` fields as text and in base units."""
    effective = eff.to_dict()
    revisions: dict[str, int] = effective["revisions"]
    return {
        # resolution adds profiles lowest layer first, so the last is the most specific
        "profile": next(reversed(revisions), None),
        "revisions": revisions,
        "values": {path: effective["fields"][path]["value"] for path in SHOWN},
        "numbers": {path: _number(eff.values.get(path)) for path in SHOWN},
    }


def _number(value: Any) -> float | None:
    """A rate in bit/s or a delay in seconds, from the unit types."""
    if isinstance(value, Duration):
        return value.seconds
    if isinstance(value, Rate):
        return float(value.value)
    return None


def add_routes(app: FastAPI, manager: Manager) -> None:
    """Register this part's endpoints on the manager's app."""

    @app.get(
        "/v1/sessions/{session}/vm-profiles",
        response_model=list[VmProfilePublic],
        tags=["vms"],
    )
    def session_vm_profiles(who: Caller, session: str) -> list[dict[str, Any]]:
        """Every VM of the session with its effective profile name, revisions, and rate
        and delay each way (the web UI's session table, in one request)."""
        return vm_profiles(manager, session)
