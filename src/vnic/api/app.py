"""The manager's REST API (FastAPI): profiles, sessions, VMs, drivers, tokens, metrics.

Handlers are thin: they check the caller's role, call the service (the one
validation path, shared with the CLI) and shape the result with
:mod:`vnic.manager.views`. Every error is a :class:`~vnic.errors.VnicError`
and leaves through one table (:func:`error_response`): status from the error
kind, body ``{error, message, fields: [{field, value, expected}]}``.

Launches, reconfigurations and destroys go to the host agent, in this
process (``vnic serve``) or over HTTP (``vnic serve --agent URL``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, cast

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import vnic
from vnic.api import schemas as sc
from vnic.api.deps import TOKEN_COOKIE, Caller
from vnic.api.live import add_live_routes
from vnic.edge.admission import Admission, LastResort, Limits
from vnic.edge.bodies import StrictJsonRoute
from vnic.edge.errors import ERRORS, error_response
from vnic.edge.guard import guard_manager
from vnic.errors import FieldError, InvalidInput, VnicError, show_value
from vnic.manager import views
from vnic.manager.auth import Principal, require_admin, require_vm_writer
from vnic.manager.dispatch import Manager
from vnic.manager.results import VmChange, VmRequest
from vnic.model.limits import DB_INT_MAX
from vnic.model.profile import ProfileSpec, document_to_values, parse_profile_document
from vnic.model.session import AssignmentRule

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
    svc = manager.service
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

    def vm_writer(who: Principal, session: str, action: str) -> None:
        owner = None if who.is_admin else manager.tokens.session_owner(session)
        require_vm_writer(who, session, owner, action)

    # ------------------------------------------------------------------ health

    @app.get("/v1/health", response_model=sc.Health, tags=["meta"])
    def health() -> dict[str, str]:
        """Liveness; needs no token."""
        return {"status": "ok", "version": vnic.__version__}

    # ------------------------------------------------------------------ profiles

    @app.get("/v1/profiles", response_model=list[sc.ProfilePublic], tags=["profiles"])
    def list_profiles(who: Caller) -> list[dict[str, Any]]:
        return [views.profile_json(p) for p in svc.list_profiles()]

    @app.post("/v1/profiles", response_model=sc.ProfilePublic, status_code=201, tags=["profiles"])
    def create_profile(who: Caller, document: sc.Document) -> dict[str, Any]:
        """Create a profile from its document (409 if the name exists: PATCH changes one)."""
        require_admin(who, "creating a profile")
        spec = parse_profile_document(document)
        svc.apply_profiles([spec], create_only=True)
        return views.profile_json(svc.get_profile(spec.name))

    @app.get("/v1/profiles/{name}", response_model=sc.ProfilePublic, tags=["profiles"])
    def get_profile(
        who: Caller, name: str, revision: Annotated[int | None, Query(ge=1, le=DB_INT_MAX)] = None
    ) -> dict[str, Any]:
        return views.profile_json(svc.get_profile(name, revision))

    @app.patch("/v1/profiles/{name}", response_model=sc.ProfileChanged, tags=["profiles"])
    def patch_profile(who: Caller, name: str, patch: sc.Document) -> dict[str, Any]:
        """Merge ``patch`` into the current document (omitted = unchanged, null = remove);
        a change makes a new revision."""
        require_admin(who, "changing a profile")
        with manager.gate.shared():
            result = svc.update_profile(name, patch, manager.agent)
            changes = svc.reapply(
                manager.agent, source="user", reason=f"profile {name} r{result.revision}"
            )
        return {**views.profile_json(svc.get_profile(name)), "changes": _json(changes)}

    @app.delete("/v1/profiles/{name}", status_code=204, tags=["profiles"])
    def delete_profile(who: Caller, name: str) -> Response:
        require_admin(who, "deleting a profile")
        svc.delete_profile(name)
        return Response(status_code=204)

    @app.get(
        "/v1/profiles/{name}/revisions",
        response_model=list[sc.RevisionPublic],
        tags=["profiles"],
    )
    def profile_revisions(who: Caller, name: str) -> list[dict[str, Any]]:
        return [views.revision_json(r) for r in svc.history(name)]

    @app.post("/v1/import/profiles", response_model=list[sc.ApplyResultPublic], tags=["profiles"])
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

    @app.get("/v1/export/profiles", response_model=list[sc.Document], tags=["profiles"])
    def export_profiles(
        who: Caller, name: Annotated[list[str] | None, Query()] = None
    ) -> list[dict[str, Any]]:
        """Current documents, ready to import again (all profiles, or those named)."""
        return svc.export_profiles(name or [])

    # ------------------------------------------------------------------ sessions

    @app.get("/v1/sessions", response_model=list[sc.SessionPublic], tags=["sessions"])
    def list_sessions(who: Caller) -> list[dict[str, Any]]:
        return [views.session_json(s) for s in svc.list_sessions()]

    @app.post("/v1/sessions", response_model=sc.SessionPublic, status_code=201, tags=["sessions"])
    def create_session(who: Caller, body: sc.SessionCreate) -> dict[str, Any]:
        require_admin(who, "creating a session")
        info = svc.create_session(
            body.name,
            default_profile=body.default_profile,
            rules=_rules(body.rules),
            network_id=body.network_id,
            overrides_allowed=body.overrides_allowed,
            owner=body.owner,
        )
        return views.session_json(info)

    @app.get("/v1/sessions/{name}", response_model=sc.SessionPublic, tags=["sessions"])
    def get_session(who: Caller, name: str) -> dict[str, Any]:
        return views.session_json(svc.get_session(name))

    @app.patch("/v1/sessions/{name}", response_model=sc.SessionChanged, tags=["sessions"])
    def patch_session(who: Caller, name: str, body: sc.SessionUpdate) -> dict[str, Any]:
        """Change the policy or owner; omitted keys stay, null removes a default profile or owner."""
        require_admin(who, "changing a session")
        changes: dict[str, Any] = {k: getattr(body, k) for k in body.model_fields_set}
        if "rules" in changes:
            changes["rules"] = _rules(changes["rules"] or [])
        if changes.get("overrides_allowed", True) is None:
            raise InvalidInput.one("overrides_allowed", None, "true or false")
        with manager.gate.shared():
            info = svc.update_session(name, changes, manager.agent)
            applied = svc.reapply(
                manager.agent, session=name, source="user", reason="session policy"
            )
        return {**views.session_json(info), "changes": _json(applied)}

    @app.delete("/v1/sessions/{name}", status_code=204, tags=["sessions"])
    def delete_session(who: Caller, name: str, force: Annotated[bool, Query()] = False) -> Response:
        """Delete a session; with VMs in it only when ``force`` (which stops and removes them)."""
        require_admin(who, "deleting a session")
        if force or not svc.get_session(name).vms:
            with manager.gate.shared():
                svc.session_down(name, manager.agent)
        svc.delete_session(name, force=force)  # without force and with VMs: InUse, naming them
        return Response(status_code=204)

    @app.post("/v1/sessions/{name}/down", response_model=list[str], tags=["sessions"])
    def session_down(who: Caller, name: str) -> list[str]:
        """Stop every VM of the session and remove its network; returns the VMs stopped."""
        vm_writer(who, name, "stopping a session")
        with manager.gate.shared():
            return svc.session_down(name, manager.agent)

    # ------------------------------------------------------------------ VMs

    @app.get("/v1/sessions/{session}/vms", response_model=list[sc.VmPublic], tags=["vms"])
    def list_vms(who: Caller, session: str) -> list[dict[str, Any]]:
        return [views.vm_json(v) for v in svc.list_vms(session)]

    @app.post(
        "/v1/sessions/{session}/vms",
        response_model=sc.ExplanationPublic,
        status_code=201,
        tags=["vms"],
    )
    def create_vm(who: Caller, session: str, body: sc.VmCreate) -> dict[str, Any]:
        """Define a VM (profile resolved, MAC allocated); with ``launch``, start it too.
        A failed launch defines nothing."""
        vm_writer(who, session, "adding a VM")
        req = VmRequest(
            session=session,
            name=body.name,
            role=body.role,
            labels=body.labels,
            needs=tuple(body.needs),
            profile=body.profile,
            patch=_patch_values(body.patch),
        )
        if body.launch:
            result = svc.add_and_launch(req, manager.agent, body.driver, hold=manager.gate.shared)
        else:
            result = svc.add_vm(req)
        return views.explain_json(result)

    @app.get("/v1/sessions/{session}/vms/{vm}", response_model=sc.VmPublic, tags=["vms"])
    def get_vm(who: Caller, session: str, vm: str) -> dict[str, Any]:
        return views.vm_json(svc.get_vm(session, vm))

    @app.patch(
        "/v1/sessions/{session}/vms/{vm}", response_model=sc.ExplanationChanged, tags=["vms"]
    )
    def patch_vm(who: Caller, session: str, vm: str, body: sc.VmUpdate) -> dict[str, Any]:
        """Change facts or override (omitted = unchanged; ``patch`` merges, null removes);
        a running VM is reconfigured on its host."""
        vm_writer(who, session, "overriding a VM")
        changes: dict[str, Any] = {k: getattr(body, k) for k in body.model_fields_set}
        with manager.gate.shared():
            result, applied = svc.update_vm_live(session, vm, changes, manager.agent)
        return {**views.explain_json(result), "changes": _json(applied)}

    @app.delete("/v1/sessions/{session}/vms/{vm}", status_code=204, tags=["vms"])
    def delete_vm(who: Caller, session: str, vm: str) -> Response:
        """Stop the VM if it runs, then remove its definition and release its MAC."""
        vm_writer(who, session, "removing a VM")
        if svc.get_vm(session, vm).state == "running":
            with manager.gate.shared():
                svc.destroy_vm(session, vm, manager.agent)
        svc.remove_vm(session, vm)
        return Response(status_code=204)

    @app.post(
        "/v1/sessions/{session}/vms/{vm}/launch",
        response_model=sc.ExplanationPublic,
        tags=["vms"],
    )
    def launch_vm(
        who: Caller, session: str, vm: str, body: sc.VmLaunch | None = None
    ) -> dict[str, Any]:
        """Launch a defined VM, with the agent's default driver or the one named."""
        vm_writer(who, session, "launching a VM")
        kind = body.driver if body is not None else None
        with manager.gate.shared():
            return views.explain_json(svc.launch_vm(session, vm, manager.agent, kind))

    @app.post("/v1/sessions/{session}/vms/{vm}/destroy", response_model=sc.VmPublic, tags=["vms"])
    def destroy_vm(who: Caller, session: str, vm: str) -> dict[str, Any]:
        """Stop the VM and remove its network; the definition and MAC stay."""
        vm_writer(who, session, "destroying a VM")
        with manager.gate.shared():
            svc.destroy_vm(session, vm, manager.agent)
        return views.vm_json(svc.get_vm(session, vm))

    @app.get(
        "/v1/sessions/{session}/vms/{vm}/explain",
        response_model=sc.ExplanationPublic,
        tags=["vms"],
    )
    def explain_vm(who: Caller, session: str, vm: str) -> dict[str, Any]:
        """The effective profile and, for every field, the layer it came from."""
        return views.explain_json(svc.explain(session, vm))

    @app.get("/v1/sessions/{session}/stats", response_model=list[dict[str, Any]], tags=["vms"])
    def session_stats(who: Caller, session: str) -> list[dict[str, Any]]:
        """Live per-vNIC counters and rates of the session's running VMs (``vnic top``)."""
        svc.get_session(session)
        return manager.agent.stats(session)

    # ------------------------------------------------------------------ drivers, tokens

    @app.get("/v1/drivers", response_model=list[sc.DriverPublic], tags=["meta"])
    def drivers(who: Caller) -> list[dict[str, Any]]:
        """What each driver on each agent can honour here, and why the rest is missing."""
        return [
            {"agent": manager.agent_name, **caps.to_dict()}
            for caps in manager.agent.all_capabilities()
        ]

    @app.post("/v1/reconcile", response_model=sc.ReconcilePublic, tags=["meta"])
    def reconcile(who: Caller) -> dict[str, Any]:
        """Send the agent the VMs the database says run: it rebuilds missing or drifted
        ones, removes what nobody desires, and reports the drift left. Also done when
        the manager starts; needed after an agent restarted on its own."""
        require_admin(who, "reconciling")
        return manager.reconcile().to_dict()

    @app.get("/v1/tokens", response_model=list[sc.TokenPublic], tags=["tokens"])
    def list_tokens(who: Caller) -> list[dict[str, Any]]:
        require_admin(who, "listing tokens")
        return [views.token_json(t) for t in manager.tokens.list()]

    @app.post("/v1/tokens", response_model=sc.TokenCreated, status_code=201, tags=["tokens"])
    def create_token(who: Caller, body: sc.TokenCreate) -> dict[str, Any]:
        require_admin(who, "creating a token")
        info, secret = manager.tokens.create(body.name, body.role)
        return {**views.token_json(info), "secret": secret}

    @app.delete("/v1/tokens/{name}", status_code=204, tags=["tokens"])
    def revoke_token(who: Caller, name: str) -> Response:
        require_admin(who, "revoking a token")
        manager.tokens.revoke(name)
        return Response(status_code=204)

    add_live_routes(app, manager, vm_writer)
    for extend in extensions:
        extend(app, manager)

    # ------------------------------------------------------------------ metrics

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["meta"],
        responses={200: {"content": {"text/plain": {}}}},
    )
    def metrics(who: Caller) -> PlainTextResponse:
        """Prometheus exposition of every vNIC on the agent (see docs/metrics.md)."""
        return PlainTextResponse(
            manager.agent.metrics_text(), media_type="text/plain; version=0.0.4"
        )

    return app


def import_specs(manager: Manager, specs: Sequence[ProfileSpec]) -> list[dict[str, Any]]:
    """Apply parsed profiles live (all or nothing) and answer, per profile, its result and
    the changes it made on running VMs (the JSON and the YAML import routes)."""
    with manager.gate.shared():
        results, changes = manager.service.apply_profiles_live(specs, manager.agent)
    return [
        {**views.apply_json(r), "changes": _json(c for c in changes if r.name in c.revisions)}
        for r in results
    ]


def _json(changes: Iterable[VmChange]) -> list[dict[str, Any]]:
    return [views.change_json(c) for c in changes]


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


def _patch_values(doc: Any) -> dict[str, Any] | None:
    if doc is None:
        return None
    errors: list[FieldError] = []
    values = document_to_values(doc, errors)
    if errors:
        raise InvalidInput([e.under("patch") for e in errors])
    return values or None
