"""The HTTP edge's guards (:mod:`vnic.edge.guard`) on the manager and the agent:
cross-site writes with the UI's cookie are refused and change nothing, form content
types get 415, a foreign Host 421, bodies over the limit 413 (cut while arriving),
security headers on every answer, the agent's documents behind its key, the bind
warning, and the SQLite files' modes."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.unit.api_fixtures import RATE_DOC, Api, make_api
from vnic.agent.api import agent_key, create_agent_app
from vnic.agent.core import Agent
from vnic.api.deps import TOKEN_COOKIE
from vnic.drivers.fake import FakeDriver
from vnic.edge import guard as hg
from vnic.server import guarded
from vnic.store.db import Database

OWN = "http://127.0.0.1"
FOREIGN = "http://127.0.0.1:8000"  # another port of the same host: the same *site*


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def call(
    api: Api, who: str, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    """``api.call`` with more headers besides the token's."""
    return api.client.request(method, path, headers={**api.as_(who), **(headers or {})}, **kw)


def lab(api: Api) -> None:
    """Session ``lab`` with VM ``a`` running and VM ``b`` defined."""
    assert call(api, "admin", "POST", "/v1/profiles", json=RATE_DOC).status_code == 201
    body = {"name": "lab", "default_profile": "campus"}
    assert call(api, "admin", "POST", "/v1/sessions", json=body).status_code == 201
    vm = {"name": "a", "launch": True}
    assert call(api, "admin", "POST", "/v1/sessions/lab/vms", json=vm).status_code == 201
    assert call(api, "admin", "POST", "/v1/sessions/lab/vms", json={"name": "b"}).status_code == 201


def states(api: Api) -> dict[str, str]:
    """What the database says of the VMs, and that the driver agrees."""
    vms = {v["name"]: v["state"] for v in call(api, "admin", "GET", "/v1/sessions/lab/vms").json()}
    assert sorted(api.manager.agent.running("lab")) == [n for n, s in vms.items() if s == "running"]
    return vms


def cookie_client(api: Api) -> TestClient:
    """The test client logged in as admin through the UI's login (cookie, no header)."""
    login = api.client.post("/ui/login", json={"token": api.secrets["admin"]})
    assert login.status_code == 200 and TOKEN_COOKIE in api.client.cookies
    return api.client


WRITES = [
    ("POST", "/v1/sessions/lab/vms/a/destroy"),
    ("POST", "/v1/sessions/lab/vms/b/launch"),
    ("POST", "/v1/sessions/lab/down"),
    ("POST", "/v1/reconcile"),
    ("DELETE", "/v1/sessions/lab/vms/a"),
    ("DELETE", "/v1/sessions/lab?force=true"),
]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": FOREIGN},
        {"Origin": "null"},
        {"Referer": FOREIGN + "/attack.html"},
        {"Sec-Fetch-Site": "same-site", "Origin": OWN},
        {},  # neither Origin nor Referer: a cookie alone never writes
    ],
    ids=["origin", "null-origin", "referer", "sec-fetch-site", "no-origin"],
)
def test_cross_site_writes_with_the_cookie_are_refused_and_change_nothing(
    api: Api, headers: dict[str, str]
) -> None:
    lab(api)
    before = states(api)
    http = cookie_client(api)
    for method, path in WRITES:
        r = http.request(method, path, headers=headers)
        assert r.status_code == 403, (method, path, r.text)
        body = r.json()
        assert body["error"] == "forbidden"
        field = "Sec-Fetch-Site" if "Sec-Fetch-Site" in headers else "Origin"
        assert body["fields"][0]["field"] == field
        assert "127.0.0.1" in body["fields"][0]["expected"] or field == "Sec-Fetch-Site"
    assert states(api) == before == {"a": "running", "b": "defined"}
    assert call(api, "admin", "GET", "/v1/sessions/lab").status_code == 200


def test_the_own_origin_writes_with_the_cookie(api: Api) -> None:
    lab(api)
    http = cookie_client(api)
    page = {"Origin": OWN, "Sec-Fetch-Site": "same-origin"}
    assert http.post("/v1/sessions/lab/vms/b/launch", headers=page).status_code == 200
    referer = {"Referer": OWN + "/#/sessions/lab"}
    assert http.post("/v1/sessions/lab/vms/a/destroy", headers=referer).status_code == 200
    assert states(api) == {"a": "defined", "b": "running"}


def test_a_bearer_header_needs_no_origin_but_a_foreign_one_is_refused(api: Api) -> None:
    lab(api)
    assert call(api, "admin", "POST", "/v1/sessions/lab/vms/b/launch").status_code == 200
    r = call(api, "admin", "POST", "/v1/sessions/lab/down", headers={"Origin": FOREIGN})
    assert r.status_code == 403
    assert states(api) == {"a": "running", "b": "running"}


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"],
)
def test_form_content_types_get_415_on_json_routes(api: Api, content_type: str) -> None:
    lab(api)
    doc = json.dumps({"name": "b", "patch": {"egress": {"rate": "1Mbit"}}})
    for who, path in (
        ("admin", "/v1/sessions/lab/vms/b/launch"),
        ("admin", "/v1/profiles"),
        ("admin", "/v1/import/profiles/yaml"),
    ):
        r = call(api, who, "POST", path, content=doc, headers={"Content-Type": content_type})
        assert r.status_code == 415, (path, r.text)
        assert r.json()["fields"][0] == {
            "field": "Content-Type",
            "value": repr(content_type),
            "expected": r.json()["fields"][0]["expected"],
        }
        assert r.json()["fields"][0]["expected"].startswith("application/json")
    # The login, as a form: no cookie is set (no login CSRF either).
    r = api.client.post(
        "/ui/login",
        content=f"token={api.secrets['admin']}",
        headers={"Content-Type": content_type},
    )
    assert r.status_code == 415 and TOKEN_COOKIE not in api.client.cookies
    # A JSON body without a type is no JSON route's input either.
    r = call(api, "admin", "PATCH", "/v1/sessions/lab", content=b'{"owner": "x"}')
    assert r.status_code == 415
    assert states(api) == {"a": "running", "b": "defined"}
    assert call(api, "admin", "GET", "/v1/sessions/lab").json()["owner"] is None


def test_the_yaml_route_takes_what_the_ui_sends(api: Api) -> None:
    text = "name: y1\negress: {rate: 10Mbit}\n"
    r = call(
        api,
        "admin",
        "POST",
        "/v1/import/profiles/yaml",
        content=text,
        headers={"Content-Type": "application/yaml", "Origin": OWN},
    )
    assert r.status_code == 200, r.text
    assert call(api, "admin", "GET", "/v1/profiles/y1").status_code == 200


@pytest.mark.parametrize("host", ["rebind.example", "rebind.example:80", "127.0.0.1.nip.io"])
def test_a_foreign_host_gets_421_and_changes_nothing(api: Api, host: str) -> None:
    r = call(api, "admin", "POST", "/v1/profiles", json=RATE_DOC, headers={"Host": host})
    assert r.status_code == 421
    problem = r.json()["fields"][0]
    assert problem["field"] == "Host" and problem["value"] == repr(host)
    assert "localhost" in problem["expected"] and "--allowed-host" in problem["expected"]
    assert r.headers["x-frame-options"] == "DENY"
    assert call(api, "admin", "GET", "/v1/profiles").json() == []
    # Reads too: a rebound page reading the API is what DNS rebinding is for.
    assert call(api, "admin", "GET", "/v1/tokens", headers={"Host": host}).status_code == 421


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8470", "localhost", "LOCALHOST:1", "127.3.4.5", "[::1]:8470"]
)
def test_loopback_hosts_are_this_server(api: Api, host: str) -> None:
    assert call(api, "admin", "GET", "/v1/whoami", headers={"Host": host}).status_code == 200


def test_allowed_hosts_and_wildcard_binds() -> None:
    config = hg.GuardConfig()
    assert not config.host_allowed("10.1.2.3") and not config.host_allowed("vnic.lab")
    config.hosts.add("vnic.lab")
    assert config.host_allowed("vnic.lab") and not config.host_allowed("10.1.2.3")
    config.any_address = True  # bound to 0.0.0.0: an address literal cannot be rebound
    assert config.host_allowed("10.1.2.3") and config.host_allowed("fd00::1")
    assert not config.host_allowed("evil.example")


def test_serving_beyond_loopback_warns_and_names_its_hosts(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    app: Any = api.client.app
    guarded(app, "vnic serve", "127.0.0.1", [])
    assert capsys.readouterr().err == ""
    guarded(app, "vnic serve", "10.9.8.7", ["vnic.lab."])
    err = capsys.readouterr().err
    assert "vnic serve: WARNING: listening on 10.9.8.7" in err and "--allowed-host" in err
    for host, status in (("10.9.8.7:8470", 200), ("vnic.lab", 200), ("10.9.8.6", 421)):
        r = call(api, "admin", "GET", "/v1/whoami", headers={"Host": host})
        assert r.status_code == status, host
    assert hg.bind_warning("vnic agent", "::") is not None
    assert hg.bind_warning("vnic agent", "localhost") is None
    assert hg.bind_warning("vnic agent", "[::1]") is None


def test_a_body_over_the_limit_gets_413_and_changes_nothing(api: Api) -> None:
    call(api, "admin", "POST", "/v1/profiles", json=RATE_DOC)
    # Valid JSON padded with whitespace past 1 MiB: refused by size, not by content.
    padded = json.dumps({"description": "patched"}) + " " * hg.DEFAULT_BODY_LIMIT
    r = call(
        api,
        "admin",
        "PATCH",
        "/v1/profiles/campus",
        content=padded,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"] == "too_large"
    assert r.json()["fields"][0]["expected"] == "at most 1048576 bytes (1 MiB) on this route"
    profile = call(api, "admin", "GET", "/v1/profiles/campus").json()
    assert profile["revision"] == 1 and profile["description"] == "a campus link"
    # The import routes take more (8 MiB): the same padding imports.
    docs = json.dumps([{**RATE_DOC, "name": "big"}]) + " " * hg.DEFAULT_BODY_LIMIT
    r = call(
        api,
        "admin",
        "POST",
        "/v1/import/profiles",
        content=docs,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert call(api, "admin", "GET", "/v1/profiles/big").status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(api: Api) -> None:
    call(api, "admin", "POST", "/v1/profiles", json=RATE_DOC)
    chunk = b" " * 65536
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"description": "chunked"'
        for _ in range(1024):  # up to 64 MiB, if nothing stopped it
            sent += len(chunk)
            yield chunk
        yield b"}"

    r = call(
        api,
        "admin",
        "PATCH",
        "/v1/profiles/campus",
        content=body(),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert sent > hg.DEFAULT_BODY_LIMIT  # (the test client sends it all; a server cuts it:
    # test_the_guard_stops_reading_a_lying_or_endless_body, and tests/e2e/test_attacks_web.py)
    assert call(api, "admin", "GET", "/v1/profiles/campus").json()["revision"] == 1


def test_the_guard_stops_reading_a_lying_or_endless_body() -> None:
    """Straight ASGI: a Content-Length of 10 followed by endless chunks; the app would
    read everything, the guard stops it at the limit."""
    read: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            read.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": pulled < 10_000}

    answers: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    guard = hg.HttpGuard(app, hg.GuardConfig(default_limit=1 << 20))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/anything",
        "scheme": "http",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-length", b"10"),
            (b"content-type", b"application/json"),
        ],
    }
    asyncio.run(guard(scope, receive, send))
    assert answers[0]["status"] == 413
    assert pulled == 17 and sum(read) == 16 * 65536  # the 17th chunk passed the limit
    assert b"1 MiB" in answers[1]["body"]


def test_security_headers_on_every_answer(api: Api) -> None:
    answers = [
        api.client.get("/"),
        api.client.get("/ui/static/app.js"),
        api.client.get("/v1/health"),
        api.client.get("/v1/whoami"),  # 401
        api.client.get("/nowhere"),  # 404
        call(api, "admin", "POST", "/v1/profiles", json=RATE_DOC, headers={"Origin": FOREIGN}),
    ]
    for r in answers:
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp, r.url
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
        assert r.headers["cross-origin-resource-policy"] == "same-origin"
    # Swagger UI starts with an inline script from its CDN: its page gets its own policy.
    docs = api.client.get("/docs")
    assert (
        docs.status_code == 200
        and "frame-ancestors 'none'" in docs.headers["content-security-policy"]
    )


def test_the_ui_has_no_inline_script_or_style() -> None:
    """The CSP allows only our files: every script has a src, no element a style."""
    from html.parser import HTMLParser

    from vnic.web import STATIC

    found: list[tuple[str, dict[str, str | None]]] = []
    inline: list[str] = []

    class Page(HTMLParser):
        tag = ""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.append((tag, dict(attrs)))
            self.tag = tag

        def handle_data(self, data: str) -> None:
            if self.tag in ("script", "style") and data.strip():
                inline.append(data)

    Page().feed((STATIC / "index.html").read_text())
    scripts = [a for t, a in found if t == "script"]
    assert scripts and all(a.get("src") for a in scripts) and inline == []
    assert not [a for _, a in found if "style" in a or any(k.startswith("on") for k in a)]
    for js in STATIC.glob("*.js"):
        text = js.read_text()
        for banned in ("eval(", "new Function", "innerHTML", '"style"', ".style."):
            assert banned not in text, (js.name, banned)


@pytest.fixture
def agent_http(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    agent = Agent(tmp_path / "agent", {"fake": FakeDriver()}, default="fake")
    key = agent_key(tmp_path / "agent.key")
    with TestClient(create_agent_app(agent, key), base_url="http://127.0.0.1") as http:
        yield http, {"Authorization": f"Bearer {key}"}


def test_the_agent_documents_need_its_key(agent_http: tuple[TestClient, dict[str, str]]) -> None:
    http, key = agent_http
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert http.get(path).status_code == 401, path
        assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get(path, headers=key).status_code == 200, path
    assert "/v1/sync" in http.get("/openapi.json", headers=key).json()["paths"]


def test_the_agent_is_guarded_too(agent_http: tuple[TestClient, dict[str, str]]) -> None:
    http, key = agent_http
    assert http.get("/v1/vms", headers={**key, "Host": "rebind.example"}).status_code == 421
    form = {**key, "Content-Type": "application/x-www-form-urlencoded"}
    assert http.post("/v1/reconcile", headers=form, content="a=b").status_code == 415
    r = http.post("/v1/reconcile", headers={**key, "Origin": FOREIGN})
    assert r.status_code == 403
    big = {**key, "Content-Type": "application/json"}
    payload = "[]" + " " * (hg.DEFAULT_BODY_LIMIT + 1)
    assert http.post("/v1/vms", headers=big, content=payload).status_code == 413
    assert http.post("/v1/sync", headers=big, content=payload).status_code == 200  # 32 MiB
    assert http.get("/v1/vms", headers=key).headers["x-frame-options"] == "DENY"


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'new' / 'vnic.db'}")
    try:
        from vnic.manager.auth import Tokens

        Tokens(db).create("admin", "admin")  # a write: the -wal and -shm files exist
        for name in ("vnic.db", "vnic.db-wal", "vnic.db-shm"):
            mode = stat.S_IMODE((tmp_path / "new" / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    finally:
        db.dispose()
    # An older database made 0644 is tightened when opened again.
    for name in ("vnic.db", "vnic.db-wal", "vnic.db-shm"):
        if (tmp_path / "new" / name).exists():
            (tmp_path / "new" / name).chmod(0o644)
    again = Database(f"sqlite:///{tmp_path / 'new' / 'vnic.db'}")
    try:
        assert stat.S_IMODE((tmp_path / "new" / "vnic.db").stat().st_mode) == 0o600
        assert len(again.engine.url.database or "") > 0
    finally:
        again.dispose()
