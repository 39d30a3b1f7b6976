"""The REST API as a Python object with the service's own methods and results.

``vnic --server URL ...`` uses this in place of :class:`~vnic.manager.service.Service`,
so every command prints the same thing against a running manager as
embedded. Values are validated by the manager (the one validation path);
its errors come back as the same :class:`~vnic.errors.VnicError` kinds, with
the same fields.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from vnic.agent.client import call
from vnic.errors import FieldError, InvalidInput, Unavailable, VnicError
from vnic.manager import views
from vnic.manager.auth import TokenInfo
from vnic.manager.drain import Move
from vnic.manager.hosts import HostInfo
from vnic.manager.results import (
    ApplyResult,
    Explanation,
    LaunchOutcome,
    NetworkInfo,
    NicInfo,
    ProfileInfo,
    RevisionInfo,
    SessionInfo,
    VmChange,
    VmInfo,
    VmRequest,
)
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT, ExecResult, call_timeout
from vnic.model.fields import parse_field
from vnic.model.profile import ProfileSpec, build_profile, values_to_document
from vnic.model.resolve import Effective, Source
from vnic.model.session import AssignmentRule, Policy


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def profile_info(d: Mapping[str, Any]) -> ProfileInfo:
    return ProfileInfo(
        name=d["name"],
        description=d["description"],
        labels=d["labels"],
        revision=d["revision"],
        document=d["document"],
        created_at=_time(d["created_at"]),
        updated_at=_time(d["updated_at"]),
        users=d["used_by"],
    )


def session_info(d: Mapping[str, Any]) -> SessionInfo:
    return SessionInfo(
        name=d["name"],
        network_id=d["network_id"],
        policy=Policy(
            default_profile=d["default_profile"],
            rules=tuple(AssignmentRule.from_document(r) for r in d["rules"]),
            overrides_allowed=d["overrides_allowed"],
        ),
        vms=d["vms"],
        created_at=_time(d["created_at"]),
        owner=d.get("owner"),
        networks=list(d.get("networks") or ["default"]),
        placement=d.get("placement"),
    )


def network_info(d: Mapping[str, Any]) -> NetworkInfo:
    return NetworkInfo(**{k: d[k] for k in NetworkInfo.__dataclass_fields__ if k in d})


def nic_info(d: Mapping[str, Any]) -> NicInfo:
    return NicInfo(**{k: d[k] for k in NicInfo.__dataclass_fields__ if k in d})


def host_info(d: Mapping[str, Any]) -> HostInfo:
    """A host as ``/v1/hosts`` shows it (:func:`vnic.api.hosts.host_json`)."""
    until = d.get("lease_until")
    return HostInfo(
        name=str(d["name"]),
        state=str(d["state"]),
        cordoned=bool(d["cordoned"]),
        labels=dict(d.get("labels") or {}),
        underlay=d.get("underlay"),
        vnics=int((d.get("capacity") or {}).get("vnics", 0)),
        cpus=int((d.get("capacity") or {}).get("cpus", 0)),
        epoch=int(d.get("epoch", 0)),
        lease_until=datetime.fromisoformat(until) if until else None,
        metrics_url=d.get("metrics_url"),
        vms=int(d.get("vms", 0)),
        used=int(d.get("vnics_used", 0)),
    )


def vm_info(d: Mapping[str, Any]) -> VmInfo:
    fields = {k: d[k] for k in VmInfo.__dataclass_fields__ if k in d and k != "nics"}
    return VmInfo(**fields, nics=[nic_info(n) for n in d.get("nics") or []])


def effective(d: Mapping[str, Any]) -> Effective:
    """An :class:`Effective` from its JSON (:meth:`Effective.to_dict`)."""
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for path, f in d["fields"].items():
        sources[path] = Source(f["source"]["layer"], f["source"]["detail"])
        if f["value"] is not None:
            values[path] = parse_field(path, f["value"])
    return Effective(build_profile(values), values, sources, d["revisions"])


def explanation(d: Mapping[str, Any]) -> Explanation:
    first = effective(d["effective"])
    nics = {n["name"]: effective(n["effective"]) for n in d.get("nics") or []}
    return Explanation(vm_info(d["vm"]), first, nics or {"eth0": first})


#: Seconds a call waits out the manager's 429s (requests in flight are bounded there:
#: ``vnic --server URL session up`` launching 8 VMs at once meets it), asking again as
#: each ``Retry-After`` says, before it reports the manager busy.
BUSY_BUDGET = 120.0


@contextlib.contextmanager
def _launching(session: str, vm: str) -> Iterator[None]:
    """A launch request whose answer did not come (time-out, lost connection): the manager
    goes on with it, so the error says what may have happened and where to look."""
    try:
        yield
    except Unavailable as exc:
        raise Unavailable(
            f"{exc}; the manager may still be launching {session}/{vm} (a launch that "
            f"fails there defines nothing): see vnic vm list {session}"
        ) from None


class ManagerClient:
    """A running manager at ``url``, called with an API token."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = call(
            self._http, f"manager {self.url}", method, path, busy_budget=BUSY_BUDGET, **kwargs
        )
        return response.json() if response.content else None

    # profiles

    def apply_profiles(self, specs: Sequence[ProfileSpec]) -> list[ApplyResult]:
        return self.apply_profiles_live(specs)[0]

    def apply_profiles_live(
        self, specs: Sequence[ProfileSpec], driver: object = None
    ) -> tuple[list[ApplyResult], list[VmChange]]:
        """Import; the manager applies new revisions live (``driver``: unused, it has agents)."""
        docs = [s.to_document() for s in specs]
        answer = self._call("POST", "/v1/import/profiles", json=docs)
        results = [ApplyResult(r["name"], r["action"], r["revision"]) for r in answer]
        seen: dict[tuple[str, str, str], VmChange] = {}
        for r in answer:
            for c in r.get("changes", []):
                seen[(c["session"], c["vm"], c.get("nic") or "eth0")] = views.change_from_json(c)
        return results, list(seen.values())

    def update_vm_live(
        self,
        session: str,
        name: str,
        changes: Mapping[str, Any],
        driver: object = None,
        nic: str = "eth0",
    ) -> tuple[Explanation, list[VmChange]]:
        """The VM's PATCH (eth0, as before), or with another ``nic`` that vNIC's; the
        answer is the VM's explanation either way."""
        vm = f"/v1/sessions/{session}/vms/{name}"
        if nic == "eth0":
            answer = self._call("PATCH", vm, json=changes)
            changed = answer.get("changes", [])
        else:
            changed = self._call("PATCH", f"{vm}/nics/{nic}", json=changes).get("changes", [])
            answer = self._call("GET", f"{vm}/explain")
        return explanation(answer), [views.change_from_json(c) for c in changed]

    def list_profiles(self) -> list[ProfileInfo]:
        return [profile_info(p) for p in self._call("GET", "/v1/profiles")]

    def get_profile(self, name: str, revision: int | None = None) -> ProfileInfo:
        params = {"revision": revision} if revision is not None else {}
        return profile_info(self._call("GET", f"/v1/profiles/{name}", params=params))

    def history(self, name: str) -> list[RevisionInfo]:
        return [
            RevisionInfo(r["revision"], _time(r["created_at"]), r["document"])
            for r in self._call("GET", f"/v1/profiles/{name}/revisions")
        ]

    def delete_profile(self, name: str) -> None:
        self._call("DELETE", f"/v1/profiles/{name}")

    def export_profiles(self, names: Sequence[str] = ()) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call(
            "GET", "/v1/export/profiles", params={"name": list(names)}
        )
        return result

    # sessions

    def create_session(
        self,
        name: str,
        *,
        default_profile: str | None = None,
        rules: Sequence[AssignmentRule] = (),
        network_id: int | None = None,
        overrides_allowed: bool = True,
        owner: str | None = None,
        placement: Mapping[str, Any] | None = None,
    ) -> SessionInfo:
        body = {
            "placement": dict(placement) if placement is not None else None,
            "name": name,
            "default_profile": default_profile,
            "rules": [r.to_document() for r in rules],
            "network_id": network_id,
            "overrides_allowed": overrides_allowed,
            "owner": owner,
        }
        return session_info(self._call("POST", "/v1/sessions", json=body))

    def update_session(self, name: str, changes: Mapping[str, Any]) -> SessionInfo:
        body = dict(changes)
        if "rules" in body:
            body["rules"] = [r.to_document() for r in body["rules"]]
        return session_info(self._call("PATCH", f"/v1/sessions/{name}", json=body))

    def list_sessions(self) -> list[SessionInfo]:
        return [session_info(s) for s in self._call("GET", "/v1/sessions")]

    def get_session(self, name: str) -> SessionInfo:
        return session_info(self._call("GET", f"/v1/sessions/{name}"))

    def delete_session(self, name: str, *, force: bool = False) -> list[str]:
        vms = list(self.get_session(name).vms)
        self._call("DELETE", f"/v1/sessions/{name}", params={"force": force})
        return vms

    def session_down(self, session: str, driver: object = None) -> list[str]:
        stopped: list[str] = self._call("POST", f"/v1/sessions/{session}/down")
        return stopped

    # networks

    def add_network(
        self,
        session: str,
        name: str,
        *,
        network_id: int | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        default_profile: str | None = None,
    ) -> NetworkInfo:
        body = {
            "name": name,
            "network_id": network_id,
            "ipv4": ipv4,
            "ipv6": ipv6,
            "default_profile": default_profile,
        }
        return network_info(self._call("POST", f"/v1/sessions/{session}/networks", json=body))

    def list_networks(self, session: str) -> list[NetworkInfo]:
        return [network_info(n) for n in self._call("GET", f"/v1/sessions/{session}/networks")]

    def get_network(self, session: str, name: str) -> NetworkInfo:
        return network_info(self._call("GET", f"/v1/sessions/{session}/networks/{name}"))

    def remove_network(self, session: str, name: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session}/networks/{name}")

    def list_nics(self, session: str, vm: str) -> list[NicInfo]:
        return [nic_info(n) for n in self._call("GET", f"/v1/sessions/{session}/vms/{vm}/nics")]

    # Hosts

    def add_host(self, name: str, labels: Mapping[str, str] | None = None) -> tuple[HostInfo, str]:
        doc = self._call("POST", "/v1/hosts", json={"name": name, "labels": dict(labels or {})})
        return host_info(doc), str(doc["token"])

    def list_hosts(self) -> list[HostInfo]:
        return [host_info(h) for h in self._call("GET", "/v1/hosts")]

    def get_host(self, name: str) -> HostInfo:
        return host_info(self._call("GET", f"/v1/hosts/{name}"))

    def remove_host(self, name: str) -> None:
        self._call("DELETE", f"/v1/hosts/{name}")

    def cordon_host(self, name: str, cordoned: bool = True) -> HostInfo:
        action = "cordon" if cordoned else "uncordon"
        return host_info(self._call("POST", f"/v1/hosts/{name}/{action}"))

    def drain_host(self, name: str) -> list[Move]:
        doc = self._call("POST", f"/v1/hosts/{name}/drain")
        return [Move(**m) for m in doc["moves"]]

    # VMs

    def add_vm(self, req: VmRequest) -> Explanation:
        return explanation(
            self._call("POST", f"/v1/sessions/{req.session}/vms", json=_vm_body(req))
        )

    def add_and_launch(
        self,
        req: VmRequest,
        driver: object = None,
        kind: str | None = None,
        *,
        host: str | None = None,
    ) -> Explanation:
        """Define and launch in one request; the manager removes the VM if the launch
        fails (:meth:`vnic.manager.service.Service.add_and_launch`)."""
        body = {**_vm_body(req), "launch": True, "driver": kind, "host": host}
        with _launching(req.session, req.name):
            return explanation(self._call("POST", f"/v1/sessions/{req.session}/vms", json=body))

    def update_vm(self, session: str, name: str, changes: Mapping[str, Any]) -> Explanation:
        return explanation(self._call("PATCH", f"/v1/sessions/{session}/vms/{name}", json=changes))

    def launch_vm(
        self,
        session: str,
        name: str,
        driver: object = None,
        kind: str | None = None,
        *,
        host: str | None = None,
    ) -> Explanation:
        body = {"driver": kind, "host": host} if kind or host else None
        with _launching(session, name):
            return explanation(
                self._call("POST", f"/v1/sessions/{session}/vms/{name}/launch", json=body)
            )

    def launch_many(
        self,
        session: str,
        names: Sequence[str],
        driver_kind: str = "netns",
        workers: int = 2,
        *,
        agents: object = None,
    ) -> list[LaunchOutcome]:
        """Launch ``names`` with ``workers`` requests in flight; every VM is attempted
        (``agents`` is ignored: the manager dispatches to its agents)."""
        if workers < 1:
            raise InvalidInput([FieldError("workers", str(workers), "at least 1")])

        def one(name: str) -> LaunchOutcome:
            start = time.perf_counter()
            try:
                self.launch_vm(session, name, kind=driver_kind)
            except VnicError as exc:
                return LaunchOutcome(name, time.perf_counter() - start, str(exc))
            return LaunchOutcome(name, time.perf_counter() - start)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, names))

    def destroy_vm(self, session: str, name: str, driver: object = None) -> None:
        self._call("POST", f"/v1/sessions/{session}/vms/{name}/destroy")

    def remove_vm(self, session: str, name: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session}/vms/{name}")

    def list_vms(self, session: str) -> list[VmInfo]:
        return [vm_info(v) for v in self._call("GET", f"/v1/sessions/{session}/vms")]

    def explain(self, session: str, name: str) -> Explanation:
        return explanation(self._call("GET", f"/v1/sessions/{session}/vms/{name}/explain"))

    def stats(self, session: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/v1/sessions/{session}/stats")
        return result

    def exec_in_vm(
        self,
        session: str,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float = TIMEOUT_DEFAULT,
        max_output: int = OUTPUT_DEFAULT,
    ) -> ExecResult:
        """Run ``argv`` in the running VM through the manager's agent, output captured,
        killed after ``timeout`` seconds (admins only). The HTTP call waits longer than
        that (:func:`vnic.model.command.call_timeout`; the client's own timeout is for
        calls that run nothing)."""
        body = {"argv": list(argv), "timeout": timeout, "max_output": max_output}
        path = f"/v1/sessions/{session}/vms/{name}/exec"
        answer = self._call("POST", path, json=body, timeout=call_timeout(timeout))
        return ExecResult.from_dict(answer)

    def set_link(self, session: str, name: str, up: bool, nic: str = "eth0") -> None:
        """Set the link of the running QEMU guest's vNIC ``nic`` up or down (admins only)."""
        body = {"up": up, "nic": nic}
        self._call("POST", f"/v1/sessions/{session}/vms/{name}/link", json=body)

    def doctor(self) -> dict[str, Any]:
        """The manager's agent's host report, as ``vnic doctor --json`` prints it."""
        report: dict[str, Any] = self._call("GET", "/v1/doctor")
        return report

    # tokens

    def create_token(self, name: str, role: str) -> tuple[TokenInfo, str]:
        d = self._call("POST", "/v1/tokens", json={"name": name, "role": role})
        return TokenInfo(d["name"], d["role"], _time(d["created_at"])), d["secret"]

    def list_tokens(self) -> list[TokenInfo]:
        return [
            TokenInfo(t["name"], t["role"], _time(t["created_at"]))
            for t in self._call("GET", "/v1/tokens")
        ]

    def revoke_token(self, name: str) -> None:
        self._call("DELETE", f"/v1/tokens/{name}")


class RemoteLive:
    """:class:`vnic.api.live.LiveOps` over HTTP: the same methods, the same JSON."""

    def __init__(self, client: ManagerClient) -> None:
        self._call = client._call

    def adjust(self, session: str, vm: str, source: str, body: Any) -> dict[str, Any]:
        doc = body.model_dump(by_alias=True, exclude_none=True)
        path = f"/v1/sessions/{session}/vms/{vm}/adjustments/{source}"
        return dict(self._call("PUT", path, json=doc))

    def clear(self, session: str, vm: str, source: str, nic: str = "eth0") -> dict[str, Any]:
        path = f"/v1/sessions/{session}/vms/{vm}/adjustments/{source}"
        return dict(self._call("DELETE", path, params={"nic": nic}))

    def adjustments(self, session: str, vm: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/sessions/{session}/vms/{vm}/adjustments"))

    def audit(
        self, session: str | None = None, vm: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        params.update({k: v for k, v in (("session", session), ("vm", vm)) if v is not None})
        return list(self._call("GET", "/v1/audit", params=params))

    def controller(self, session: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/sessions/{session}/controller"))

    def set_controller(self, session: str, doc: Any) -> dict[str, Any]:
        return dict(self._call("PUT", f"/v1/sessions/{session}/controller", json=doc))

    def controller_state(self, session: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/sessions/{session}/controller/state"))

    def start_scenario(self, session: str, doc: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/sessions/{session}/scenarios", json=doc))

    def scenarios(self, session: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/sessions/{session}/scenarios"))

    def scenario(self, session: str, name: str, action: str) -> dict[str, Any]:
        if action == "show":
            found = [s for s in self.scenarios(session) if s["name"] == name]
            if found:
                return dict(found[0])
        return dict(self._call("POST", f"/v1/sessions/{session}/scenarios/{name}/{action}"))


def _vm_body(req: VmRequest) -> dict[str, Any]:
    """The API's body for a new VM (without ``launch``)."""
    return {
        "name": req.name,
        "role": req.role,
        "labels": dict(req.labels),
        "needs": list(req.needs),
        "profile": req.profile,
        "patch": values_to_document(req.patch) if req.patch else None,
        "nics": [
            {
                "network": n.network,
                "profile": n.profile,
                "patch": values_to_document(n.patch) if n.patch else None,
            }
            for n in req.nics
        ]
        or None,
    }
