"""The API's VM routes: list, define (and launch), read, change, remove, launch, destroy,
explain, a command run in a VM and a guest's link (admins only), and a session's live
counters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from vnic.api import schemas as sc
from vnic.api.common import VmWriter, changes_json
from vnic.api.deps import Caller
from vnic.edge.bodies import StrictJsonRoute
from vnic.errors import FieldError, InvalidInput
from vnic.manager import views
from vnic.manager.auth import require_admin
from vnic.manager.dispatch import Manager
from vnic.manager.results import VmRequest
from vnic.model.network import NicSpec
from vnic.model.profile import document_to_values


def vms_router(manager: Manager, vm_writer: VmWriter) -> APIRouter:
    """The ``/v1/sessions/{session}/vms`` routes and ``/v1/sessions/{session}/stats``;
    ``vm_writer`` checks who may change a session's VMs."""
    router = APIRouter(route_class=StrictJsonRoute, tags=["vms"])
    svc = manager.service

    @router.get("/v1/sessions/{session}/vms", response_model=list[sc.VmPublic])
    def list_vms(who: Caller, session: str) -> list[dict[str, Any]]:
        return [views.vm_json(v) for v in svc.list_vms(session)]

    @router.post(
        "/v1/sessions/{session}/vms",
        response_model=sc.ExplanationPublic,
        status_code=201,
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
            nics=[
                NicSpec(n.network, n.profile, _patch_values(n.patch, f"nics[{i}].patch"))
                for i, n in enumerate(body.nics or [])
            ],
        )
        if body.launch:
            result = svc.add_and_launch(req, manager.agent, body.driver, host=body.host)
        else:
            result = svc.add_vm(req)
        return views.explain_json(result)

    @router.get("/v1/sessions/{session}/vms/{vm}", response_model=sc.VmPublic)
    def get_vm(who: Caller, session: str, vm: str) -> dict[str, Any]:
        return views.vm_json(svc.get_vm(session, vm))

    @router.patch("/v1/sessions/{session}/vms/{vm}", response_model=sc.ExplanationChanged)
    def patch_vm(who: Caller, session: str, vm: str, body: sc.VmUpdate) -> dict[str, Any]:
        """Change facts or override (omitted = unchanged; ``patch`` merges, null removes);
        a running VM is reconfigured on its host."""
        vm_writer(who, session, "overriding a VM")
        changes: dict[str, Any] = {k: getattr(body, k) for k in body.model_fields_set}
        result, applied = svc.update_vm_live(session, vm, changes, manager.agent)
        return {**views.explain_json(result), "changes": changes_json(applied)}

    @router.delete("/v1/sessions/{session}/vms/{vm}", status_code=204)
    def delete_vm(who: Caller, session: str, vm: str) -> Response:
        """Stop the VM if it runs, then remove its definition and release its MAC."""
        vm_writer(who, session, "removing a VM")
        if svc.get_vm(session, vm).state == "running":
            svc.destroy_vm(session, vm, manager.agent)
        svc.remove_vm(session, vm)
        return Response(status_code=204)

    @router.post(
        "/v1/sessions/{session}/vms/{vm}/launch",
        response_model=sc.ExplanationPublic,
    )
    def launch_vm(
        who: Caller, session: str, vm: str, body: sc.VmLaunch | None = None
    ) -> dict[str, Any]:
        """Launch a defined VM, with the agent's default driver or the one named."""
        vm_writer(who, session, "launching a VM")
        kind = body.driver if body is not None else None
        host = body.host if body is not None else None
        return views.explain_json(svc.launch_vm(session, vm, manager.agent, kind, host=host))

    @router.post("/v1/sessions/{session}/vms/{vm}/destroy", response_model=sc.VmPublic)
    def destroy_vm(who: Caller, session: str, vm: str) -> dict[str, Any]:
        """Stop the VM and remove its network; the definition and MAC stay."""
        vm_writer(who, session, "destroying a VM")
        svc.destroy_vm(session, vm, manager.agent)
        return views.vm_json(svc.get_vm(session, vm))

    @router.get(
        "/v1/sessions/{session}/vms/{vm}/explain",
        response_model=sc.ExplanationPublic,
    )
    def explain_vm(who: Caller, session: str, vm: str) -> dict[str, Any]:
        """The effective profile and, for every field, the layer it came from."""
        return views.explain_json(svc.explain(session, vm))

    @router.post("/v1/sessions/{session}/vms/{vm}/exec", response_model=sc.ExecResultPublic)
    def exec_in_vm(who: Caller, session: str, vm: str, body: sc.VmExec) -> dict[str, Any]:
        """Run a command in a running VM, without a terminal; its stdout and stderr come
        back when it ends (each cut at ``max_output`` bytes), and it is killed after
        ``timeout`` seconds (``timed_out``, ``returncode`` null). Admins only: a command
        in a VM reaches whatever the VM reaches. Holds a write slot while it runs."""
        require_admin(who, "running a command in a VM")
        result = manager.exec_in_vm(
            session, vm, body.argv, timeout=body.timeout, max_output=body.max_output
        )
        return result.to_dict()

    @router.post("/v1/sessions/{session}/vms/{vm}/link", status_code=204)
    def set_link(who: Caller, session: str, vm: str, body: sc.VmLink) -> Response:
        """Set a running QEMU guest's NIC link up or down (QMP ``set_link``: the guest
        sees its carrier go). Admins only; a VM of another driver is refused (422)."""
        require_admin(who, "setting a VM's link")
        manager.set_link(session, vm, body.up, body.nic)
        return Response(status_code=204)

    @router.get("/v1/sessions/{session}/stats", response_model=list[dict[str, Any]])
    def session_stats(who: Caller, session: str) -> list[dict[str, Any]]:
        """Live per-vNIC counters and rates of the session's running VMs (``vnic top``)."""
        svc.get_session(session)
        return manager.agent.stats(session)

    return router


def _patch_values(doc: Any, path: str = "patch") -> dict[str, Any] | None:
    if doc is None:
        return None
    errors: list[FieldError] = []
    values = document_to_values(doc, errors)
    if errors:
        raise InvalidInput([e.under(path) for e in errors])
    return values or None
