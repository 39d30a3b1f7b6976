"""The API's caller dependency: who is calling, from the bearer token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vnic.manager.auth import Principal

if TYPE_CHECKING:
    from vnic.manager.dispatch import Manager

_bearer = HTTPBearer(auto_error=False, description="An API token: vnic token create")


async def _caller(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    # async: a sync dependency costs a trip through the thread pool on every call;
    # authentication is a cache hit but every few seconds (one short query then).
    manager: Manager = request.app.state.manager
    return manager.tokens.authenticate(creds.credentials if creds else None)


Caller = Annotated[Principal, Depends(_caller)]
