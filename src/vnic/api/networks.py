"""The API's network and vNIC routes: a session's networks (list, add, read, remove;
admins, as for the session's policy), and a VM's vNICs (list, read with the effective
profile, change one's override live; the VM routes' roles)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from vnic.api import schemas as sc
from vnic.api.common import VmWriter, changes_json
from vnic.api.deps import Caller
from vnic.edge.bodies import StrictJsonRoute
from vnic.errors import NotFound
from vnic.manager import views
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager
from vnic.manager.results import Explanation


def networks_router(manager: Manager, vm_writer: VmWriter) -> APIRouter:
    """``/v1/sessions/{session}/networks`` and ``/v1/sessions/{session}/vms/{vm}/nics``."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["networks"])
    svc = manager.service

    @router.get("/v1/sessions/{session}/networks", response_model=list[sc.NetworkPublic])
    def list_networks(who: Caller, session: str) -> list[dict[str, Any]]:
        return [views.network_json(n) for n in svc.list_networks(session)]

    @router.post(
        "/v1/sessions/{session}/networks", response_model=sc.NetworkPublic, status_code=201
    )
    def add_network(who: Caller, session: str, body: sc.NetworkCreate) -> dict[str, Any]:
        """Add a network (a free network id and derived subnets unless given). Admins:
        network ids are shared by every session, and a default profile is policy."""
        require_admin(who, "adding a network")
        info = svc.add_network(
            session,
            body.name,
            network_id=body.network_id,
            ipv4=body.ipv4,
            ipv6=body.ipv6,
            default_profile=body.default_profile,
        )
        return views.network_json(info)

    @router.get("/v1/sessions/{session}/networks/{name}", response_model=sc.NetworkPublic)
    def get_network(who: Caller, session: str, name: str) -> dict[str, Any]:
        return views.network_json(svc.get_network(session, name))

    @router.delete("/v1/sessions/{session}/networks/{name}", status_code=204)
    def remove_network(who: Caller, session: str, name: str) -> Response:
        """Remove a network no vNIC uses (those that do are named); never ``default``."""
        require_admin(who, "removing a network")
        svc.remove_network(session, name)
        return Response(status_code=204)

    @router.get("/v1/sessions/{session}/vms/{vm}/nics", response_model=list[sc.NicPublic])
    def list_nics(who: Caller, session: str, vm: str) -> list[dict[str, Any]]:
        return [views.nic_json(n) for n in svc.get_vm(session, vm).nics]

    @router.get("/v1/sessions/{session}/vms/{vm}/nics/{nic}", response_model=sc.NicExplained)
    def get_nic(who: Caller, session: str, vm: str, nic: str) -> dict[str, Any]:
        """The vNIC with its effective profile and the layer of every field."""
        return _nic_explained(svc.explain(session, vm), nic)

    @router.patch("/v1/sessions/{session}/vms/{vm}/nics/{nic}", response_model=sc.NicChanged)
    def patch_nic(
        who: Caller, session: str, vm: str, nic: str, body: sc.NicUpdate
    ) -> dict[str, Any]:
        """Change the vNIC's override (omitted = unchanged; ``patch`` merges, null
        removes); on a running VM, live, touching only what changed."""
        vm_writer(who, session, "overriding a vNIC")
        _nic_explained(svc.explain(session, vm), nic)  # a missing vNIC: 404, nothing written
        changes: dict[str, Any] = {k: getattr(body, k) for k in body.model_fields_set}
        result, applied = svc.update_vm_live(session, vm, changes, manager.agent, nic=nic)
        return {**_nic_explained(result, nic), "changes": changes_json(applied)}

    return router


def _nic_explained(e: Explanation, nic: str) -> dict[str, Any]:
    for item in views.explain_json(e)["nics"]:
        if item["name"] == nic:
            return dict(item)
    raise NotFound(f"vNIC of VM {e.vm.session}/{e.vm.name}", nic, [n.name for n in e.vm.nics])
