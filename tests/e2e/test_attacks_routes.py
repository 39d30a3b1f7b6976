"""Every route of the OpenAPI document × every role, against a real `vnic serve`.

The routes come from the running server's /openapi.json, so a new route is
covered the day it is added: a route missing from :data:`EXPECT` fails the
test, naming it (and an entry whose route is gone fails too). Roles:
anonymous (no token), reader, ``other`` (owner of another session), owner (of
the session the path names) and admin.

A refusal (401/403) is sent to a shared world with the body a permitted caller
would send, so the role, not the body, is what is refused; afterwards that
world reads back exactly as before (database) and the agent's desired state
still matches the database. A permitted write runs in a fresh world of its own,
so no call depends on another's leftovers. Every 4xx carries the JSON error
body. The driver is ``fake``: this suite is about the API, not the kernel
(which tests/netns covers). Takes ~1-3 min on a busy 2-core machine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, vnic

ROLES = ("anonymous", "reader", "other", "owner", "admin")
#: Token name of each role (anonymous has none).
TOKEN_OF = {"reader": "reader", "other": "bob", "owner": "alice", "admin": "admin"}

Body = Callable[["World"], Any] | None


@dataclass(frozen=True)
class Rule:
    """Who may call a route and what a permitted call answers.

    ``who``: public (everyone, no token), read (any token), vm (the session's owner
    and admins), admin. ``params`` override the world's default path values.
    """

    who: str
    ok: int
    body: Body = None
    params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    content: Callable[[World], str] | None = None  # a raw (non-JSON) body

    def expected(self, role: str) -> int:
        if self.who == "public":
            return self.ok
        if role == "anonymous":
            return 401
        if self.who == "read" or role == "admin":
            return self.ok
        if self.who == "vm" and role == "owner":
            return self.ok
        return 403


@dataclass
class World:
    """Objects one call acts on: a profile in use, one unused, a session owned by
    alice with networks ``data`` and ``spare-net`` (unused), a running VM ``v`` (eth1
    on ``data``, an adjustment, a scenario) and a defined VM ``w``, and a reader token."""

    tag: str

    @property
    def profile(self) -> str:
        return f"p{self.tag}"

    @property
    def spare(self) -> str:
        return f"q{self.tag}"

    @property
    def session(self) -> str:
        return f"s{self.tag}"

    @property
    def token(self) -> str:
        return f"t{self.tag}"


def scenario_doc(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "vms": ["v"],
        "loop": True,
        "duration": "600s",
        "steps": [{"at": "0s", "set": {"egress.rate": "6Mbit"}}],
    }


def new_name(_: World) -> str:
    return f"n{uuid.uuid4().hex[:8]}"


EXPECT: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/health"): Rule("public", 200),
    ("POST", "/ui/login"): Rule("public", 200, body=lambda w: {"token": SECRETS["reader"]}),
    ("POST", "/ui/logout"): Rule("public", 204),
    ("GET", "/v1/whoami"): Rule("read", 200),
    ("GET", "/v1/profile-fields"): Rule("read", 200),
    ("GET", "/metrics"): Rule("read", 200),
    ("GET", "/v1/drivers"): Rule("read", 200),
    ("POST", "/v1/reconcile"): Rule("admin", 200),
    # profiles
    ("GET", "/v1/profiles"): Rule("read", 200),
    ("POST", "/v1/profiles"): Rule(
        "admin", 201, body=lambda w: {"name": new_name(w), "egress": {"rate": "4Mbit"}}
    ),
    ("GET", "/v1/profiles/{name}"): Rule("read", 200),
    ("PATCH", "/v1/profiles/{name}"): Rule(
        "admin", 200, body=lambda w: {"egress": {"rate": "9Mbit"}}
    ),
    ("DELETE", "/v1/profiles/{name}"): Rule("admin", 204, params={"name": "spare"}),
    ("GET", "/v1/profiles/{name}/revisions"): Rule("read", 200),
    ("POST", "/v1/import/profiles"): Rule(
        "admin", 200, body=lambda w: [{"name": new_name(w), "egress": {"rate": "3Mbit"}}]
    ),
    ("POST", "/v1/import/profiles/yaml"): Rule(
        "admin", 200, content=lambda w: f"name: {new_name(w)}\negress:\n  rate: 2Mbit\n"
    ),
    ("GET", "/v1/export/profiles"): Rule("read", 200),
    ("GET", "/v1/export/profiles.yaml"): Rule("read", 200),
    # sessions
    ("GET", "/v1/sessions"): Rule("read", 200),
    ("POST", "/v1/sessions"): Rule("admin", 201, body=lambda w: {"name": new_name(w)}),
    ("GET", "/v1/sessions/{name}"): Rule("read", 200),
    ("PATCH", "/v1/sessions/{name}"): Rule(
        "admin", 200, body=lambda w: {"overrides_allowed": True}
    ),
    ("DELETE", "/v1/sessions/{name}"): Rule("admin", 204, query={"force": "true"}),
    ("POST", "/v1/sessions/{name}/down"): Rule("vm", 200),
    ("GET", "/v1/sessions/{session}/live"): Rule("read", 200, query={"events": "1"}),
    ("GET", "/v1/sessions/{session}/stats"): Rule("read", 200),
    ("GET", "/v1/sessions/{session}/vm-profiles"): Rule("read", 200),
    # networks
    ("GET", "/v1/sessions/{session}/networks"): Rule("read", 200),
    ("POST", "/v1/sessions/{session}/networks"): Rule(
        "admin", 201, body=lambda w: {"name": new_name(w)}
    ),
    ("GET", "/v1/sessions/{session}/networks/{name}"): Rule("read", 200, params={"name": "data"}),
    ("DELETE", "/v1/sessions/{session}/networks/{name}"): Rule(
        "admin", 204, params={"name": "spare-net"}
    ),
    # VMs
    ("GET", "/v1/sessions/{session}/vms"): Rule("read", 200),
    ("POST", "/v1/sessions/{session}/vms"): Rule("vm", 201, body=lambda w: {"name": new_name(w)}),
    ("GET", "/v1/sessions/{session}/vms/{vm}"): Rule("read", 200),
    ("PATCH", "/v1/sessions/{session}/vms/{vm}"): Rule(
        "vm", 200, body=lambda w: {"patch": {"egress": {"rate": "7Mbit"}}}
    ),
    ("DELETE", "/v1/sessions/{session}/vms/{vm}"): Rule("vm", 204),
    ("POST", "/v1/sessions/{session}/vms/{vm}/launch"): Rule("vm", 200, params={"vm": "w"}),
    ("POST", "/v1/sessions/{session}/vms/{vm}/destroy"): Rule("vm", 200),
    ("GET", "/v1/sessions/{session}/vms/{vm}/explain"): Rule("read", 200),
    ("GET", "/v1/sessions/{session}/vms/{vm}/nics"): Rule("read", 200),
    ("GET", "/v1/sessions/{session}/vms/{vm}/nics/{nic}"): Rule("read", 200),
    ("PATCH", "/v1/sessions/{session}/vms/{vm}/nics/{nic}"): Rule(
        "vm", 200, body=lambda w: {"patch": {"egress": {"rate": "8Mbit"}}}, params={"nic": "eth1"}
    ),
    ("POST", "/v1/sessions/{session}/vms/{vm}/exec"): Rule(
        "admin", 200, body=lambda w: {"argv": ["hostname"], "timeout": 5}
    ),
    # The fake driver's VMs have no link to set: an admin gets the 422 naming the VM.
    ("POST", "/v1/sessions/{session}/vms/{vm}/link"): Rule(
        "admin", 422, body=lambda w: {"up": False}
    ),
    ("GET", "/v1/doctor"): Rule("admin", 200),
    # runtime adjustments, audit, controller, scenarios
    ("GET", "/v1/sessions/{session}/vms/{vm}/adjustments"): Rule("read", 200),
    ("PUT", "/v1/sessions/{session}/vms/{vm}/adjustments/{source}"): Rule(
        "vm", 200, body=lambda w: {"set": {"egress.rate": "3Mbit"}}
    ),
    ("DELETE", "/v1/sessions/{session}/vms/{vm}/adjustments/{source}"): Rule("vm", 200),
    ("GET", "/v1/audit"): Rule("read", 200),
    ("GET", "/v1/sessions/{session}/controller"): Rule("read", 200),
    ("PUT", "/v1/sessions/{session}/controller"): Rule("admin", 200, body=lambda w: {"rules": []}),
    ("GET", "/v1/sessions/{session}/controller/state"): Rule("read", 200),
    ("GET", "/v1/sessions/{session}/scenarios"): Rule("read", 200),
    ("POST", "/v1/sessions/{session}/scenarios"): Rule(
        "vm", 201, body=lambda w: scenario_doc(new_name(w))
    ),
    ("POST", "/v1/sessions/{session}/scenarios/{name}/{action}"): Rule(
        "vm", 200, params={"name": "sc", "action": "pause"}
    ),
    # hosts: this server has none, and must keep none (a host added would place every
    # later world's VMs on it), so an admin's write is refused by its input or its name.
    ("GET", "/v1/hosts"): Rule("read", 200),
    ("POST", "/v1/hosts"): Rule("admin", 422, body=lambda w: {"name": "Not A Host Name"}),
    ("GET", "/v1/hosts/{name}"): Rule("read", 404, params={"name": "nohost"}),
    ("DELETE", "/v1/hosts/{name}"): Rule("admin", 404, params={"name": "nohost"}),
    ("POST", "/v1/hosts/{name}/cordon"): Rule("admin", 404, params={"name": "nohost"}),
    ("POST", "/v1/hosts/{name}/uncordon"): Rule("admin", 404, params={"name": "nohost"}),
    ("POST", "/v1/hosts/{name}/drain"): Rule("admin", 404, params={"name": "nohost"}),
    ("GET", "/v1/prometheus/targets"): Rule("read", 200),
    # the agents' routes take a host token: an API token of any role is refused (401).
    ("POST", "/v1/agent/register"): Rule(
        "public",
        401,
        body=lambda w: {
            "host": "h1",
            "underlay": "10.0.0.1",
            "capacity": {"vnics": 8, "cpus": 1},
        },
    ),
    ("POST", "/v1/agent/lease"): Rule("public", 401, body=lambda w: {"epoch": 1}),
    ("GET", "/v1/agent/desired"): Rule("public", 401),
    ("GET", "/v1/agent/changes"): Rule("public", 401, query={"after": "0"}),
    ("POST", "/v1/agent/status"): Rule("public", 401, body=lambda w: {"epoch": 1, "results": []}),
    # tokens
    ("GET", "/v1/tokens"): Rule("admin", 200),
    ("POST", "/v1/tokens"): Rule(
        "admin", 201, body=lambda w: {"name": new_name(w), "role": "reader"}
    ),
    ("DELETE", "/v1/tokens/{name}"): Rule("admin", 204),
}

SECRETS: dict[str, str] = {}  # token name -> secret, filled by the server fixture


def path_values(method: str, template: str, rule: Rule, w: World) -> dict[str, str]:
    """What each ``{param}`` of ``template`` is in world ``w``."""
    if template.startswith("/v1/profiles/"):
        name = w.profile
    elif template.startswith("/v1/tokens/"):
        name = w.token
    else:
        name = w.session  # /v1/sessions/{name}...; scenarios override it with "sc"
    values = {"name": name, "session": w.session, "vm": "v", "source": "user", "nic": "eth0"}
    for key, value in rule.params.items():
        values[key] = w.spare if value == "spare" else value
    return values


@dataclass
class Site:
    server: Server
    admin: httpx.Client

    def call(self, role: str, method: str, template: str, rule: Rule, w: World) -> httpx.Response:
        path = template.format(**path_values(method, template, rule, w))
        headers = {}
        if role != "anonymous":
            headers["Authorization"] = f"Bearer {SECRETS[TOKEN_OF[role]]}"
        kw: dict[str, Any] = {"headers": headers, "params": rule.query}
        if rule.content is not None:
            kw["content"] = rule.content(w)
            headers["Content-Type"] = "application/yaml"
        elif rule.body is not None:
            kw["json"] = rule.body(w)
        with httpx.Client(base_url=self.server.url, timeout=60) as c:
            if template.endswith("/live"):  # an event stream: the status, then hang up
                with c.stream(method, path, **kw) as r:
                    if r.status_code != 200:
                        r.read()  # an error body, to check
                    return r
            return c.request(method, path, **kw)

    def world(self) -> World:
        w = World(uuid.uuid4().hex[:8])

        def ok(method: str, path: str, expect: int, **kw: Any) -> None:
            r = self.admin.request(method, path, **kw)
            assert r.status_code == expect, (method, path, r.status_code, r.text)

        ok("POST", "/v1/profiles", 201, json={"name": w.profile, "egress": {"rate": "20Mbit"}})
        ok("POST", "/v1/profiles", 201, json={"name": w.spare, "egress": {"rate": "10Mbit"}})
        body = {"name": w.session, "default_profile": w.profile, "owner": "alice"}
        ok("POST", "/v1/sessions", 201, json=body)
        vms = f"/v1/sessions/{w.session}/vms"
        for net in ("data", "spare-net"):
            ok("POST", f"/v1/sessions/{w.session}/networks", 201, json={"name": net})
        v = {"name": "v", "launch": True, "nics": [{}, {"network": "data"}]}
        ok("POST", vms, 201, json=v)
        ok("POST", vms, 201, json={"name": "w"})
        adjust = {"set": {"egress.rate": "5Mbit"}, "reason": "attack suite"}
        ok("PUT", f"{vms}/v/adjustments/user", 200, json=adjust)
        ok("POST", f"/v1/sessions/{w.session}/scenarios", 201, json=scenario_doc("sc"))
        ok("POST", "/v1/tokens", 201, json={"name": w.token, "role": "reader"})
        return w

    def snapshot(self, w: World) -> dict[str, Any]:
        """What the database holds of ``w`` (and everything else readable), as JSON."""
        vms = f"/v1/sessions/{w.session}/vms"
        out: dict[str, Any] = {}
        for path in (
            "/v1/export/profiles",
            "/v1/sessions",
            vms,
            f"/v1/sessions/{w.session}/networks",
            f"{vms}/v/adjustments",
            "/v1/tokens",
            f"/v1/sessions/{w.session}/controller",
        ):
            r = self.admin.get(path)
            assert r.status_code == 200, (path, r.text)
            out[path] = r.json()
        scenarios = self.admin.get(f"/v1/sessions/{w.session}/scenarios").json()
        out["scenarios"] = sorted((s["name"], s["state"]) for s in scenarios)
        return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home: Path = tmp_path_factory.mktemp("attacks")
    for name, role in (
        ("admin", "admin"),
        ("alice", "owner"),
        ("bob", "owner"),
        ("reader", "reader"),
    ):
        SECRETS[name] = vnic(home, "token", "create", name, "--role", role).split(": ")[-1].strip()
    server = Server(
        home, "serve", "--driver", "fake", "--latency-interval", "600", "--drift-interval", "600"
    ).start()
    admin = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {SECRETS['admin']}"}, timeout=60
    )
    # bob owns a session of his own: "other" is an owner, just not of the worlds' sessions.
    r = admin.post("/v1/sessions", json={"name": "bobs", "owner": "bob"})
    assert r.status_code == 201, r.text
    try:
        yield Site(server, admin)
    finally:
        admin.close()
        server.kill()


def routes(site: Site) -> set[tuple[str, str]]:
    doc = httpx.get(site.server.url + "/openapi.json", timeout=60).json()
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}


def check_body(role: str, method: str, path: str, r: httpx.Response) -> None:
    """A 4xx (and 5xx) answer is the JSON error body."""
    if r.status_code < 400:
        return
    where = (role, method, path, r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), where
    body = r.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), where
    assert body.get("fields") is None or isinstance(body["fields"], list), where
    if r.status_code == 401:
        assert r.headers.get("www-authenticate") == "Bearer", where


def desired_matches_database(site: Site) -> None:
    """The agent's desired state names exactly the VMs the database says run."""
    desired = json.loads((site.server.home / "agent" / "desired.json").read_text())
    held = {(e["request"]["session"], e["request"]["vm"]) for e in desired["vms"]}
    running = set()
    for s in site.admin.get("/v1/sessions").json():
        for vm in site.admin.get(f"/v1/sessions/{s['name']}/vms").json():
            if vm["state"] == "running":
                running.add((s["name"], vm["name"]))
    assert held == running


def test_every_route_is_in_the_expectation_table(site: Site) -> None:
    served = routes(site)
    missing = sorted(served - EXPECT.keys())
    assert not missing, f"routes without an expectation (add them to EXPECT): {missing}"
    stale = sorted(EXPECT.keys() - served)
    assert not stale, f"EXPECT names routes the server does not have: {stale}"


def test_refusals_and_reads_leave_the_world_unchanged(site: Site) -> None:
    w = site.world()
    before = site.snapshot(w)
    wrong = []
    for method, template in sorted(routes(site) & EXPECT.keys()):
        rule = EXPECT[(method, template)]
        for role in ROLES:
            expect = rule.expected(role)
            if method not in ("GET", "HEAD") and 200 <= expect < 300 and rule.who != "public":
                continue  # a permitted write: its own world (next test)
            r = site.call(role, method, template, rule, w)
            check_body(role, method, template, r)
            if r.status_code != expect:
                wrong.append((role, method, template, expect, r.status_code, r.text[:200]))
    assert not wrong, "\n".join(map(str, wrong))
    assert site.snapshot(w) == before
    desired_matches_database(site)


def test_permitted_writes_succeed(site: Site) -> None:
    wrong = []
    for method, template in sorted(routes(site) & EXPECT.keys()):
        rule = EXPECT[(method, template)]
        if method in ("GET", "HEAD") or rule.who == "public":
            continue
        for role in ROLES:
            expect = rule.expected(role)
            if not 200 <= expect < 300:
                continue
            r = site.call(role, method, template, rule, site.world())
            check_body(role, method, template, r)
            if r.status_code != expect:
                wrong.append((role, method, template, expect, r.status_code, r.text[:200]))
    assert not wrong, "\n".join(map(str, wrong))
    desired_matches_database(site)


def test_unknown_routes_and_methods_answer_the_json_body(site: Site) -> None:
    for method, path, status in (
        ("GET", "/v1/nope", 404),
        ("PUT", "/v1/health", 405),
        ("GET", "/v1/sessions/none-such", 404),
    ):
        r = site.admin.request(method, path)
        assert r.status_code == status, (method, path, r.text)
        check_body("admin", method, path, r)
