"""The REST API's networks (a session's sub-resource) and vNICs (a VM's): create, read,
remove, the refusals (field-named, nothing written), roles, a VM posted with several
vNICs, and a PATCH of one vNIC, live on a running VM, touching only it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.api_fixtures import RATE_DOC, Api, make_api


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


@pytest.fixture
def lab(api: Api) -> Api:
    """Profile ``campus`` (the default of session ``lab``, owned by alice) and ``fast``."""
    for doc in (RATE_DOC, {"name": "fast", "egress": {"rate": "100Mbit"}}):
        assert api.call("admin", "POST", "/v1/profiles", json=doc).status_code == 201
    body = {"name": "lab", "default_profile": "campus", "owner": "alice"}
    assert api.call("admin", "POST", "/v1/sessions", json=body).status_code == 201
    return api


def ok(api: Api, who: str, method: str, path: str, expect: int, **kw: Any) -> Any:
    r = api.call(who, method, path, **kw)
    assert r.status_code == expect, (method, path, r.status_code, r.text)
    return r.json() if r.content else None


NETS = "/v1/sessions/lab/networks"
VMS = "/v1/sessions/lab/vms"


def test_networks_are_a_sub_resource_of_their_session(lab: Api) -> None:
    (default,) = ok(lab, "reader", "GET", NETS, 200)
    assert default["name"] == "default"
    assert default["network_id"] == ok(lab, "reader", "GET", "/v1/sessions/lab", 200)["network_id"]
    body = {"name": "data", "network_id": 4242, "ipv4": "10.77.0.0/24", "default_profile": "fast"}
    made = ok(lab, "admin", "POST", NETS, 201, json=body)
    assert {k: made[k] for k in body} == body and made["nics"] == []
    assert made["ipv6"]  # derived from the network id
    assert ok(lab, "reader", "GET", f"{NETS}/data", 200) == made
    assert ok(lab, "reader", "GET", "/v1/sessions/lab", 200)["networks"] == ["default", "data"]
    # Writes are admins': the owner of the session and readers are refused.
    for who in ("alice", "reader"):
        ok(lab, who, "POST", NETS, 403, json={"name": "other"})
        ok(lab, who, "DELETE", f"{NETS}/data", 403)
    ok(lab, "admin", "DELETE", f"{NETS}/data", 204)
    ok(lab, "reader", "GET", f"{NETS}/data", 404)
    ok(lab, "reader", "GET", "/v1/sessions/nope/networks", 404)


def test_network_refusals_name_the_field_and_write_nothing(lab: Api) -> None:
    ok(lab, "admin", "POST", NETS, 201, json={"name": "data", "ipv4": "10.77.0.0/24"})
    before = ok(lab, "reader", "GET", NETS, 200)
    for body, status, where in (
        ({"name": "data"}, 409, None),
        ({"name": "x", "network_id": before[0]["network_id"]}, 422, "network_id"),
        ({"name": "x", "ipv4": "10.77.0.0/16"}, 422, "ipv4"),
        ({"name": "x", "ipv6": "not a subnet"}, 422, "ipv6"),
        ({"name": "X!"}, 422, "name"),
        ({"name": "x", "default_profile": "nope"}, 422, "default_profile"),
        ({"name": "x", "color": "red"}, 422, None),
    ):
        r = lab.call("admin", "POST", NETS, json=body)
        assert r.status_code == status, (body, r.text)
        if where:
            assert where in [e["field"] for e in r.json()["fields"]], r.text
    r = lab.call("admin", "DELETE", f"{NETS}/default")
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "network"
    assert ok(lab, "reader", "GET", NETS, 200) == before


def test_a_vm_with_several_vnics_and_a_live_patch_of_one(lab: Api) -> None:
    ok(lab, "admin", "POST", NETS, 201, json={"name": "data"})
    body = {
        "name": "a",
        "launch": True,
        "nics": [{}, {"network": "data", "patch": {"egress": {"rate": "5Mbit"}}}],
    }
    made = ok(lab, "alice", "POST", VMS, 201, json=body)
    eth0, eth1 = made["vm"]["nics"]
    assert (eth0["name"], eth0["network"], eth1["name"], eth1["network"]) == (
        "eth0",
        "default",
        "eth1",
        "data",
    )
    assert made["vm"]["mac"] == eth0["mac"] and eth1["mac"] != eth0["mac"]
    assert [n["effective"]["fields"]["egress.rate"]["value"] for n in made["nics"]] == [
        "20Mbit",
        "5Mbit",
    ]
    assert made["effective"] == made["nics"][0]["effective"]
    nics = ok(lab, "reader", "GET", f"{VMS}/a/nics", 200)
    assert nics == made["vm"]["nics"]
    one = ok(lab, "reader", "GET", f"{VMS}/a/nics/eth1", 200)
    assert one["effective"]["fields"]["egress.rate"]["source"]["layer"] == "vm-patch"
    ok(lab, "reader", "GET", f"{VMS}/a/nics/eth5", 404)
    assert ok(lab, "reader", "GET", f"{NETS}/data", 200)["nics"] == ["a/eth1"]

    # PATCH one vNIC: merge-patch of its override, live, and only it changes.
    running = lab.driver.vms[("lab", "a")]
    for who in ("bob", "reader"):
        ok(lab, who, "PATCH", f"{VMS}/a/nics/eth1", 403, json={"profile": "fast"})
    changed = ok(
        lab,
        "alice",
        "PATCH",
        f"{VMS}/a/nics/eth1",
        200,
        json={"profile": "fast", "patch": {"egress": {"rate": None}}},
    )
    assert changed["override_profile"] == "fast" and changed["override_patch"] is None
    assert [(c["nic"], c["fields"]["egress.rate"]["new"]) for c in changed["changes"]] == [
        ("eth1", "100Mbit")
    ]
    now = lab.driver.vms[("lab", "a")]
    assert now.nics[0] == running.nics[0]
    assert str(now.nics[1].profile.egress.rate) == "100Mbit"
    r = lab.call(
        "alice", "PATCH", f"{VMS}/a/nics/eth1", json={"patch": {"egress": {"rate": "fast"}}}
    )
    assert r.status_code == 422 and r.json()["fields"][0]["field"].startswith("patch.egress.rate")
    ok(lab, "alice", "PATCH", f"{VMS}/a/nics/eth3", 404, json={"profile": "fast"})
    # The VM's own PATCH still changes eth0, as before.
    ok(lab, "alice", "PATCH", f"{VMS}/a", 200, json={"patch": {"egress": {"rate": "7Mbit"}}})
    assert str(lab.driver.vms[("lab", "a")].nics[0].profile.egress.rate) == "7Mbit"
    assert str(lab.driver.vms[("lab", "a")].nics[1].profile.egress.rate) == "100Mbit"
    # A network its vNICs use cannot go, and the answer names them.
    r = lab.call("admin", "DELETE", f"{NETS}/data")
    assert r.status_code == 409 and "lab/a/eth1" in r.text


def test_vm_create_refusals_for_vnics_name_the_field(lab: Api) -> None:
    for body, where in (
        ({"name": "a", "nics": [{"network": "nope"}]}, "nics[0].network"),
        ({"name": "a", "nics": [{}] * 9}, "nics"),
        (
            {"name": "a", "nics": [{}, {"patch": {"egress": {"rate": "x"}}}]},
            "nics[1].patch.egress.rate",
        ),
        ({"name": "a", "profile": "fast", "nics": [{}]}, "profile"),
    ):
        r = lab.call("alice", "POST", VMS, json=body)
        assert r.status_code == 422, r.text
        assert [e["field"] for e in r.json()["fields"]] == [where], r.text
    assert ok(lab, "reader", "GET", VMS, 200) == []


def test_a_runtime_adjustment_of_one_vnic_through_the_api(lab: Api) -> None:
    ok(lab, "admin", "POST", NETS, 201, json={"name": "data"})
    ok(
        lab,
        "alice",
        "POST",
        VMS,
        201,
        json={"name": "a", "launch": True, "nics": [{}, {"network": "data"}]},
    )
    adj = f"{VMS}/a/adjustments/user"
    body = {"set": {"egress.rate": "4Mbit"}, "reason": "slow eth1", "nic": "eth1"}
    answer = ok(lab, "alice", "PUT", adj, 200, json=body)
    assert answer["fields"]["egress.rate"] == {"old": "20Mbit", "new": "4Mbit"}
    assert [c["nic"] for c in answer["changes"]] == ["eth1"]
    eth0, eth1 = lab.driver.vms[("lab", "a")].nics
    assert (str(eth0.profile.egress.rate), str(eth1.profile.egress.rate)) == ("20Mbit", "4Mbit")
    (listed,) = ok(lab, "reader", "GET", f"{VMS}/a/adjustments", 200)
    assert (listed["nic"], listed["source"]) == ("eth1", "user")
    (entry,) = ok(lab, "reader", "GET", "/v1/audit", 200, params={"session": "lab"})
    assert (entry["vm"], entry["nic"], entry["new"]["egress.rate"]) == ("a", "eth1", "4Mbit")
    # Clearing eth0's (it has none) changes nothing; eth1's brings its rate back.
    assert ok(lab, "alice", "DELETE", adj, 200)["fields"] == {}
    cleared = ok(lab, "alice", "DELETE", adj, 200, params={"nic": "eth1"})
    assert cleared["fields"]["egress.rate"] == {"old": "4Mbit", "new": "20Mbit"}
    assert str(lab.driver.vms[("lab", "a")].nics[1].profile.egress.rate) == "20Mbit"
    r = lab.call("alice", "PUT", adj, json={**body, "nic": "eth9"})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "nic"
