"""The API's session routes: list, create, read, change policy or owner, delete, stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from vnic.api import schemas as sc
from vnic.api.common import VmWriter, changes_json
from vnic.api.deps import Caller
from vnic.edge.bodies import StrictJsonRoute
from vnic.errors import FieldError, InvalidInput
from vnic.manager import views
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager
from vnic.model.session import AssignmentRule


def sessions_router(manager: Manager, vm_writer: VmWriter) -> APIRouter:
    """The ``/v1/sessions`` routes; ``vm_writer`` checks who may stop a session's VMs."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["sessions"])
    svc = manager.service

    @router.get("/v1/sessions", response_model=list[sc.SessionPublic])
    def list_sessions(who: Caller) -> list[dict[str, Any]]:
        return [views.session_json(s) for s in svc.list_sessions()]

    @router.post("/v1/sessions", response_model=sc.SessionPublic, status_code=201)
    def create_session(who: Caller, body: sc.SessionCreate) -> dict[str, Any]:
        require_admin(who, "creating a session")
        info = svc.create_session(
            body.name,
            default_profile=body.default_profile,
            rules=_rules(body.rules),
            network_id=body.network_id,
            overrides_allowed=body.overrides_allowed,
            owner=body.owner,
            placement=body.placement,
        )
        return views.session_json(info)

    @router.get("/v1/sessions/{name}", response_model=sc.SessionPublic)
    def get_session(who: Caller, name: str) -> dict[str, Any]:
        return views.session_json(svc.get_session(name))

    @router.patch("/v1/sessions/{name}", response_model=sc.SessionChanged)
    def patch_session(who: Caller, name: str, body: sc.SessionUpdate) -> dict[str, Any]:
        """Change the policy or owner; omitted keys stay, null removes a default profile or owner."""
        require_admin(who, "changing a session")
        changes: dict[str, Any] = {k: getattr(body, k) for k in body.model_fields_set}
        if "rules" in changes:
            changes["rules"] = _rules(changes["rules"] or [])
        if changes.get("overrides_allowed", True) is None:
            raise InvalidInput.one("overrides_allowed", None, "true or false")
        info = svc.update_session(name, changes, manager.agent)
        applied = svc.reapply(manager.agent, session=name, source="user", reason="session policy")
        return {**views.session_json(info), "changes": changes_json(applied)}

    @router.delete("/v1/sessions/{name}", status_code=204)
    def delete_session(who: Caller, name: str, force: Annotated[bool, Query()] = False) -> Response:
        """Delete a session; with VMs in it only when ``force`` (which stops and removes them)."""
        require_admin(who, "deleting a session")
        if force or not svc.get_session(name).vms:
            svc.session_down(name, manager.agent)
        svc.delete_session(name, force=force)  # without force and with VMs: InUse, naming them
        return Response(status_code=204)

    @router.post("/v1/sessions/{name}/down", response_model=list[str])
    def session_down(who: Caller, name: str) -> list[str]:
        """Stop every VM of the session and remove its network; returns the VMs stopped."""
        vm_writer(who, name, "stopping a session")
        return svc.session_down(name, manager.agent)

    return router


def _rules(docs: Sequence[Any]) -> list[AssignmentRule]:
    rules: list[AssignmentRule] = []
    errors: list[FieldError] = []
    for i, doc in enumerate(docs):
        try:
            rules.append(AssignmentRule.from_document(doc, f"rules[{i}]"))
        except InvalidInput as exc:
            errors += exc.errors
    if errors:
        raise InvalidInput(errors)
    return rules
