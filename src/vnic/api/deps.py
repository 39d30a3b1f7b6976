"""The API's caller dependency: who is calling, from the bearer token (or the UI's cookie)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vnic.manager.auth import Principal

if TYPE_CHECKING:
    from vnic.manager.dispatch import Manager

#: The cookie the web UI's login sets (see :mod:`vnic.web`).
TOKEN_COOKIE = "vnic_token"

_bearer = HTTPBearer(auto_error=False, description="An API token: vnic token create")


async def _caller(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    # async: a sync dependency costs a trip through the thread pool on every call;
    # authentication is a cache hit but every few seconds (one short query then).
    manager: Manager = request.app.state.manager
    # The web UI's login keeps the token in an HttpOnly, SameSite=Strict cookie (its
    # pages cannot send headers on EventSource or navigation); a header wins.
    secret = creds.credentials if creds else request.cookies.get(TOKEN_COOKIE)
    return manager.tokens.authenticate(secret)


Caller = Annotated[Principal, Depends(_caller)]
