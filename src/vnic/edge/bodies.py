"""Strict JSON request bodies for the manager's API.

FastAPI reads a JSON body with plain ``json.loads``, which keeps the last of a key
given twice and raises ``RecursionError`` (a plain-text 500) on 10 000 ``[``.
:class:`StrictJsonRoute` parses the body first with :func:`vnic.model.loading.loads_json`
and hands FastAPI the result (Starlette's ``Request.json()`` returns what it finds
cached), so every route of the app gets duplicate keys, ``NaN`` and deep nesting
refused with the documented 422 body, field ``body``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from vnic.errors import InvalidInput
from vnic.model.loading import DocumentError, loads_json


def _is_json(request: Request) -> bool:
    """Whether FastAPI would read this body as JSON (no content type, or ``*/json``,
    ``*/*+json``)."""
    kind = request.headers.get("content-type")
    if not kind:
        return True
    media = kind.partition(";")[0].strip().lower()
    return media.startswith("application/") and (media.endswith("/json") or media.endswith("+json"))


class StrictJsonRoute(APIRoute):
    """An ``APIRoute`` whose JSON body is parsed strictly before FastAPI sees it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler  # FastAPI reads no body here (the YAML import reads its own)

        async def strict(request: Request) -> Response:
            body = await request.body()
            if body and _is_json(request):
                try:
                    request._json = loads_json(body)
                except DocumentError as exc:
                    raise InvalidInput.one(
                        "body", "(request body)", f"valid JSON ({exc})"
                    ) from None
            return await handler(request)

        return strict
