"""Endpoints the web UI's sessions pages need beyond the REST API's.

* ``GET /v1/sessions/{session}/vm-profiles`` — every VM of the session with its
  effective profile (the most specific profile that contributes, and the revision of
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
    from vnic.manager.dispatch import Manager

#: Effective fields the session page shows in its table (the rest: "explain").
SHOWN = ("egress.rate", "ingress.rate", "egress.delay", "ingress.delay")


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


def vm_profiles(manager: Manager, session: str) -> list[dict[str, Any]]:
    """The session's VMs with their effective profile (404 if the session is unknown)."""
    out = []
    for explanation in manager.service.explain_all(session):
        effective = explanation.effective.to_dict()
        revisions: dict[str, int] = effective["revisions"]
        out.append(
            {
                "vm": views.vm_json(explanation.vm),
                # resolution adds profiles lowest layer first, so the last is the most specific
                "profile": next(reversed(revisions), None),
                "revisions": revisions,
                "values": {path: effective["fields"][path]["value"] for path in SHOWN},
                "numbers": {
                    path: _number(explanation.effective.values.get(path)) for path in SHOWN
                },
            }
        )
    return out


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
