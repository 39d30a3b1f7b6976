"""The API's host routes: hosts for admins (``/v1/hosts``), Prometheus service discovery
(``/v1/prometheus/targets``), and the endpoints agents dial out to (``/v1/agent/*``,
with a host token: the token names the host, so no path does).

An agent's calls: register (raises the epoch, starts the lease), renew the lease, take
a snapshot of its host's desired state, watch the changes after a revision (a long
poll, at most :data:`~vnic.manager.changelog.WAIT_MAX` seconds, two at a time per
host), and report what applying them did. Stale epochs are 409 with ``stale``, a
revision older than the log 410 with ``relist``. See ``docs/hosts.md``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field

from vnic.agent.wire import request_to_wire
from vnic.api.deps import Caller
from vnic.api.schemas import Document, _Strict
from vnic.edge.bodies import StrictJsonRoute
from vnic.errors import Busy, InvalidInput
from vnic.manager.auth import require_admin
from vnic.manager.changelog import CHANGES_MAX, WAIT_MAX, StatusReport
from vnic.manager.dispatch import Manager
from vnic.manager.hosts import Desired
from vnic.manager.views import host_json

_bearer = HTTPBearer(auto_error=False, description="A host token: vnic host add")
#: Long polls one host may hold at once (an agent needs one).
WATCHES_PER_HOST = 2
#: Status results one report may carry.
RESULTS_MAX = 1000


def _agent_host(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The host whose token the call carries (401 otherwise)."""
    manager: Manager = request.app.state.manager
    return manager.service.host_of_token(creds.credentials if creds else None)


#: The calling agent's host.
Host = Annotated[str, Depends(_agent_host)]


class HostCreate(_Strict):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class Capacity(_Strict):
    vnics: int
    cpus: int


class RegisterBody(_Strict):
    host: str
    underlay: str
    capacity: Capacity
    labels: dict[str, str] = Field(default_factory=dict)
    metrics_url: str | None = None


class LeaseBody(_Strict):
    epoch: int


class StatusBody(_Strict):
    epoch: int
    results: list[dict[str, Any]]


def hosts_router(manager: Manager) -> APIRouter:
    """``/v1/hosts``, ``/v1/prometheus/targets`` and ``/v1/agent/*``."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["hosts"])
    svc = manager.service
    watching: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    @router.get("/v1/hosts")
    def list_hosts(who: Caller) -> list[dict[str, Any]]:
        return [host_json(h) for h in svc.list_hosts()]

    @router.post("/v1/hosts", status_code=201)
    def add_host(who: Caller, body: HostCreate) -> dict[str, Any]:
        """Add a host; the answer carries its token, shown only here (admins)."""
        require_admin(who, "adding a host")
        info, token = svc.add_host(body.name, body.labels)
        return {**host_json(info), "token": token}

    @router.get("/v1/hosts/{name}")
    def get_host(who: Caller, name: str) -> dict[str, Any]:
        return host_json(svc.get_host(name))

    @router.delete("/v1/hosts/{name}", status_code=204)
    def remove_host(who: Caller, name: str) -> Response:
        require_admin(who, "removing a host")
        svc.remove_host(name)
        return Response(status_code=204)

    @router.post("/v1/hosts/{name}/cordon")
    def cordon(who: Caller, name: str) -> dict[str, Any]:
        require_admin(who, "cordoning a host")
        return host_json(svc.cordon_host(name, True))

    @router.post("/v1/hosts/{name}/uncordon")
    def uncordon(who: Caller, name: str) -> dict[str, Any]:
        require_admin(who, "uncordoning a host")
        return host_json(svc.cordon_host(name, False))

    @router.post("/v1/hosts/{name}/drain")
    def drain(who: Caller, name: str) -> dict[str, Any]:
        """Cordon the host and relaunch its VMs on others (same MACs and addresses)."""
        require_admin(who, "draining a host")
        moves = svc.drain_host(name)
        return {"moves": [m.__dict__ for m in moves]}

    @router.get("/v1/prometheus/targets")
    def prometheus_targets(who: Caller) -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery (``http_sd_configs``): every ready host's
        metrics endpoint with a ``host`` label."""
        return svc.prometheus_targets()

    @router.post("/v1/agent/register")
    def register(host: Host, body: RegisterBody) -> dict[str, Any]:
        if body.host != host:
            raise InvalidInput.one("host", body.host, f"this token's host, {host}")
        reg = svc.register_host(
            host,
            underlay=body.underlay,
            vnics=body.capacity.vnics,
            cpus=body.capacity.cpus,
            labels=body.labels,
            metrics_url=body.metrics_url,
        )
        return {
            "host": reg.host,
            "epoch": reg.epoch,
            "lease_seconds": reg.lease_seconds,
            "revision": reg.revision,
        }

    @router.post("/v1/agent/lease")
    def lease(host: Host, body: LeaseBody) -> dict[str, Any]:
        return {"epoch": body.epoch, "lease_seconds": svc.renew_lease(host, body.epoch)}

    @router.get("/v1/agent/desired")
    def desired(host: Host) -> dict[str, Any]:
        revision, epoch, vms, overlays = svc.host_snapshot(host)
        return {
            "revision": revision,
            "epoch": epoch,
            "vms": [
                {"session": s, "vm": v, **_desired_json(d)} for s, v, d in vms if d is not None
            ],
            "overlays": overlays,
        }

    @router.get("/v1/agent/changes")
    def changes(
        host: Host,
        after: Annotated[int, Query(ge=0)],
        wait: Annotated[float, Query(ge=0, le=WAIT_MAX)] = 0.0,
    ) -> dict[str, Any]:
        with lock:
            if watching[host] >= WATCHES_PER_HOST:
                raise Busy(f"host {host} already holds {WATCHES_PER_HOST} watches")
            watching[host] += 1
        try:
            revision, found = svc.host_changes(host, after, wait)
        finally:
            with lock:
                watching[host] -= 1
        return {
            "revision": revision,
            "changes": [
                {"revision": rev, "session": s, "vm": v, "overlays": docs}
                if docs is not None
                else {
                    "revision": rev,
                    "session": s,
                    "vm": v,
                    "desired": _desired_json(d) if d is not None else None,
                }
                for rev, s, v, d, docs in found[:CHANGES_MAX]
            ],
        }

    @router.post("/v1/agent/status")
    def status(host: Host, body: StatusBody) -> dict[str, Any]:
        if len(body.results) > RESULTS_MAX:
            raise InvalidInput.one("results", len(body.results), f"at most {RESULTS_MAX} results")
        reports = [_report(r, f"results[{i}]") for i, r in enumerate(body.results)]
        return {"stored": svc.report_status(host, body.epoch, reports)}

    return router


def _desired_json(d: Desired) -> Document:
    assert d is not None
    kind, request = d
    return {"driver": kind, "request": request_to_wire(request)}


def _report(doc: dict[str, Any], path: str) -> StatusReport:
    """One status result: ``session``, ``vm``, ``revision``, ``error`` (the agent's
    ``{"kind", "message", "fields"}``, stored as an API error body), ``changes``."""
    try:
        session, vm, revision = doc["session"], doc["vm"], doc["revision"]
    except KeyError as exc:
        raise InvalidInput.one(f"{path}.{exc.args[0]}", None, "a value") from None
    if not isinstance(session, str) or not isinstance(vm, str):
        raise InvalidInput.one(f"{path}.vm", vm, "session and VM names")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise InvalidInput.one(f"{path}.revision", revision, "a revision of at least 0")
    error = doc.get("error")
    body = None
    if error is not None:
        if not isinstance(error, dict):
            raise InvalidInput.one(f"{path}.error", error, "null or an error object")
        body = {
            "error": str(error.get("kind", error.get("error", "error")))[:32],
            "message": str(error.get("message", ""))[:2000],
            "fields": [f for f in (error.get("fields") or [])[:50] if isinstance(f, dict)],
        }
    changes = doc.get("changes") or []
    if not isinstance(changes, list):
        raise InvalidInput.one(f"{path}.changes", changes, "a list of lines")
    lines = [str(c)[:500] for c in changes[:200]]
    return StatusReport(session[:32], vm[:32], revision, body, lines)
