"""The API's token routes: list, create (answering the secret once), revoke; admins only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from vnic.api import schemas as sc
from vnic.api.deps import Caller
from vnic.edge.bodies import StrictJsonRoute
from vnic.manager import views
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager


def tokens_router(manager: Manager) -> APIRouter:
    """The ``/v1/tokens`` routes."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["tokens"])

    @router.get("/v1/tokens", response_model=list[sc.TokenPublic])
    def list_tokens(who: Caller) -> list[dict[str, Any]]:
        require_admin(who, "listing tokens")
        return [views.token_json(t) for t in manager.tokens.list()]

    @router.post("/v1/tokens", response_model=sc.TokenCreated, status_code=201)
    def create_token(who: Caller, body: sc.TokenCreate) -> dict[str, Any]:
        require_admin(who, "creating a token")
        info, secret = manager.tokens.create(body.name, body.role)
        return {**views.token_json(info), "secret": secret}

    @router.delete("/v1/tokens/{name}", status_code=204)
    def revoke_token(who: Caller, name: str) -> Response:
        require_admin(who, "revoking a token")
        manager.tokens.revoke(name)
        return Response(status_code=204)

    return router
