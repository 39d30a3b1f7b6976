"""The web UI's own endpoints on the in-memory driver: the page and its assets, the
login cookie (and that the API takes it like a bearer token), the field catalogue, and
the live event stream. The pages themselves are tested in a browser (tests/e2e)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.api_fixtures import RATE_DOC, Api, make_api
from vnic.api.deps import TOKEN_COOKIE


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def test_the_page_and_its_assets_are_served_without_a_token(api: Api) -> None:
    page = api.client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("app.js", "app.css", "profiles.js", "sessions.js", "hosts.js"):
        assert f"/ui/static/{asset}" in page.text
        assert api.client.get(f"/ui/static/{asset}").status_code == 200
    # Nothing is loaded from elsewhere: every script and stylesheet is ours.
    assert "https://" not in page.text and "http://" not in page.text


def test_login_sets_a_strict_http_only_cookie_the_api_accepts(api: Api) -> None:
    wrong = api.client.post("/ui/login", json={"token": "vnic_nope"})
    assert wrong.status_code == 422
    assert wrong.json()["fields"][0]["field"] == "token"
    assert TOKEN_COOKIE not in wrong.cookies
    assert api.client.get("/v1/whoami").status_code == 401

    ok = api.client.post("/ui/login", json={"token": api.secrets["reader"]})
    assert ok.json() == {"name": "reader", "role": "reader"}
    header = ok.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header
    # The client keeps the cookie: the API now knows who calls, with the reader's rights.
    assert api.client.get("/v1/whoami").json()["role"] == "reader"
    # A browser sends its page's origin with every write (the guard needs it with the cookie).
    page = {"Origin": "http://127.0.0.1"}
    refused = api.client.post("/v1/profiles", json=RATE_DOC, headers=page)
    assert refused.status_code == 403 and "role 'reader'" in refused.json()["message"]
    # A header wins over the cookie.
    assert api.client.get("/v1/whoami", headers=api.as_("admin")).json()["name"] == "admin"

    assert api.client.post("/ui/logout", headers=page).status_code == 204
    api.client.cookies.clear()  # what the browser does with the expired cookie
    assert api.client.get("/v1/whoami").status_code == 401


def test_the_field_catalogue_gives_units_and_defaults(api: Api) -> None:
    fields = {f["field"]: f for f in api.call("reader", "GET", "/v1/profile-fields").json()}
    assert fields["egress.rate"]["unit"] == "bit/s"
    assert fields["mtu"]["default"] == "1500B"
    assert "MTU" in fields["egress.burst"]["default"]
    assert fields["egress.distribution"]["default"] == "uniform"


def test_the_live_stream_sends_stats_and_new_audit_entries(api: Api) -> None:
    api.call("admin", "POST", "/v1/profiles", json=RATE_DOC)
    api.call(
        "admin", "POST", "/v1/sessions", json={"name": "lab", "default_profile": RATE_DOC["name"]}
    )
    api.call("admin", "POST", "/v1/sessions/lab/vms", json={"name": "a", "launch": True})
    api.call(
        "admin",
        "PUT",
        "/v1/sessions/lab/vms/a/adjustments/user",
        json={"set": {"egress.rate": "7Mbit"}},
    )
    with api.client.stream(
        "GET", "/v1/sessions/lab/live?interval=0.2&events=2", headers=api.as_("reader")
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 2
    assert events[0]["audit"] and events[0]["audit"][0]["vm"] == "a"
    assert events[1]["audit"] == []  # only entries new since the previous event
    bad = api.call("reader", "GET", "/v1/sessions/lab/live?interval=0.01")
    assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "interval"
    assert api.call("reader", "GET", "/v1/sessions/nope/live").status_code == 404
