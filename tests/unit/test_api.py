"""REST API, resource by resource: create / read / patch / delete / 404 / 409 / 422 / 403.

Each resource is declared once (:class:`Resource`) and run through the same
shared cases, as NetBox does for its API; resource-specific behaviour
(revisions, PATCH merge, launch dispatch, roles and policy) follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.unit.api_fixtures import RATE_DOC, Api, make_api


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def setup_session(api: Api, owner: str | None = "alice", **extra: Any) -> None:
    """Profile ``campus`` and session ``lab1`` owned by ``owner``."""
    assert api.call("admin", "POST", "/v1/profiles", json=RATE_DOC).status_code == 201
    body = {"name": "lab1", "default_profile": "campus", "owner": owner, **extra}
    r = api.call("admin", "POST", "/v1/sessions", json=body)
    assert r.status_code == 201, r.text


@dataclass
class Resource:
    name: str
    collection: str  # where POST goes
    item: str  # the created object's URL
    create: dict[str, Any]
    patch: dict[str, Any]
    patched: Callable[[dict[str, Any]], bool]  # checks the read-back after PATCH
    bad: dict[str, Any]  # a create body with one bad field
    bad_field: str
    writer: str  # a role allowed to write
    refused: list[str]  # tokens refused on create / patch / delete
    setup: Callable[[Api], None] = lambda api: None
    absent: str = ""
    has_patch: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


RESOURCES = [
    Resource(
        name="profile",
        collection="/v1/profiles",
        item="/v1/profiles/campus",
        create=RATE_DOC,
        patch={"egress": {"rate": "30Mbit"}, "ingress": {"delay": None}},
        patched=lambda d: (
            d["document"]["egress"]["rate"] == "30Mbit"
            and "delay" not in d["document"]["ingress"]
            and d["document"]["ingress"]["rate"] == "50Mbit"
            and d["revision"] == 2
        ),
        bad={**RATE_DOC, "egress": {"rate": "fast"}},
        bad_field="egress.rate",
        writer="admin",
        refused=["alice", "reader"],
        absent="/v1/profiles/nope",
    ),
    Resource(
        name="session",
        collection="/v1/sessions",
        item="/v1/sessions/lab2",
        create={"name": "lab2", "default_profile": "campus", "owner": "alice"},
        patch={"overrides_allowed": False, "owner": None},
        patched=lambda d: (
            d["overrides_allowed"] is False
            and d["owner"] is None
            and d["default_profile"] == "campus"
        ),
        bad={"name": "Bad Name!", "default_profile": "campus"},
        bad_field="name",
        writer="admin",
        refused=["alice", "reader"],
        setup=lambda api: setup_session(api),
        absent="/v1/sessions/nope",
    ),
    Resource(
        name="vm",
        collection="/v1/sessions/lab1/vms",
        item="/v1/sessions/lab1/vms/web",
        create={"name": "web", "role": "server", "labels": {"tier": "front"}},
        patch={"patch": {"egress": {"rate": "5Mbit"}}, "role": None},
        patched=lambda d: (
            d["role"] is None and d["override_patch"] == {"egress": {"rate": "5Mbit"}}
        ),
        bad={"name": "web", "patch": {"egress": {"loss": "150%"}}},
        bad_field="patch.egress.loss",
        writer="alice",
        refused=["bob", "reader"],
        setup=lambda api: setup_session(api),
        absent="/v1/sessions/lab1/vms/nope",
    ),
    Resource(
        name="token",
        collection="/v1/tokens",
        item="/v1/tokens/carol",
        create={"name": "carol", "role": "reader"},
        patch={},
        patched=lambda d: True,
        bad={"name": "carol", "role": "superuser"},
        bad_field="role",
        writer="admin",
        refused=["alice", "reader"],
        absent="/v1/tokens/nope",
        has_patch=False,
    ),
]
IDS = [r.name for r in RESOURCES]


def _read(api: Api, res: Resource) -> dict[str, Any]:
    if res.name == "token":
        found = [t for t in api.call("admin", "GET", "/v1/tokens").json() if t["name"] == "carol"]
        assert len(found) == 1
        return dict(found[0])
    r = api.call("reader", "GET", res.item)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("res", RESOURCES, ids=IDS)
def test_create_read_list(api: Api, res: Resource) -> None:
    res.setup(api)
    r = api.call(res.writer, "POST", res.collection, json=res.create)
    assert r.status_code == 201, r.text
    got = _read(api, res)
    for key in ("name", "role", "default_profile", "owner"):
        if key in res.create and key in got:
            assert got[key] == res.create[key]
    listing = api.call("admin", "GET", res.collection).json()
    assert res.create["name"] in [x["name"] for x in listing]


@pytest.mark.parametrize("res", [r for r in RESOURCES if r.has_patch], ids=lambda r: r.name)
def test_patch_merges(api: Api, res: Resource) -> None:
    res.setup(api)
    assert api.call(res.writer, "POST", res.collection, json=res.create).status_code == 201
    r = api.call(res.writer, "PATCH", res.item, json=res.patch)
    assert r.status_code == 200, r.text
    assert res.patched(_read(api, res)), _read(api, res)


@pytest.mark.parametrize("res", RESOURCES, ids=IDS)
def test_delete_then_404(api: Api, res: Resource) -> None:
    res.setup(api)
    assert api.call(res.writer, "POST", res.collection, json=res.create).status_code == 201
    assert api.call(res.writer, "DELETE", res.item).status_code == 204
    r = api.call("admin", "DELETE", res.item)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


@pytest.mark.parametrize("res", RESOURCES, ids=IDS)
def test_404_names_the_missing_object(api: Api, res: Resource) -> None:
    res.setup(api)
    method = "GET" if res.name != "token" else "DELETE"
    r = api.call("admin", method, res.absent)
    assert r.status_code == 404
    assert "'nope'" in r.json()["message"]


@pytest.mark.parametrize("res", RESOURCES, ids=IDS)
def test_409_on_duplicate_changes_nothing(api: Api, res: Resource) -> None:
    res.setup(api)
    assert api.call(res.writer, "POST", res.collection, json=res.create).status_code == 201
    before = _read(api, res)
    r = api.call(res.writer, "POST", res.collection, json=res.create)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "conflict"
    assert _read(api, res) == before


@pytest.mark.parametrize("res", RESOURCES, ids=IDS)
def test_422_names_field_value_expectation(api: Api, res: Resource) -> None:
    res.setup(api)
    count = len(api.call("admin", "GET", res.collection).json())
    r = api.call(res.writer, "POST", res.collection, json=res.bad)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid"
    problem = next(f for f in body["fields"] if f["field"] == res.bad_field)
    assert problem["value"] and problem["expected"]
    assert len(api.call("admin", "GET", res.collection).json()) == count  # nothing was made


@pytest.mark.parametrize("res", RESOURCES, ids=IDS)
def test_403_for_roles_that_do_not_belong(api: Api, res: Resource) -> None:
    res.setup(api)
    for who in res.refused:
        r = api.call(who, "POST", res.collection, json=res.create)
        assert r.status_code == 403, (who, r.text)
        assert r.json()["error"] == "forbidden"
    assert api.call(res.writer, "POST", res.collection, json=res.create).status_code == 201
    before = _read(api, res)
    for who in res.refused:
        if res.has_patch:
            assert api.call(who, "PATCH", res.item, json=res.patch).status_code == 403
        assert api.call(who, "DELETE", res.item).status_code == 403
    assert _read(api, res) == before


def test_401_without_or_with_unknown_token(api: Api) -> None:
    assert api.client.get("/v1/profiles").status_code == 401
    r = api.client.get("/v1/profiles", headers={"Authorization": "Bearer vnic_forged"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert api.client.get("/v1/health").status_code == 200


def test_revoked_token_is_refused(api: Api) -> None:
    assert api.call("reader", "GET", "/v1/profiles").status_code == 200
    assert api.call("admin", "DELETE", "/v1/tokens/reader").status_code == 204
    assert api.call("reader", "GET", "/v1/profiles").status_code == 401


def test_tokens_are_stored_hashed(api: Api) -> None:
    from sqlalchemy import select

    from vnic.store.models import TokenRow

    with api.manager.service.db.transaction() as s:
        stored = {r.secret_hash for r in s.scalars(select(TokenRow))}
    assert not set(api.secrets.values()) & stored
    assert all(len(h) == 64 for h in stored)


# ----------------------------------------------------------------------------- profiles


def test_profile_revisions_and_export_import(api: Api) -> None:
    api.call("admin", "POST", "/v1/profiles", json=RATE_DOC)
    api.call("admin", "PATCH", "/v1/profiles/campus", json={"egress": {"rate": "25Mbit"}})
    revs = api.call("reader", "GET", "/v1/profiles/campus/revisions").json()
    assert [r["revision"] for r in revs] == [1, 2]
    old = api.call("reader", "GET", "/v1/profiles/campus", params={"revision": 1}).json()
    assert old["document"]["egress"]["rate"] == "20Mbit"
    exported = api.call("reader", "GET", "/v1/export/profiles").json()
    assert exported[0]["egress"]["rate"] == "25Mbit"
    exported[0]["description"] = "changed"
    again = api.call("admin", "POST", "/v1/import/profiles", json=exported).json()
    assert again == [{"name": "campus", "action": "updated", "revision": 3, "changes": []}]
    same = api.call("admin", "POST", "/v1/import/profiles", json=exported).json()
    assert same[0]["action"] == "unchanged"


def test_import_is_all_or_nothing(api: Api) -> None:
    docs = [RATE_DOC, {"name": "broken", "ingress": {"rate": "-1"}}]
    r = api.call("admin", "POST", "/v1/import/profiles", json=docs)
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"].startswith("[1].ingress.rate")
    assert api.call("admin", "GET", "/v1/profiles").json() == []


def test_profile_in_use_cannot_be_deleted(api: Api) -> None:
    setup_session(api)
    r = api.call("admin", "DELETE", "/v1/profiles/campus")
    assert r.status_code == 409
    assert r.json()["error"] == "in_use"
    assert "lab1" in r.json()["message"]


def test_profile_cannot_be_renamed_by_patch(api: Api) -> None:
    api.call("admin", "POST", "/v1/profiles", json=RATE_DOC)
    r = api.call("admin", "PATCH", "/v1/profiles/campus", json={"name": "other"})
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "name"


# ----------------------------------------------------------------------------- sessions and VMs


def test_session_with_unknown_default_profile_is_422(api: Api) -> None:
    r = api.call("admin", "POST", "/v1/sessions", json={"name": "s1", "default_profile": "nope"})
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "default_profile"


def test_session_rules_replace_and_explain_reports_provenance(api: Api) -> None:
    setup_session(api)
    fast = {"name": "fast", "egress": {"rate": "1Gbit"}}
    api.call("admin", "POST", "/v1/profiles", json=fast)
    r = api.call(
        "admin",
        "PATCH",
        "/v1/sessions/lab1",
        json={"rules": [{"profile": "fast", "role": "server"}]},
    )
    assert r.status_code == 200, r.text
    api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "web", "role": "server"})
    e = api.call("reader", "GET", "/v1/sessions/lab1/vms/web/explain").json()
    rate = e["effective"]["fields"]["egress.rate"]
    assert rate["value"] == "1Gbit"
    assert rate["source"]["layer"] == "rule"
    assert e["effective"]["fields"]["ingress.rate"]["source"]["layer"] == "session-default"


def test_launch_dispatches_to_agent_and_destroy_removes(api: Api) -> None:
    setup_session(api)
    r = api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "web", "launch": True})
    assert r.status_code == 201, r.text
    assert r.json()["vm"]["state"] == "running"
    request = api.driver.vms[("lab1", "web")]
    assert str(request.profile.egress.rate) == "20Mbit"
    assert request.revisions == {"campus": 1}
    assert [d.request.vm for d in api.manager.agent.desired()] == ["web"]  # type: ignore[attr-defined]
    r = api.call("alice", "POST", "/v1/sessions/lab1/vms/web/destroy")
    assert r.json()["state"] == "defined"
    assert api.driver.vms == {}


def test_patch_of_running_vm_reconfigures_it(api: Api) -> None:
    setup_session(api)
    api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "web", "launch": True})
    r = api.call(
        "alice", "PATCH", "/v1/sessions/lab1/vms/web", json={"patch": {"egress": {"rate": "7Mbit"}}}
    )
    assert r.status_code == 200, r.text
    assert str(api.driver.vms[("lab1", "web")].profile.egress.rate) == "7Mbit"
    # null removes the field from the override: back to the session default
    api.call(
        "alice", "PATCH", "/v1/sessions/lab1/vms/web", json={"patch": {"egress": {"rate": None}}}
    )
    assert str(api.driver.vms[("lab1", "web")].profile.egress.rate) == "20Mbit"


def test_failed_launch_defines_nothing(api: Api) -> None:
    setup_session(api)
    r = api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "doomed", "launch": True})
    assert r.status_code == 500
    assert r.json()["error"] == "dataplane"
    assert api.call("reader", "GET", "/v1/sessions/lab1/vms").json() == []
    assert api.manager.agent.desired() == []  # type: ignore[attr-defined]


def test_owner_is_held_to_the_session_policy(api: Api) -> None:
    setup_session(api, overrides_allowed=False)
    r = api.call(
        "alice",
        "POST",
        "/v1/sessions/lab1/vms",
        json={"name": "web", "patch": {"egress": {"rate": "1Gbit"}}},
    )
    assert r.status_code == 422
    assert "does not allow overrides" in r.json()["fields"][0]["expected"]
    assert (
        api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "web"}).status_code == 201
    )
    r = api.call("alice", "PATCH", "/v1/sessions/lab1/vms/web", json={"profile": "campus"})
    assert r.status_code == 422


def test_owner_acts_only_in_own_sessions(api: Api) -> None:
    setup_session(api, owner="alice")
    api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "web"})
    for method, path in (
        ("POST", "/v1/sessions/lab1/vms/web/launch"),
        ("POST", "/v1/sessions/lab1/vms/web/destroy"),
        ("POST", "/v1/sessions/lab1/down"),
        ("DELETE", "/v1/sessions/lab1/vms/web"),
        ("PATCH", "/v1/sessions/lab1"),
        ("DELETE", "/v1/sessions/lab1"),
    ):
        kwargs: dict[str, Any] = {"json": {}} if method == "PATCH" else {}
        r = api.call("bob", method, path, **kwargs)
        assert r.status_code == 403, (method, path, r.text)
    assert api.call("reader", "POST", "/v1/sessions/lab1/vms/web/launch").status_code == 403
    assert api.call("alice", "POST", "/v1/sessions/lab1/vms/web/launch").status_code == 200


def test_reader_sees_metrics_and_drivers(api: Api) -> None:
    r = api.call("reader", "GET", "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "vnic_vnics" in r.text
    drivers = api.call("reader", "GET", "/v1/drivers").json()
    assert drivers[0]["agent"] == "local" and drivers[0]["kind"] == "fake"
    assert "egress.rate" in drivers[0]["fields"]
    assert drivers[0]["max_nics"] == 8 and drivers[0]["max_nics_why"]
    assert api.client.get("/metrics").status_code == 401


def test_session_delete_with_vms_needs_force(api: Api) -> None:
    setup_session(api)
    api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": "web", "launch": True})
    r = api.call("admin", "DELETE", "/v1/sessions/lab1")
    assert r.status_code == 409
    assert ("lab1", "web") in api.driver.vms
    assert (
        api.call("admin", "DELETE", "/v1/sessions/lab1", params={"force": True}).status_code == 204
    )
    assert api.driver.vms == {}


def test_shape_errors_name_the_field(api: Api) -> None:
    setup_session(api)
    r = api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": 5, "labels": "x"})
    assert r.status_code == 422
    fields = {f["field"] for f in r.json()["fields"]}
    assert {"name", "labels"} <= fields
    r = api.call("admin", "POST", "/v1/sessions", json={"name": "s", "unknown": 1})
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "unknown"


def test_reconcile_rebuilds_lost_vms_and_reaps_orphans(api: Api) -> None:
    setup_session(api)
    for vm in ("web", "db"):
        api.call("alice", "POST", "/v1/sessions/lab1/vms", json={"name": vm, "launch": True})
    lost = api.driver.vms.pop(("lab1", "web"))  # the host lost it (reboot, hand-made damage)
    api.driver.vms[("lab1", "ghost")] = lost  # and has a VM nobody desires
    api.driver.vms[("other", "x")] = lost  # in a session this agent never built: not its own
    assert api.call("alice", "POST", "/v1/reconcile").status_code == 403
    report = api.call("admin", "POST", "/v1/reconcile").json()
    assert report["reapplied"] == {"lab1/web": ["VM lab1/web is not running"]}
    assert report["removed"] == ["lab1/ghost"]
    assert report["drift"] == {} and report["failed"] == {}
    assert set(api.driver.vms) == {("lab1", "web"), ("lab1", "db"), ("other", "x")}
