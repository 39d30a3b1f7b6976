"""The manager's REST API (FastAPI): profiles, sessions, VMs, drivers, tokens, metrics.

This module composes the app: middleware, error handlers, and one router per
resource (:mod:`.profiles`, :mod:`.sessions`, :mod:`.vms`, :mod:`.tokens`,
:mod:`.meta`; :mod:`.live` for adjustments, the controller and scenarios).
Handlers are thin: they check the caller's role, call the service (the one
validation path, shared with the CLI) and shape the result with
:mod:`vnic.manager.views`. Every error is a :class:`~vnic.errors.VnicError`
and leaves through one table (:func:`error_response`): status from the error
kind, body ``{error, message, fields: [{field, value, expected}]}``.

Launches, reconfigurations and destroys go to the host agent, in this
process (``vnic serve``) or over HTTP (``vnic serve --agent URL``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import vnic
from vnic.api.common import vm_writer
from vnic.api.deps import TOKEN_COOKIE
from vnic.api.hosts import hosts_router
from vnic.api.live import live_router
from vnic.api.meta import agents_router, health_router, metrics_router
from vnic.api.networks import networks_router
from vnic.api.profiles import profiles_router
from vnic.api.sessions import sessions_router
from vnic.api.tokens import tokens_router
from vnic.api.vms import vms_router
from vnic.edge.admission import Admission, LastResort, Limits
from vnic.edge.bodies import StrictJsonRoute
from vnic.edge.errors import ERRORS, error_response
from vnic.edge.guard import guard_manager
from vnic.errors import FieldError, InvalidInput, VnicError, show_value
from vnic.manager.dispatch import Manager

# ----------------------------------------------------------------------------- errors


def _request_problem(err: dict[str, Any]) -> FieldError:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    path = ""
    for part in loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    value = err.get("input")
    shown = "missing" if err.get("type") == "missing" else show_value(value)
    return FieldError(path, shown, str(err.get("msg", "a valid value")).lower())


# ----------------------------------------------------------------------------- app


def create_app(
    manager: Manager,
    limits: Limits | None = None,
    extensions: Sequence[Callable[[FastAPI, Manager], None]] = (),
) -> FastAPI:
    """The API on ``manager``; ``limits`` bound the requests in flight (defaults:
    :class:`~vnic.edge.admission.Limits`). Each of ``extensions`` adds its routes
    (the UI's, from :mod:`vnic.web`) before the metrics route: the API does not
    import the UI, the composition root (:mod:`vnic.server`) brings them together."""
    app = FastAPI(
        title="vnic manager",
        version=vnic.__version__,
        description="Virtual NICs with named network profiles: profiles, sessions, VMs, metrics.",
        responses=ERRORS,
    )
    app.router.route_class = StrictJsonRoute  # duplicate keys, deep nesting refused
    app.state.manager = manager
    # Middleware, the last added outermost: the guard first sees every request (its
    # refusals take no slot, its body bound holds for admission's read of a write's
    # body, every answer gets its headers), then an unexpected error anywhere leaves
    # as JSON, then admission bounds what is in flight.
    app.add_middleware(Admission, limits=limits or Limits())
    url = manager.service.db.engine.url
    db_name = url.database if url.get_backend_name() == "sqlite" else None
    db_name = db_name or url.render_as_string(hide_password=True)
    app.add_middleware(LastResort, database=db_name)
    guard_manager(app, TOKEN_COOKIE)  # Host, same-origin writes, content types, body size, headers

    @app.exception_handler(VnicError)
    async def _vnic_error(_: Request, exc: VnicError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _shape_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_request_problem(cast(dict[str, Any], e)) for e in exc.errors()]
        return error_response(InvalidInput(problems or [FieldError("", "?", "a valid request")]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse(
            {"error": kind, "message": str(exc.detail)}, status_code=exc.status_code
        )

    # The routers in the order they match: the API's own routes, then the extensions'
    # (the UI's catch-all among them), then the metrics.
    writer = vm_writer(manager)
    app.include_router(health_router())
    app.include_router(profiles_router(manager))
    app.include_router(sessions_router(manager, writer))
    app.include_router(vms_router(manager, writer))
    app.include_router(networks_router(manager, writer))
    app.include_router(agents_router(manager))
    app.include_router(hosts_router(manager))
    app.include_router(tokens_router(manager))
    app.include_router(live_router(manager, writer))
    for extend in extensions:
        extend(app, manager)
    app.include_router(metrics_router(manager))
    return app
