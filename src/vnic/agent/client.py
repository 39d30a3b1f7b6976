"""The manager's side of a remote agent: the agent interface over HTTP.

Errors come back as the agent raised them (same kind, same message, same
fields), so the manager reports a remote failure exactly like a local one.
An agent that does not answer is :class:`~vnic.errors.Unavailable` (503).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from vnic.agent.hostlock import HostLock
from vnic.agent.port import AgentPort, DesiredVm, Gate, ReconcileReport, RepairEvent
from vnic.agent.wire import request_from_wire, request_to_wire
from vnic.errors import Unavailable, VnicError, error_from_body
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT, ExecResult, call_timeout
from vnic.model.launch import Capabilities, LaunchRequest


def raise_for_body(response: httpx.Response) -> None:
    """Raise the :class:`VnicError` an error response describes (nothing for a success)."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": "error", "message": response.text or response.reason_phrase}
    raise error_from_body(body)


def call(
    http: httpx.Client,
    what: str,
    method: str,
    path: str,
    *,
    busy_budget: float = 0.0,
    **kwargs: Any,
) -> httpx.Response:
    """One request to a vnic server (``what`` names it in errors): no answer is
    :class:`Unavailable`, an error answer raises the error its body describes.

    ``busy_budget``: seconds in all this call may spend waiting out 429 answers (the
    server refused before doing anything, so asking again is safe), each wait what its
    ``Retry-After`` says (1 s when it says nothing usable); past the budget the 429's
    :class:`~vnic.errors.Busy` is raised."""
    deadline = time.monotonic() + busy_budget
    while True:
        try:
            response = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{what} did not answer: {exc}") from None
        left = deadline - time.monotonic()
        if response.status_code != 429 or left <= 0:
            break
        time.sleep(min(_retry_after(response), left))
    raise_for_body(response)
    return response


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 429 asks the client to wait (its ``Retry-After`` in seconds; 1 if absent
    or unreadable, at most 30)."""
    text = response.headers.get("retry-after", "")
    return min(float(text), 30.0) if text.isascii() and text.isdigit() else 1.0


class AgentClient(AgentPort):
    """A remote agent at ``url`` (``http://host:port``), authenticated by its key: the
    agent port (:class:`~vnic.agent.port.AgentPort`) over HTTP."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 120.0,
        default: str = "netns",
        http: httpx.Client | None = None,
    ) -> None:
        """``http``: a client to use instead of a new one (tests pass an in-process one)."""
        self.url = url.rstrip("/")
        self.default = default
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout)
        self._http.headers["Authorization"] = f"Bearer {key}"
        # The remote agent locks its own host; this covers this process's threads (a
        # reconcile's database read and the agent's pass against this process's launches).
        self._gate = HostLock(None)

    @property
    def kind(self) -> str:
        return self.default

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return call(self._http, f"agent {self.url}", method, path, **kwargs)

    def capabilities(self) -> Capabilities:
        for caps in self.all_capabilities():
            if caps.kind == self.default:
                return caps
        raise Unavailable(f"agent {self.url} has no {self.default} driver")

    def all_capabilities(self) -> list[Capabilities]:
        return [
            Capabilities(
                c["kind"],
                frozenset(c["fields"]),
                dict(c["missing"]),
                int(c.get("max_nics", 1)),
                str(c.get("max_nics_why", "")),
            )
            for c in self._call("GET", "/v1/capabilities").json()
        ]

    def launch(self, request: LaunchRequest, kind: str | None = None) -> None:
        body = {"driver": kind or self.default, "request": request_to_wire(request)}
        self._call("POST", "/v1/vms", json=body)

    def reconfigure(self, request: LaunchRequest) -> list[str]:
        body = {"driver": self.default, "request": request_to_wire(request)}
        answer = self._call("PUT", f"/v1/vms/{request.session}/{request.vm}", json=body).json()
        return [str(line) for line in answer.get("kernel", [])]

    def reconfigure_many(
        self, requests: Sequence[LaunchRequest]
    ) -> dict[tuple[str, str], list[str] | VnicError]:
        body = [{"driver": self.default, "request": request_to_wire(r)} for r in requests]
        out: dict[tuple[str, str], list[str] | VnicError] = {}
        for item in self._call("POST", "/v1/reconfigure", json=body).json():
            key = (item["session"], item["vm"])
            error = item.get("error")
            out[key] = error_from_body(error) if error else [str(x) for x in item["kernel"]]
        return out

    def destroy(self, session: str, vm: str) -> None:
        self._call("DELETE", f"/v1/vms/{session}/{vm}")

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        self._call("DELETE", f"/v1/sessions/{session}", params={"vm": list(vms)})

    def running(self, session: str) -> list[str]:
        return [str(v) for v in self._call("GET", f"/v1/sessions/{session}/running").json()]

    def stats(self, session: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", f"/v1/sessions/{session}/stats").json()
        return data

    def desired(self) -> list[DesiredVm]:
        return [
            DesiredVm(d["driver"], request_from_wire(d["request"]))
            for d in self._call("GET", "/v1/vms").json()
        ]

    def sync(self, vms: Sequence[DesiredVm]) -> ReconcileReport:
        body = [{"driver": v.driver, "request": request_to_wire(v.request)} for v in vms]
        data = self._call("POST", "/v1/sync", json=body).json()
        return ReconcileReport(**data)

    def metrics_text(self) -> str:
        return self._call("GET", "/metrics").text

    def repairs(self, after: int = 0) -> tuple[str, list[RepairEvent]]:
        """The agent's run id and its drift repairs numbered above ``after``."""
        doc = self._call("GET", "/v1/repairs", params={"after": after}).json()
        return str(doc["run"]), [RepairEvent.from_dict(e) for e in doc["events"]]

    def exec(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float = TIMEOUT_DEFAULT,
        max_output: int = OUTPUT_DEFAULT,
    ) -> ExecResult:
        """The agent runs the command (it checks the bounds); this call waits for its
        timeout and a margin more (:func:`vnic.model.command.call_timeout`)."""
        body = {"argv": list(argv), "timeout": timeout, "max_output": max_output}
        path = f"/v1/vms/{session}/{vm}/exec"
        answer = self._call("POST", path, json=body, timeout=call_timeout(timeout)).json()
        return ExecResult.from_dict(answer)

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        self._call("POST", f"/v1/vms/{session}/{vm}/link", json={"up": up, "nic": nic})

    def doctor(self) -> dict[str, Any]:
        report: dict[str, Any] = self._call("GET", "/v1/doctor").json()
        return report

    def gate(self) -> Gate:
        """A readers-writer lock over this process's threads (one per client)."""
        return self._gate

    def close(self) -> None:
        self._http.close()
