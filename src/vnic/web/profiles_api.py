"""Endpoints the web UI's profiles pages need beyond the REST API's.

* ``POST /v1/import/profiles/yaml`` — import profiles from YAML (or JSON) text, read by
  the same code as ``vnic profile apply -f FILE`` (:mod:`vnic.model.documents`) and applied
  like ``POST /v1/import/profiles``: all or nothing, live on running VMs.
* ``GET /v1/export/profiles.yaml`` — the YAML ``vnic profile export`` writes.

Which sessions and VMs use a profile needs no endpoint: ``used_by`` of
``GET /v1/profiles/{name}`` names them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import FastAPI, Query, Request, Response

from vnic.api import schemas as sc
from vnic.api.deps import Caller
from vnic.api.profiles import import_specs
from vnic.errors import InvalidInput
from vnic.manager.auth import require_admin
from vnic.model.documents import documents_from_text, dump_yaml, parse_documents

if TYPE_CHECKING:
    from vnic.manager.dispatch import Manager

#: The largest import the UI may send (a profile is well under a kilobyte).
MAX_IMPORT_BYTES = 1 << 20
_YAML_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/yaml": {"schema": {"type": "string"}}},
        "description": "One profile, a list of them, or several YAML documents (---)",
    }
}


def add_routes(app: FastAPI, manager: Manager) -> None:
    """Register this part's endpoints on the manager's app."""
    svc = manager.service

    @app.post(
        "/v1/import/profiles/yaml",
        response_model=list[sc.ApplyResultPublic],
        tags=["profiles"],
        openapi_extra=_YAML_BODY,
    )
    async def import_yaml(who: Caller, request: Request) -> list[dict[str, Any]]:
        """Create or update profiles from YAML text, as ``vnic profile apply -f``; all or
        nothing, unchanged profiles keep their revision."""
        require_admin(who, "importing profiles")
        raw = await request.body()
        if len(raw) > MAX_IMPORT_BYTES:
            raise InvalidInput.one("file", f"{len(raw)} bytes", f"at most {MAX_IMPORT_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput.one("file", "(binary)", "UTF-8 text") from None
        return await anyio.to_thread.run_sync(_apply, manager, text)

    @app.get(
        "/v1/export/profiles.yaml",
        tags=["profiles"],
        responses={200: {"content": {"application/yaml": {}}, "description": "Profile documents"}},
    )
    def export_yaml(who: Caller, name: Annotated[list[str] | None, Query()] = None) -> Response:
        """Current documents as YAML, as ``vnic profile export`` writes them (all, or those
        named), ready to import again."""
        docs = svc.export_profiles(name or [])
        filename = f"{name[0]}.yaml" if name and len(name) == 1 else "profiles.yaml"
        return Response(
            dump_yaml(docs) if docs else "[]\n",
            media_type="application/yaml",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )


def _apply(manager: Manager, text: str) -> list[dict[str, Any]]:
    return import_specs(manager, parse_documents(documents_from_text(text, "upload")))
