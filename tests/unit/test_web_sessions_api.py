"""The session page's one request: every VM with its effective profile, as the service
resolves it (the same answer as one ``explain`` per VM)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.api_fixtures import Api, make_api


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def test_vm_profiles_name_the_most_specific_profile_and_match_explain(api: Api) -> None:
    for doc in (
        {"name": "base", "egress": {"rate": "20Mbit", "delay": "2ms"}},
        {"name": "db", "ingress": {"rate": "5Mbit"}},
        {"name": "slow", "egress": {"rate": "1Mbit"}},
    ):
        assert api.call("admin", "POST", "/v1/profiles", json=doc).status_code == 201
    session = {"name": "lab", "default_profile": "base", "rules": [{"profile": "db", "role": "db"}]}
    assert api.call("admin", "POST", "/v1/sessions", json=session).status_code == 201
    for vm in ({"name": "web"}, {"name": "pg", "role": "db"}, {"name": "x", "profile": "slow"}):
        assert api.call("admin", "POST", "/v1/sessions/lab/vms", json=vm).status_code == 201

    got = api.call("reader", "GET", "/v1/sessions/lab/vm-profiles")
    assert got.status_code == 200
    by_vm = {v["vm"]["name"]: v for v in got.json()}
    assert [v["vm"]["name"] for v in got.json()] == ["pg", "web", "x"]
    assert by_vm["web"]["profile"] == "base" and by_vm["web"]["revisions"] == {"base": 1}
    assert by_vm["pg"]["profile"] == "db"
    assert by_vm["x"]["profile"] == "slow"
    assert by_vm["pg"]["values"]["ingress.rate"] == "5Mbit"
    assert by_vm["web"]["numbers"] == {
        "egress.rate": 20_000_000.0,
        "ingress.rate": None,
        "egress.delay": 0.002,
        "ingress.delay": None,
    }
    for name, item in by_vm.items():
        explained = api.call("reader", "GET", f"/v1/sessions/lab/vms/{name}/explain").json()
        assert item["vm"] == explained["vm"]
        assert item["revisions"] == explained["effective"]["revisions"]


def test_vm_profiles_of_an_unknown_session_is_404(api: Api) -> None:
    assert api.call("reader", "GET", "/v1/sessions/nope/vm-profiles").status_code == 404
