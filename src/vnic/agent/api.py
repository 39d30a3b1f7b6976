"""The agent's HTTP API, for a manager on another process or host (``vnic agent``).

Every route but ``/v1/health`` (``/openapi.json``, ``/docs`` and ``/redoc`` too)
needs the agent key (``Authorization: Bearer KEY``), a secret file only root can
read on the agent's host (:func:`agent_key`). Prometheus scrapes ``/metrics`` with the same key.
Errors leave as the manager's do: status from the error kind, body
``{error, message, fields}``, so the client can raise the same error again.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import vnic
from vnic.agent.core import Agent
from vnic.agent.port import DesiredVm
from vnic.agent.wire import request_from_wire, request_to_wire
from vnic.edge.errors import ERRORS, error_response
from vnic.edge.guard import guard_agent
from vnic.errors import FieldError, InvalidInput, Unauthenticated, VnicError, show_value
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT
from vnic.model.launch import PRIMARY_NIC
from vnic.model.network import parse_nic_name


def agent_key(path: Path) -> str:
    """The agent key at ``path``, created (mode 0600) with 256 random bits if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def _desired(doc: Any, path: str) -> DesiredVm:
    if not isinstance(doc, dict):
        raise InvalidInput.one(path or "body", doc, "an object with driver and request")
    try:
        request = request_from_wire(doc.get("request"))
    except InvalidInput as exc:
        raise exc.under(f"{path}.request" if path else "request") from None
    return DesiredVm(str(doc.get("driver") or "netns"), request)


def _fields(doc: Any, required: set[str], optional: set[str]) -> dict[str, Any]:
    """``doc`` as an object with the keys ``required`` and some of ``optional``, no other."""
    if not isinstance(doc, dict):
        raise InvalidInput.one("body", doc, "an object")
    known = required | optional
    problems = [
        FieldError(str(k), show_value(doc[k]), "no such field: " + ", ".join(sorted(known)))
        for k in doc
        if k not in known
    ]
    problems += [FieldError(k, "missing", "a value") for k in sorted(required - doc.keys())]
    if problems:
        raise InvalidInput(problems)
    return doc


def _outcome(result: list[str] | VnicError) -> dict[str, Any]:
    if isinstance(result, VnicError):
        return {"error": result.to_dict()}
    return {"kernel": result}


_bearer = HTTPBearer(auto_error=False, description="The agent key")


def _check_key(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    given = creds.credentials if creds else ""
    if not hmac.compare_digest(given.encode(), str(request.app.state.key).encode()):
        raise Unauthenticated("this agent needs its key: 'Authorization: Bearer KEY'")


Auth = Annotated[None, Depends(_check_key)]


def create_agent_app(agent: Agent, key: str) -> FastAPI:
    # The documents describe what a key holder may do: behind the key like the rest.
    app = FastAPI(
        title="vnic agent",
        version=vnic.__version__,
        responses=ERRORS,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.key = key
    guard_agent(app)  # Host, same-origin writes, content types, body size, headers

    @app.exception_handler(VnicError)
    async def _vnic_error(_: Request, exc: VnicError) -> JSONResponse:
        return error_response(exc)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": vnic.__version__}

    @app.get("/v1/capabilities")
    def capabilities(_: Auth) -> list[dict[str, object]]:
        return [c.to_dict() for c in agent.all_capabilities()]

    @app.get("/v1/vms")
    def desired(_: Auth) -> list[dict[str, Any]]:
        return [
            {"driver": d.driver, "request": request_to_wire(d.request)} for d in agent.desired()
        ]

    @app.post("/v1/vms", status_code=201)
    def launch(_: Auth, body: Annotated[dict[str, Any], Body()]) -> dict[str, str]:
        vm = _desired(body, "")
        agent.launch(vm.request, vm.driver)
        return {"session": vm.request.session, "vm": vm.request.vm}

    @app.put("/v1/vms/{session}/{vm}")
    def reconfigure(
        _: Auth, session: str, vm: str, body: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        wanted = _desired(body, "")
        if (wanted.request.session, wanted.request.vm) != (session, vm):
            raise InvalidInput.one(
                "request.vm", wanted.request.vm, f"{session}/{vm}, as the URL says"
            )
        return {"session": session, "vm": vm, "kernel": agent.reconfigure(wanted.request)}

    @app.post("/v1/reconfigure")
    def reconfigure_many(
        _: Auth, body: Annotated[list[dict[str, Any]], Body()]
    ) -> list[dict[str, Any]]:
        """Live changes of many VMs; each item says what changed in the kernel or why not."""
        requests = [_desired(doc, f"[{i}]").request for i, doc in enumerate(body)]
        outcomes = agent.reconfigure_many(requests)
        return [{"session": s, "vm": v, **_outcome(result)} for (s, v), result in outcomes.items()]

    @app.delete("/v1/vms/{session}/{vm}", status_code=204)
    def destroy(_: Auth, session: str, vm: str) -> Response:
        agent.destroy(session, vm)
        return Response(status_code=204)

    @app.delete("/v1/sessions/{session}", status_code=204)
    def teardown(
        _: Auth, session: str, vm: Annotated[list[str] | None, Query()] = None
    ) -> Response:
        agent.teardown_session(session, vm or [])
        return Response(status_code=204)

    @app.get("/v1/sessions/{session}/running")
    def running(_: Auth, session: str) -> list[str]:
        return agent.running(session)

    @app.get("/v1/sessions/{session}/stats")
    def stats(_: Auth, session: str) -> list[dict[str, Any]]:
        return agent.stats(session)

    @app.post("/v1/vms/{session}/{vm}/exec")
    def exec_in_vm(
        _: Auth, session: str, vm: str, body: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        """Run ``argv`` in the VM, output captured; killed after ``timeout`` seconds (the
        bounds: :mod:`vnic.model.command`). A plain ``def``: it runs in the thread pool,
        for at most its timeout."""
        doc = _fields(body, {"argv"}, {"timeout", "max_output"})
        timeout = doc.get("timeout", TIMEOUT_DEFAULT)
        max_output = doc.get("max_output", OUTPUT_DEFAULT)
        result = agent.exec(session, vm, doc["argv"], timeout=timeout, max_output=max_output)
        return result.to_dict()

    @app.post("/v1/vms/{session}/{vm}/link", status_code=204)
    def set_link(
        _: Auth, session: str, vm: str, body: Annotated[dict[str, Any], Body()]
    ) -> Response:
        """Set a QEMU guest's vNIC link up or down (``{"up": true, "nic": "eth1"}``; ``nic``
        default eth0)."""
        doc = _fields(body, {"up"}, {"nic"})
        up, nic = doc["up"], doc.get("nic", PRIMARY_NIC)
        if not isinstance(up, bool):
            raise InvalidInput.one("up", up, "true or false")
        agent.set_link(session, vm, up, parse_nic_name(nic))
        return Response(status_code=204)

    @app.get("/v1/doctor")
    def doctor(_: Auth) -> dict[str, Any]:
        """What this host can do (``vnic doctor --json``'s report)."""
        return agent.doctor()

    @app.post("/v1/sync")
    def sync(_: Auth, body: Annotated[list[dict[str, Any]], Body()]) -> dict[str, Any]:
        vms = [_desired(doc, f"[{i}]") for i, doc in enumerate(body)]
        return agent.sync(vms).to_dict()

    @app.post("/v1/reconcile")
    def reconcile(_: Auth) -> dict[str, Any]:
        return agent.reconcile().to_dict()

    @app.get("/v1/repairs")
    def repairs(_: Auth, after: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        """The agent's latest drift repairs numbered above ``after``, oldest first, and
        the id of this agent's run (numbers start again when it changes); no events
        with repair off."""
        run, events = agent.repairs(after)
        return {"run": run, "events": [e.to_dict() for e in events]}

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Auth) -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    def docs(_: Auth) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="vnic agent")

    @app.get("/redoc", include_in_schema=False)
    def redoc(_: Auth) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="vnic agent")

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(_: Auth) -> PlainTextResponse:
        return PlainTextResponse(agent.metrics_text(), media_type="text/plain; version=0.0.4")

    return app
