"""The admin web UI, served by ``vnic serve`` at ``/`` (same process, same tokens and roles).

The UI is a small single-page app (``static/``: HTML, CSS and our own JavaScript;
no framework, no CDN, nothing to vendor) over the same REST API as the CLI, so
every change goes through the API's validation and errors come back with the
field, the value and what was expected. What this module adds:

* ``GET /`` — the app;  ``/ui/static/...`` — its assets;
* ``POST /ui/login`` — checks an API token and keeps it in an HttpOnly,
  SameSite=Strict cookie, which the API accepts like a bearer header;
  ``POST /ui/logout`` forgets it;
* ``GET /v1/whoami`` — the caller's name and role (what the UI may show);
* ``GET /v1/profile-fields`` — every profile field with its unit, what it
  expects and its meaning and default (the editor's labels);
* ``GET /v1/sessions/{session}/live`` — server-sent events, one a second:
  every running vNIC's counters and rates, and the session's new audit entries.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from vnic.api.deps import TOKEN_COOKIE, Caller
from vnic.api.live import audit_json
from vnic.errors import InvalidInput, Unauthenticated
from vnic.model.fields import FIELDS

if TYPE_CHECKING:
    from vnic.manager.dispatch import Manager

STATIC = Path(__file__).resolve().parent / "static"
#: Seconds between two live events, unless ``?interval=`` says otherwise (0.2 .. 10).
LIVE_INTERVAL = 1.0
_DEFAULT = re.compile(r"Default: ([^.]+(?:\.\d+[^.]*)?)\.")


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str


def field_catalogue() -> list[dict[str, str]]:
    """Every profile field: path, unit, what it expects, meaning, and its default in words."""
    out = []
    for f in FIELDS.values():
        found = _DEFAULT.search(f.doc)
        out.append(
            {
                "field": f.path,
                "unit": f.unit,
                "expected": f.expected,
                "doc": f.doc,
                "default": found.group(1) if found else "unset (inherited, or none)",
            }
        )
    return out


def add_web_routes(app: FastAPI, manager: Manager) -> None:
    """Mount the UI and its few endpoints on the manager's app."""
    from vnic.web import profiles_api, sessions_api

    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    profiles_api.add_routes(app, manager)
    sessions_api.add_routes(app, manager)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.post("/ui/login", tags=["ui"])
    def login(body: Login, request: Request) -> JSONResponse:
        """Check the token and keep it in a cookie for the UI's requests."""
        secret = body.token.strip()
        if not secret:
            raise InvalidInput.one("token", "", "an API token (vnic token create NAME --role ROLE)")
        try:
            who = manager.tokens.authenticate(secret)
        except Unauthenticated:
            raise InvalidInput.one(
                "token", secret[:9] + "…", "a token this manager issued and has not revoked"
            ) from None
        response = JSONResponse({"name": who.name, "role": who.role})
        response.set_cookie(
            TOKEN_COOKIE,
            secret,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @app.post("/ui/logout", status_code=204, tags=["ui"])
    def logout() -> Response:
        response = Response(status_code=204)
        response.delete_cookie(TOKEN_COOKIE, path="/")
        return response

    @app.get("/v1/whoami", tags=["meta"])
    def whoami(who: Caller) -> dict[str, str]:
        """The calling token's name and role."""
        return {"name": who.name, "role": who.role}

    @app.get("/v1/profile-fields", tags=["profiles"])
    def profile_fields(who: Caller) -> list[dict[str, str]]:
        """Every profile field with its unit, what it expects, its meaning and default."""
        return field_catalogue()

    @app.get(
        "/v1/sessions/{session}/live",
        tags=["sessions"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def live(
        who: Caller, session: str, interval: float = LIVE_INTERVAL, events: int = 0
    ) -> StreamingResponse:
        """Server-sent events: ``{"t", "vnics": [...], "audit": [...]}`` every ``interval``
        seconds (``vnics`` as ``/v1/sessions/{s}/stats``; ``audit``: entries new since the
        previous event). ``events`` > 0 ends the stream after that many (for tests)."""
        if not 0.2 <= interval <= 10:
            raise InvalidInput.one("interval", interval, "seconds from 0.2 to 10")
        await anyio.to_thread.run_sync(manager.service.get_session, session)  # 404 if unknown

        async def stream() -> AsyncIterator[bytes]:
            last_audit = 0
            sent = 0
            yield b"retry: 2000\n\n"
            while True:
                vnics, audit = await anyio.to_thread.run_sync(_snapshot, manager, session)
                fresh = [a for a in audit if a["id"] > last_audit]
                if audit:
                    last_audit = max(last_audit, max(a["id"] for a in audit))
                event = {"t": time.time(), "vnics": vnics, "audit": list(reversed(fresh))}
                yield f"data: {json.dumps(event, default=str)}\n\n".encode()
                sent += 1
                if events and sent >= events:
                    return
                await asyncio.sleep(interval)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _snapshot(manager: Manager, session: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The session's vNIC samples and its newest audit entries (newest first)."""
    vnics = manager.agent.stats(session)
    audit = [audit_json(e) for e in manager.runtime.audit(session, None, 50)]
    return vnics, audit
