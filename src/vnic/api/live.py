"""REST routes of dynamic adjustment: runtime adjustments, the audit log, a session's
controller (threshold rules and feedback limits) and scenarios.

Included by :func:`vnic.api.app.create_app`. Every change here goes through
:class:`~vnic.manager.runtime.Runtime` (validated, audited) and then live to
the running VMs it reaches (:meth:`~vnic.manager.dispatch.Manager.reapply`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from vnic.api.common import VmWriter
from vnic.api.deps import Caller
from vnic.controller._parse import span
from vnic.edge.bodies import StrictJsonRoute
from vnic.errors import InvalidInput
from vnic.manager import views
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager
from vnic.manager.runtime import (
    AdjustmentInfo,
    AuditEntry,
    parse_reason,
    parse_source,
    parse_user_source,
)
from vnic.model.patch import typed_patch


class AdjustmentSet(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    set: dict[str, Any] | None = Field(
        default=None, description="Fields to set: a profile document or dotted paths"
    )
    profile: str | None = Field(default=None, description="Switch to this profile's values")
    for_: str | None = Field(
        default=None, alias="for", description="Lifetime, e.g. 60s; omitted = until removed"
    )
    reason: str = Field(default="set by hand", description="Why (kept in the audit log)")
    nic: str = Field(default="eth0", description="The vNIC adjusted (eth0..eth7)")


def adjustment_json(a: AdjustmentInfo) -> dict[str, Any]:
    return {
        "session": a.session,
        "vm": a.vm,
        "source": a.source,
        "reason": a.reason,
        "profile": a.profile,
        "set": dict(a.values),
        "nic": a.nic,
        "expires_at": a.expires_at,
        "created_at": views.utc(a.created_at),
    }


def audit_json(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": views.utc(e.at),
        "session": e.session,
        "vm": e.vm,
        "nic": e.nic,
        "source": e.source,
        "reason": e.reason,
        "old": dict(e.old),
        "new": dict(e.new),
    }


def expiry(text: str | None, now: datetime, path: str = "for") -> datetime | None:
    """``now`` plus a time span given as text (``"60s"``, ``"10m"``); None for none. Read as
    the controller reads its spans (rule ``for``, ``expires``), up to a year."""
    if text is None:
        return None
    return now + timedelta(seconds=span(text, path, positive=True))


class LiveOps:
    """The operations behind the routes, as JSON in and out: the API calls them, and so
    does the CLI when it works embedded (the remote client sends the same over HTTP)."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def adjust(self, session: str, vm: str, source: str, body: AdjustmentSet) -> dict[str, Any]:
        runtime = self.manager.runtime
        source = parse_user_source(source)  # rule:*, scenario:*, feedback are the system's
        changed = runtime.adjust(
            session,
            vm,
            source=source,
            reason=parse_reason(body.reason),
            values=typed_patch(body.set),
            profile=body.profile,
            expires_at=expiry(body.for_, self.manager.service.clock()),
            driver=self.manager.agent,
            nic=body.nic,
        )
        applied = self.manager.reapply(session=session, vm=vm, strict=True)
        return {
            "fields": {p: {"old": o, "new": n} for p, (o, n) in changed.items()},
            "changes": [views.change_json(c) for c in applied],
        }

    def clear(self, session: str, vm: str, source: str, nic: str = "eth0") -> dict[str, Any]:
        changed = self.manager.runtime.clear(
            session, vm, parse_source(source), "removed by hand", nic=nic
        )
        self.manager.reapply(session=session, vm=vm, strict=True)
        return {"fields": {p: {"old": o, "new": n} for p, (o, n) in changed.items()}}

    def adjustments(self, session: str, vm: str) -> list[dict[str, Any]]:
        return [adjustment_json(a) for a in self.manager.runtime.adjustments(session, vm)]

    def audit(
        self, session: str | None = None, vm: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        return [audit_json(e) for e in self.manager.runtime.audit(session, vm, limit)]

    def controller(self, session: str) -> dict[str, Any]:
        return self.manager.runtime.controller(session)

    def set_controller(self, session: str, doc: Any) -> dict[str, Any]:
        return self.manager.runtime.set_controller(session, doc)

    def controller_state(self, session: str) -> dict[str, Any]:
        self.manager.service.get_session(session)
        return self.manager.live.state(session)

    def start_scenario(self, session: str, doc: Any) -> dict[str, Any]:
        self.manager.service.get_session(session)
        if not isinstance(doc, dict):
            raise InvalidInput.one("scenario", doc, "a mapping with name and steps or trace")
        return self.manager.live.start_scenario(session, doc)

    def scenarios(self, session: str) -> list[dict[str, Any]]:
        self.manager.service.get_session(session)
        return self.manager.live.scenarios(session)

    def scenario(self, session: str, name: str, action: str) -> dict[str, Any]:
        return self.manager.live.scenario(session, name, action)


def live_router(manager: Manager, vm_writer: VmWriter) -> APIRouter:
    """The routes of dynamic adjustment; ``vm_writer(who, session, action)`` refuses callers
    that may not change VMs."""
    ops = LiveOps(manager)
    router = APIRouter(route_class=StrictJsonRoute)

    @router.get(
        "/v1/sessions/{session}/vms/{vm}/adjustments",
        response_model=list[dict[str, Any]],
        tags=["adjustments"],
    )
    def list_adjustments(who: Caller, session: str, vm: str) -> list[dict[str, Any]]:
        """Runtime adjustments of the VM: the top resolution layer, by source."""
        return ops.adjustments(session, vm)

    @router.put(
        "/v1/sessions/{session}/vms/{vm}/adjustments/{source}",
        response_model=dict[str, Any],
        tags=["adjustments"],
    )
    def put_adjustment(
        who: Caller, session: str, vm: str, source: str, body: AdjustmentSet
    ) -> dict[str, Any]:
        """Set ``source``'s adjustment of vNIC ``nic`` (default eth0; ``user`` by hand);
        applied live, audited."""
        vm_writer(who, session, "adjusting a VM")
        return ops.adjust(session, vm, source, body)

    @router.delete(
        "/v1/sessions/{session}/vms/{vm}/adjustments/{source}",
        response_model=dict[str, Any],
        tags=["adjustments"],
    )
    def delete_adjustment(
        who: Caller, session: str, vm: str, source: str, nic: Annotated[str, Query()] = "eth0"
    ) -> dict[str, Any]:
        """Remove ``source``'s adjustment of vNIC ``nic`` (default eth0)."""
        vm_writer(who, session, "adjusting a VM")
        return ops.clear(session, vm, source, nic)

    @router.get("/v1/audit", response_model=list[dict[str, Any]], tags=["adjustments"])
    def audit(
        who: Caller,
        session: Annotated[str | None, Query()] = None,
        vm: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query()] = 200,
    ) -> list[dict[str, Any]]:
        """Runtime changes of effective profiles, newest first: when, source, why, old, new."""
        return ops.audit(session, vm, limit)

    @router.get(
        "/v1/sessions/{session}/controller", response_model=dict[str, Any], tags=["controller"]
    )
    def get_controller(who: Caller, session: str) -> dict[str, Any]:
        """The session's threshold rules and feedback limits."""
        return ops.controller(session)

    @router.put(
        "/v1/sessions/{session}/controller", response_model=dict[str, Any], tags=["controller"]
    )
    def put_controller(who: Caller, session: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replace the session's rules and feedback limits (validated; canonical form back)."""
        require_admin(who, "changing a session's controller")
        return ops.set_controller(session, body)

    @router.get(
        "/v1/sessions/{session}/controller/state",
        response_model=dict[str, Any],
        tags=["controller"],
    )
    def controller_state(who: Caller, session: str) -> dict[str, Any]:
        """Each rule's state per VM (holding since, armed, last fired), recent controller
        events, and the session's scenarios."""
        return ops.controller_state(session)

    @router.post(
        "/v1/sessions/{session}/scenarios",
        response_model=dict[str, Any],
        status_code=201,
        tags=["controller"],
    )
    def start_scenario(who: Caller, session: str, body: dict[str, Any]) -> dict[str, Any]:
        """Start a scenario (a timeline of steps, or a bandwidth trace) on the session's VMs."""
        vm_writer(who, session, "starting a scenario")
        return ops.start_scenario(session, body)

    @router.get(
        "/v1/sessions/{session}/scenarios",
        response_model=list[dict[str, Any]],
        tags=["controller"],
    )
    def list_scenarios(who: Caller, session: str) -> list[dict[str, Any]]:
        return ops.scenarios(session)

    @router.post(
        "/v1/sessions/{session}/scenarios/{name}/{action}",
        response_model=dict[str, Any],
        tags=["controller"],
    )
    def scenario_action(who: Caller, session: str, name: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume`` or ``stop`` a scenario (stop removes its adjustments)."""
        vm_writer(who, session, "controlling a scenario")
        return ops.scenario(session, name, action)

    return router
