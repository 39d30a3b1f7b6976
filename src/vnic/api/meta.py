"""The API's routes about the service itself (tag ``meta``): health, the agents' drivers,
the agent's host report (doctor), reconcile, and the Prometheus metrics.

Three routers, as :func:`vnic.api.app.create_app` mounts them at three places:
health first, drivers and reconcile after the resources, metrics last (after
the extensions' routes).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

import vnic
from vnic.api import schemas as sc
from vnic.api.deps import Caller
from vnic.edge.bodies import StrictJsonRoute
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager


def health_router() -> APIRouter:
    """``/v1/health``."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["meta"])

    @router.get("/v1/health", response_model=sc.Health)
    def health() -> dict[str, str]:
        """Liveness; needs no token."""
        return {"status": "ok", "version": vnic.__version__}

    return router


def agents_router(manager: Manager) -> APIRouter:
    """``/v1/drivers``, ``/v1/doctor`` and ``/v1/reconcile``: what the agents can do, and
    bringing them in line with the database."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["meta"])

    @router.get("/v1/drivers", response_model=list[sc.DriverPublic])
    def drivers(who: Caller) -> list[dict[str, Any]]:
        """What each driver on each agent can honour here, and why the rest is missing."""
        return [
            {"agent": manager.agent_name, **caps.to_dict()}
            for caps in manager.agent.all_capabilities()
        ]

    @router.get("/v1/doctor", response_model=dict[str, Any])
    def doctor(who: Caller) -> dict[str, Any]:
        """What the agent's host can do, as ``vnic doctor --json`` prints it: the kernel
        probe, tools missing, the fields each driver honours, the delay engine, what QEMU
        guests run with, and each running vNIC's engine. Admins only (it describes the
        host); it probes the kernel in a throwaway namespace, about a second."""
        require_admin(who, "reading the host's report")
        return manager.doctor()

    @router.post("/v1/reconcile", response_model=sc.ReconcilePublic)
    def reconcile(who: Caller) -> dict[str, Any]:
        """Send the agent the VMs the database says run: it rebuilds missing or drifted
        ones, removes what nobody desires, and reports the drift left. Also done when
        the manager starts; needed after an agent restarted on its own."""
        require_admin(who, "reconciling")
        return manager.reconcile().to_dict()

    return router


def metrics_router(manager: Manager) -> APIRouter:
    """``/metrics``: the Prometheus exposition."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["meta"])

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}},
    )
    def metrics(who: Caller) -> PlainTextResponse:
        """Prometheus exposition of every vNIC on the agent (see docs/metrics.md)."""
        return PlainTextResponse(
            manager.agent.metrics_text(), media_type="text/plain; version=0.0.4"
        )

    return router
