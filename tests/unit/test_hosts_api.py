"""The host routes through the app: ``/v1/hosts`` (admins write), Prometheus service
discovery, and ``/v1/agent/*`` with a host token; then the agent's own HTTP source
(``vnic.agent.upstream.HttpSource``) against the real app served by uvicorn on
127.0.0.1, so both sides of the contract are the code that runs."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import update

from tests.unit.api_fixtures import RATE_DOC, Api, make_api
from vnic.agent.upstream import (
    Fenced,
    HostInfo,
    HttpSource,
    Relist,
    VmStatus,
    error_doc,
)
from vnic.agent.wire import request_to_wire
from vnic.api.app import create_app
from vnic.errors import InvalidInput, Unauthenticated
from vnic.manager import changelog
from vnic.store.models import FleetStateRow

INFO = HostInfo("hv1", "10.250.0.11", 8, 2, {"rack": "a"}, "http://10.250.0.11:8472/metrics")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def add_host(api: Api, name: str = "hv1", **labels: str) -> str:
    r = api.call("admin", "POST", "/v1/hosts", json={"name": name, "labels": labels})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def as_host(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(api: Api, token: str, name: str = "hv1", **extra: Any) -> dict[str, Any]:
    body = {**INFO.to_wire(), "host": name, **extra}
    r = api.client.post("/v1/agent/register", json=body, headers=as_host(token))
    assert r.status_code == 200, r.text
    return dict(r.json())


def setup_session(api: Api) -> None:
    assert api.call("admin", "POST", "/v1/profiles", json=RATE_DOC).status_code == 201
    body = {"name": "lab1", "default_profile": "campus", "owner": "alice"}
    assert api.call("admin", "POST", "/v1/sessions", json=body).status_code == 201


# ----------------------------------------------------------------------------- /v1/hosts


def test_only_admins_write_hosts_and_the_token_is_in_the_add_answer_only(api: Api) -> None:
    for who in ("reader", "alice"):
        r = api.call(who, "POST", "/v1/hosts", json={"name": "hv1"})
        assert r.status_code == 403, r.text
    r = api.call("admin", "POST", "/v1/hosts", json={"name": "hv1", "labels": {"rack": "a"}})
    assert r.status_code == 201
    doc = r.json()
    assert doc["token"].startswith("vnich_")
    assert (doc["name"], doc["state"], doc["labels"], doc["epoch"]) == (
        "hv1",
        "new",
        {"rack": "a"},
        0,
    )
    listed = api.call("reader", "GET", "/v1/hosts").json()
    assert [h["name"] for h in listed] == ["hv1"] and "token" not in listed[0]
    assert "token" not in api.call("reader", "GET", "/v1/hosts/hv1").json()
    for method, path in (
        ("POST", "/v1/hosts/hv1/cordon"),
        ("POST", "/v1/hosts/hv1/uncordon"),
        ("DELETE", "/v1/hosts/hv1"),
    ):
        assert api.call("reader", method, path).status_code == 403
    assert api.call("admin", "POST", "/v1/hosts/hv1/cordon").json()["cordoned"] is True
    assert api.call("admin", "POST", "/v1/hosts/hv1/uncordon").json()["cordoned"] is False
    assert api.call("admin", "DELETE", "/v1/hosts/hv1").status_code == 204
    r = api.call("reader", "GET", "/v1/hosts/hv1")
    assert r.status_code == 404


def test_a_bad_host_is_refused_naming_the_field(api: Api) -> None:
    r = api.call("admin", "POST", "/v1/hosts", json={"name": "HV_1"})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "name"
    add_host(api)
    r = api.call("admin", "POST", "/v1/hosts", json={"name": "hv1"})
    assert r.status_code == 422 and "not in use" in r.json()["message"]
    r = api.call("admin", "POST", "/v1/hosts", json={"name": "hv2", "extra": 1})
    assert r.status_code == 422
    assert [h["name"] for h in api.call("admin", "GET", "/v1/hosts").json()] == ["hv1"]


def test_host_tokens_and_api_tokens_open_only_their_own_routes(api: Api) -> None:
    token = add_host(api)
    # An API token, even an admin's, is no host token.
    r = api.call("admin", "POST", "/v1/agent/register", json=INFO.to_wire())
    assert r.status_code == 401
    assert api.client.get("/v1/agent/desired").status_code == 401  # no token at all
    # A host token is no API token.
    assert api.client.get("/v1/hosts", headers=as_host(token)).status_code == 401
    r = api.client.post("/v1/hosts", json={"name": "hv2"}, headers=as_host(token))
    assert r.status_code == 401
    assert api.client.get("/v1/agent/desired", headers=as_host(token)).status_code == 200


def test_register_as_another_host_is_refused_naming_host(api: Api) -> None:
    token = add_host(api)
    add_host(api, "hv2")
    body = {**INFO.to_wire(), "host": "hv2"}
    r = api.client.post("/v1/agent/register", json=body, headers=as_host(token))
    assert r.status_code == 422
    (f,) = r.json()["fields"]
    assert f["field"] == "host" and "hv1" in f["expected"]
    assert api.call("admin", "GET", "/v1/hosts/hv2").json()["epoch"] == 0
    r = api.client.post(
        "/v1/agent/register",
        json={**INFO.to_wire(), "capacity": {"vnics": 0, "cpus": 2}},
        headers=as_host(token),
    )
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "capacity.vnics"


def test_the_watch_refuses_a_negative_revision_and_answers_relist_and_stale(api: Api) -> None:
    token = add_host(api)
    reg = register(api, token)
    assert (reg["host"], reg["epoch"], reg["revision"]) == ("hv1", 1, 0)
    h = as_host(token)
    r = api.client.get("/v1/agent/changes", params={"after": -1}, headers=h)
    assert r.status_code == 422 and "after" in r.text
    r = api.client.get("/v1/agent/changes", params={"after": 0, "wait": 31}, headers=h)
    assert r.status_code == 422 and "wait" in r.text
    assert api.client.get("/v1/agent/changes", params={"after": 0}, headers=h).json() == {
        "revision": 0,
        "changes": [],
    }
    with api.manager.service.db.transaction() as s:
        s.execute(update(FleetStateRow).values(floor=5, revision=5))  # as after a prune
    r = api.client.get("/v1/agent/changes", params={"after": 3}, headers=h)
    assert r.status_code == 410 and r.json()["relist"] is True
    r = api.client.post("/v1/agent/lease", json={"epoch": 7}, headers=h)
    assert r.status_code == 409 and r.json()["stale"] is True
    r = api.client.post("/v1/agent/status", json={"epoch": 7, "results": []}, headers=h)
    assert r.status_code == 409 and r.json()["stale"] is True
    r = api.client.post("/v1/agent/lease", json={"epoch": 1}, headers=h)
    assert r.status_code == 200 and r.json()["epoch"] == 1


def test_status_reports_are_bounded_and_checked_by_field(api: Api) -> None:
    token = add_host(api)
    epoch = register(api, token)["epoch"]
    h = as_host(token)
    many = [{"session": "s", "vm": f"v{i}", "revision": 1} for i in range(1001)]
    r = api.client.post("/v1/agent/status", json={"epoch": epoch, "results": many}, headers=h)
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "results"
    for bad, path in (
        ({"vm": "a", "revision": 1}, "results[0].session"),
        ({"session": "s", "vm": "a", "revision": -1}, "results[0].revision"),
        ({"session": "s", "vm": "a", "revision": 1, "error": "boom"}, "results[0].error"),
        ({"session": "s", "vm": "a", "revision": 1, "changes": "x"}, "results[0].changes"),
    ):
        r = api.client.post("/v1/agent/status", json={"epoch": epoch, "results": [bad]}, headers=h)
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == path, r.text
    ok = {"session": "s", "vm": "nope", "revision": 1}
    r = api.client.post("/v1/agent/status", json={"epoch": epoch, "results": [ok]}, headers=h)
    assert r.json() == {"stored": 0}  # no such VM here


def test_prometheus_service_discovery_document(api: Api) -> None:
    token = add_host(api, "hv1", rack="a")
    add_host(api, "hv2")  # never registers: not listed
    register(api, token, metrics_url="http://10.0.0.1:8472/metrics")
    r = api.call("reader", "GET", "/v1/prometheus/targets")
    assert r.status_code == 200
    assert r.json() == [
        {
            "targets": ["10.0.0.1:8472"],
            "labels": {"host": "hv1", "__metrics_path__": "/metrics", "label_rack": "a"},
        }
    ]


# ----------------------------------------------------------------------------- HttpSource


@pytest.fixture
def served(api: Api) -> Iterator[str]:
    """The same app served by uvicorn on 127.0.0.1 (a port of its own); its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(api.manager)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(400):  # readiness: uvicorn's own flag
        if server.started:
            started.set()
            break
        started.wait(0.05)
    assert started.is_set()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result or exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_the_agent_source_and_the_manager_agree_on_the_contract(api: Api, served: str) -> None:
    svc = api.manager.service
    token = add_host(api)
    setup_session(api)
    src = HttpSource(served, token, timeout=10)
    try:
        reg = src.register(INFO)
        assert (reg.host, reg.epoch, reg.lease_seconds, reg.revision) == (
            "hv1",
            1,
            svc.lease_seconds,
            0,
        )
        assert src.renew(reg.epoch) == svc.lease_seconds
        snap = src.snapshot()
        assert (snap.revision, snap.vms, snap.invalid, snap.epoch) == (0, [], {}, 1)

        # A launch waits for the agent's report: the agent watches, applies, reports.
        svc.add_vm(_vm("lab1", "a"))
        launch, result = in_thread(lambda: svc.launch_vm("lab1", "a", api.manager.agent))
        revision, changes = src.changes(snap.revision, wait=20)
        (change,) = changes
        assert (revision, change.revision, change.key, change.error) == (1, 1, ("lab1", "a"), None)
        assert change.desired is not None and change.desired.driver == "netns"
        _, _, ((_, _, desired),), _ = svc.host_snapshot("hv1")
        assert desired is not None
        assert change.desired.request == desired[1]  # the wire round trip loses nothing
        assert request_to_wire(change.desired.request) == request_to_wire(desired[1])
        src.report(reg.epoch, [VmStatus("lab1", "a", change.revision, None, ["eth0: up"])])
        launch.join(30)
        assert not launch.is_alive()
        (explained,) = result
        assert not isinstance(explained, BaseException), explained
        assert (explained.vm.state, explained.vm.host) == ("running", "hv1")
        assert svc.vm_status("lab1", "a").changes == ["eth0: up"]  # type: ignore[union-attr]

        snap = src.snapshot()
        assert snap.revision == 1 and [vm.key for vm in snap.vms] == [("lab1", "a")]
        assert snap.vms[0].request == desired[1]
        assert src.changes(revision, wait=0) == (revision, [])

        # An error the agent reports is the launch's error, field by field.
        svc.add_vm(_vm("lab1", "b"))
        launch, result = in_thread(lambda: svc.launch_vm("lab1", "b", api.manager.agent))
        revision, (change,) = src.changes(revision, wait=20)
        refused = InvalidInput.one("egress.delay", "5ms", "a kernel with netem")
        src.report(reg.epoch, [VmStatus("lab1", "b", change.revision, error_doc(refused))])
        launch.join(30)
        (raised,) = result
        assert isinstance(raised, InvalidInput) and raised.paths == ["egress.delay"]
        assert svc.get_vm("lab1", "b").state == "defined"
        revision, (stop,) = src.changes(revision, wait=20)
        assert (stop.key, stop.desired, stop.error) == (("lab1", "b"), None, None)

        # A stop is desired None.
        stopping, _ = in_thread(lambda: svc.destroy_vm("lab1", "a", api.manager.agent))
        revision, (stop,) = src.changes(revision, wait=20)
        assert (stop.key, stop.desired) == (("lab1", "a"), None)
        src.report(reg.epoch, [VmStatus("lab1", "a", stop.revision)])
        stopping.join(30)
        assert not stopping.is_alive()
        assert src.snapshot().vms == []

        # Fencing: a new registration makes the old epoch stale everywhere.
        again = src.register(INFO)
        assert again.epoch == 2
        with pytest.raises(Fenced):
            src.renew(reg.epoch)
        with pytest.raises(Fenced):
            src.report(reg.epoch, [VmStatus("lab1", "a", revision)])
        assert src.renew(again.epoch) == svc.lease_seconds

        # Relist once the log no longer holds the revision asked for.
        with svc.db.transaction() as s:
            changelog.prune(s, keep=1)
        with pytest.raises(Relist):
            src.changes(0, wait=0)
    finally:
        src.close()
    wrong = HttpSource(served, token + "x")
    try:
        with pytest.raises(Unauthenticated):
            wrong.snapshot()
    finally:
        wrong.close()


def _vm(session: str, name: str) -> Any:
    from vnic.manager.results import VmRequest

    return VmRequest(session, name)


def test_a_malformed_error_report_is_kept_to_what_can_be_raised() -> None:
    from vnic.api.hosts import _report
    from vnic.errors import VnicError, error_from_body

    doc = {
        "session": "s",
        "vm": "a",
        "revision": 1,
        "error": {"kind": "invalid", "message": "bad", "fields": [{"path": "x"}, 3, "y"]},
    }
    body = _report(doc, "results[0]").error
    assert body == {"error": "error", "message": "bad", "fields": []}
    raised = error_from_body(dict(body))  # what the waiting launch raises
    assert isinstance(raised, VnicError) and str(raised) == "bad"
    doc["error"] = {"kind": "invalid", "message": "m", "fields": 7}
    assert _report(doc, "results[0]").error["fields"] == []  # type: ignore[index]
    good = {"field": "egress.rate", "value": 5, "expected": "a rate"}
    doc["error"] = {"kind": "invalid", "message": "m", "fields": [good]}
    body = _report(doc, "results[0]").error
    assert body is not None and body["fields"] == [
        {"field": "egress.rate", "value": "5", "expected": "a rate"}
    ]
    raised = error_from_body(dict(body))
    assert isinstance(raised, InvalidInput) and raised.paths == ["egress.rate"]


def test_the_agent_flags_take_what_the_manager_takes(tmp_path: Path) -> None:
    """``vnic agent --manager`` checks its host's name and labels by the manager's rules:
    one the manager would refuse at registration is refused at the flag."""
    from vnic.cli.follow_flags import follow_flags

    token = tmp_path / "token"
    token.write_text("vnich_x\n")

    def flags(host: str, *labels: str) -> Any:
        return follow_flags(
            manager="http://127.0.0.1:1",
            token_file=token,
            host=host,
            underlay="10.0.0.1",
            vnics=None,
            cpus=None,
            labels=list(labels),
            ca=None,
            metrics_listen=None,
        )

    assert flags("hv-1", "rack=a", "zone.x=eu/b:2").labels == {"rack": "a", "zone.x": "eu/b:2"}
    assert flags("hv1").manager == ("http://127.0.0.1:1",)
    replicas = follow_flags(
        "https://10.0.0.1:8470, https://10.0.0.2:8470",
        token,
        "hv1",
        "10.0.0.1",
        None,
        None,
        [],
        None,
        None,
    )
    assert replicas.manager == ("https://10.0.0.1:8470", "https://10.0.0.2:8470")
    with pytest.raises(InvalidInput) as err:
        follow_flags("https://a,ftp://b", token, "hv1", "10.0.0.1", None, None, [], None, None)
    assert err.value.paths == ["--manager"] and "ftp://b" in str(err.value)
    for host, labels, option in (
        ("HV1", (), "--host"),
        ("hv.1", (), "--host"),
        ("h" * 33, (), "--host"),
        ("hv1", ("Rack=a",), "--label"),
        ("hv1", ("k8s/role=x",), "--label"),
        ("hv1", tuple(f"k{i}=v" for i in range(17)), "--label"),
    ):
        with pytest.raises(InvalidInput) as err:
            flags(host, *labels)
        assert err.value.paths == [option], (host, labels)
