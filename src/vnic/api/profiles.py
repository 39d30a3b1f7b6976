"""The API's profile routes: list, create, read, change, delete, revisions, import, export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from vnic.api import schemas as sc
from vnic.api.common import changes_json
from vnic.api.deps import Caller
from vnic.edge.bodies import StrictJsonRoute
from vnic.errors import InvalidInput
from vnic.manager import views
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager
from vnic.model.limits import DB_INT_MAX
from vnic.model.profile import ProfileSpec, parse_profile_document


def profiles_router(manager: Manager) -> APIRouter:
    """The ``/v1/profiles`` routes and the import and export of profiles."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["profiles"])
    svc = manager.service

    @router.get("/v1/profiles", response_model=list[sc.ProfilePublic])
    def list_profiles(who: Caller) -> list[dict[str, Any]]:
        return [views.profile_json(p) for p in svc.list_profiles()]

    @router.post("/v1/profiles", response_model=sc.ProfilePublic, status_code=201)
    def create_profile(who: Caller, document: sc.Document) -> dict[str, Any]:
        """Create a profile from its document (409 if the name exists: PATCH changes one)."""
        require_admin(who, "creating a profile")
        spec = parse_profile_document(document)
        svc.apply_profiles([spec], create_only=True)
        return views.profile_json(svc.get_profile(spec.name))

    @router.get("/v1/profiles/{name}", response_model=sc.ProfilePublic)
    def get_profile(
        who: Caller, name: str, revision: Annotated[int | None, Query(ge=1, le=DB_INT_MAX)] = None
    ) -> dict[str, Any]:
        return views.profile_json(svc.get_profile(name, revision))

    @router.patch("/v1/profiles/{name}", response_model=sc.ProfileChanged)
    def patch_profile(who: Caller, name: str, patch: sc.Document) -> dict[str, Any]:
        """Merge ``patch`` into the current document (omitted = unchanged, null = remove);
        a change makes a new revision."""
        require_admin(who, "changing a profile")
        result = svc.update_profile(name, patch, manager.agent)
        changes = svc.reapply(
            manager.agent, source="user", reason=f"profile {name} r{result.revision}"
        )
        return {**views.profile_json(svc.get_profile(name)), "changes": changes_json(changes)}

    @router.delete("/v1/profiles/{name}", status_code=204)
    def delete_profile(who: Caller, name: str) -> Response:
        require_admin(who, "deleting a profile")
        svc.delete_profile(name)
        return Response(status_code=204)

    @router.get(
        "/v1/profiles/{name}/revisions",
        response_model=list[sc.RevisionPublic],
    )
    def profile_revisions(who: Caller, name: str) -> list[dict[str, Any]]:
        return [views.revision_json(r) for r in svc.history(name)]

    @router.post("/v1/import/profiles", response_model=list[sc.ApplyResultPublic])
    def import_profiles(who: Caller, documents: list[sc.Document]) -> list[dict[str, Any]]:
        """Create or update many profiles at once; all or nothing."""
        require_admin(who, "importing profiles")
        specs, errors = [], []
        for i, doc in enumerate(documents):
            try:
                specs.append(parse_profile_document(doc))
            except InvalidInput as exc:
                errors += [e.under(f"[{i}]") for e in exc.errors]
        if errors:
            raise InvalidInput(errors)
        return import_specs(manager, specs)

    @router.get("/v1/export/profiles", response_model=list[sc.Document])
    def export_profiles(
        who: Caller, name: Annotated[list[str] | None, Query()] = None
    ) -> list[dict[str, Any]]:
        """Current documents, ready to import again (all profiles, or those named)."""
        return svc.export_profiles(name or [])

    return router


def import_specs(manager: Manager, specs: Sequence[ProfileSpec]) -> list[dict[str, Any]]:
    """Apply parsed profiles live (all or nothing) and answer, per profile, its result and
    the changes it made on running VMs (the JSON and the YAML import routes)."""
    results, changes = manager.service.apply_profiles_live(specs, manager.agent)
    return [
        {
            **views.apply_json(r),
            "changes": changes_json(c for c in changes if r.name in c.revisions),
        }
        for r in results
    ]
