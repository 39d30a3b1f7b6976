"""Live changes through the service and the API, on the fake driver: what reaches a running
VM when a profile, a session policy, an override or a runtime adjustment changes, what the
audit log keeps, and that a refused change changes nothing. The kernel side of the same
paths is tests/netns/test_live_change.py and tests/netns/test_controller_live.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.unit.api_fixtures import Api, make_api
from vnic.errors import InvalidInput
from vnic.manager.runtime import Runtime
from vnic.model.profile import parse_profile_document


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


@pytest.fixture
def clock(api: Api) -> Clock:
    c = Clock()
    api.manager.service.clock = c
    return c


def running(api: Api, *names: str, default: str = "campus") -> None:
    docs = [
        {"name": "campus", "egress": {"rate": "20Mbit"}, "ingress": {"rate": "50Mbit"}},
        {"name": "wan", "egress": {"rate": "2Mbit", "delay": "40ms"}},
    ]
    assert api.call("admin", "POST", "/v1/import/profiles", json=docs).status_code == 200
    r = api.call("admin", "POST", "/v1/sessions", json={"name": "lab", "default_profile": default})
    assert r.status_code == 201, r.text
    for name in names:
        r = api.call("admin", "POST", "/v1/sessions/lab/vms", json={"name": name, "launch": True})
        assert r.status_code == 201, r.text


def rate(api: Api, vm: str, direction: str = "egress") -> str:
    return str(getattr(api.driver.vms[("lab", vm)].profile, direction).rate)


def test_profile_change_reaches_every_running_vm_with_what_changed(api: Api) -> None:
    running(api, "a", "b")
    r = api.call("admin", "PATCH", "/v1/profiles/campus", json={"egress": {"rate": "30Mbit"}})
    assert r.status_code == 200, r.text
    changes = {c["vm"]: c for c in r.json()["changes"]}
    assert sorted(changes) == ["a", "b"]
    fields = changes["a"]["fields"]
    assert sorted(fields) == ["egress.queue", "egress.rate"]  # the derived queue follows the rate
    assert fields["egress.rate"] == {
        "old": "20Mbit",
        "new": "30Mbit",
        "source": "session-default (campus r2)",
    }
    assert fields["egress.queue"]["source"].startswith("derived")
    assert changes["a"]["error"] is None
    assert rate(api, "a") == rate(api, "b") == "30Mbit"
    assert rate(api, "a", "ingress") == "50Mbit"  # untouched
    # The audit log names the cause, old and new.
    entries = api.manager.runtime.audit("lab")
    assert {e.vm for e in entries} == {"a", "b"}
    assert all(
        e.reason == "profile campus r2" and e.old["egress.rate"] == "20Mbit" for e in entries
    )
    # Nothing left to do the second time.
    assert api.manager.reapply() == []


def test_unchanged_import_changes_no_vm(api: Api) -> None:
    running(api, "a")
    launches = api.driver.launches
    doc = {"name": "campus", "egress": {"rate": "20Mbit"}, "ingress": {"rate": "50Mbit"}}
    r = api.call("admin", "POST", "/v1/import/profiles", json=[doc])
    assert r.json()[0]["action"] == "unchanged" and r.json()[0]["changes"] == []
    assert api.driver.launches == launches


def test_session_default_change_switches_running_vms(api: Api) -> None:
    running(api, "a")
    r = api.call("admin", "PATCH", "/v1/sessions/lab", json={"default_profile": "wan"})
    assert r.status_code == 200, r.text
    fields = r.json()["changes"][0]["fields"]
    assert fields["egress.rate"]["new"] == "2Mbit"
    assert fields["egress.delay"] == {
        "old": None,
        "new": "40ms",
        "source": "session-default (wan r1)",
    }
    assert fields["ingress.rate"]["new"] is None  # wan leaves ingress unshaped
    assert rate(api, "a") == "2Mbit"


def test_override_on_a_running_vm_is_live_and_only_it_changes(api: Api) -> None:
    running(api, "a", "b")
    r = api.call(
        "admin", "PATCH", "/v1/sessions/lab/vms/a", json={"patch": {"egress": {"delay": "5ms"}}}
    )
    assert r.status_code == 200, r.text
    (change,) = r.json()["changes"]
    assert change["vm"] == "a" and set(change["fields"]) >= {"egress.delay"}
    assert "egress.rate" not in change["fields"]
    assert str(api.driver.vms[("lab", "a")].profile.egress.delay) == "5ms"
    assert api.driver.vms[("lab", "b")].profile.egress.delay is None


def test_runtime_adjustment_is_a_layer_with_an_expiry(api: Api, clock: Clock) -> None:
    running(api, "a")
    r = api.call(
        "admin",
        "PUT",
        "/v1/sessions/lab/vms/a/adjustments/user",
        json={"set": {"egress.rate": "8Mbit"}, "for": "1m", "reason": "demo"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["fields"]["egress.rate"] == {"old": "20Mbit", "new": "8Mbit"}
    assert rate(api, "a") == "8Mbit"
    explained = api.call("reader", "GET", "/v1/sessions/lab/vms/a/explain").json()
    source = explained["effective"]["fields"]["egress.rate"]["source"]
    assert source["layer"] == "runtime" and source["detail"].startswith("user: demo, until ")
    (listed,) = api.call("reader", "GET", "/v1/sessions/lab/vms/a/adjustments").json()
    assert listed["source"] == "user" and listed["set"] == {"egress": {"rate": "8Mbit"}}

    clock.now += timedelta(seconds=59)
    assert api.manager.runtime.expire() == []
    clock.now += timedelta(seconds=2)
    assert api.manager.runtime.expire() == [("lab", "a")]
    (change,) = api.manager.reapply(session="lab")
    assert change.fields["egress.rate"] == ("8Mbit", "20Mbit")
    assert rate(api, "a") == "20Mbit"
    newest, older = api.manager.runtime.audit("lab", "a")[:2]
    assert (newest.reason, newest.old["egress.rate"], newest.new["egress.rate"]) == (
        "expired",
        "8Mbit",
        "20Mbit",
    )
    assert (older.source, older.reason) == ("user", "demo")


def test_adjustment_switching_profile_and_newer_decision_replacing_older(api: Api) -> None:
    running(api, "a")
    runtime: Runtime = api.manager.runtime
    runtime.adjust("lab", "a", source="rule:slow", reason="busy", profile="wan")
    api.manager.reapply()
    assert rate(api, "a") == "2Mbit"
    explained = api.manager.service.explain("lab", "a")
    assert str(explained.effective.sources["egress.delay"]) == "runtime (rule:slow: busy -> wan r1)"
    # The same source again replaces its layer rather than stacking a second one.
    runtime.adjust(
        "lab", "a", source="rule:slow", reason="busier", values={"egress.rate": _rate("1Mbit")}
    )
    api.manager.reapply()
    assert rate(api, "a") == "1Mbit"
    assert len(runtime.adjustments("lab", "a")) == 1
    assert runtime.clear("lab", "a", "rule:slow")["egress.rate"] == ("1Mbit", "20Mbit")
    api.manager.reapply()
    assert rate(api, "a") == "20Mbit"


def test_refused_adjustment_changes_nothing(api: Api) -> None:
    running(api, "a")
    r = api.call(
        "admin",
        "PUT",
        "/v1/sessions/lab/vms/a/adjustments/user",
        json={"set": {"egress": {"rate": "fast"}}},
    )
    assert r.status_code == 422
    assert r.json()["fields"][0]["field"] == "set.egress.rate"
    r = api.call(
        "admin", "PUT", "/v1/sessions/lab/vms/a/adjustments/user", json={"profile": "nope"}
    )
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "profile"
    r = api.call(
        "admin",
        "PUT",
        "/v1/sessions/lab/vms/a/adjustments/user",
        json={"set": {"egress.rate": "5Mbit"}, "for": "soon"},
    )
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "for"
    r = api.call(
        "admin",
        "PUT",
        "/v1/sessions/lab/vms/a/adjustments/user",
        json={"set": {"egress.rate": "5Mbit"}, "for": "0s"},
    )
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "for"
    r = api.call(
        "admin", "PUT", "/v1/sessions/lab/vms/a/adjustments/robot", json={"set": {"mtu": 1400}}
    )
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "source"
    assert api.manager.runtime.adjustments("lab") == []
    assert api.manager.runtime.audit("lab") == []
    assert rate(api, "a") == "20Mbit"


def test_reader_cannot_adjust(api: Api) -> None:
    running(api, "a")
    r = api.call(
        "reader",
        "PUT",
        "/v1/sessions/lab/vms/a/adjustments/user",
        json={"set": {"egress.rate": "5Mbit"}},
    )
    assert r.status_code == 403
    assert rate(api, "a") == "20Mbit"


def test_failed_live_change_keeps_what_the_vm_ran(api: Api) -> None:
    running(api, "a")
    api.driver.fail_on.add("a")
    r = api.call("admin", "PATCH", "/v1/profiles/campus", json={"egress": {"rate": "30Mbit"}})
    assert r.status_code == 200  # the profile is stored; the VM says why it did not follow
    (change,) = r.json()["changes"]
    assert "fails on purpose" in change["error"]
    assert rate(api, "a") == "20Mbit"
    vm = api.manager.service.get_vm("lab", "a")
    assert vm.state == "running"
    api.driver.fail_on.clear()
    (retry,) = api.manager.reapply()
    assert retry.error is None and rate(api, "a") == "30Mbit"


def _rate(text: str) -> object:
    return parse_profile_document({"name": "x", "egress": {"rate": text}}).values["egress.rate"]


def test_invalid_patch_document_names_the_field() -> None:
    from vnic.model.patch import typed_patch

    with pytest.raises(InvalidInput) as exc:
        typed_patch({"egress.delay": "fast"})
    assert exc.value.errors[0].path == "set.egress.delay"


def test_change_the_driver_cannot_honour_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    from vnic.drivers.fake import FakeDriver
    from vnic.model.fields import FIELDS
    from vnic.model.launch import Capabilities

    class NoDelay(FakeDriver):
        def capabilities(self) -> Capabilities:
            return Capabilities(
                "fake", frozenset(FIELDS) - {"egress.delay"}, {"egress.delay": "netem"}
            )

    for api in make_api(tmp_path):
        api.manager.agent.drivers["fake"] = NoDelay()  # type: ignore[attr-defined]
        api.driver = api.manager.agent.drivers["fake"]  # type: ignore[attr-defined]
        running(api, "a")
        r = api.call("admin", "PATCH", "/v1/profiles/campus", json={"egress": {"delay": "5ms"}})
        assert r.status_code == 422, r.text
        assert "egress.delay" in r.json()["fields"][0]["expected"]
        assert api.manager.service.get_profile("campus").revision == 1
        r = api.call(
            "admin", "PATCH", "/v1/sessions/lab/vms/a", json={"patch": {"egress": {"delay": "5ms"}}}
        )
        assert r.status_code == 422
        assert api.manager.service.get_vm("lab", "a").override_patch is None
        r = api.call(
            "admin",
            "PUT",
            "/v1/sessions/lab/vms/a/adjustments/user",
            json={"set": {"egress.delay": "5ms"}},
        )
        assert r.status_code == 422
        assert api.manager.runtime.adjustments("lab") == []


def test_session_down_forgets_every_vm_of_the_session(api: Api) -> None:
    """Regression: the agent's desired state once kept all but the first VM of a session
    torn down (a generator inside any() stopped at the first removal)."""
    running(api, "a", "b")
    api.call("admin", "POST", "/v1/sessions/lab/vms", json={"name": "c", "launch": True})
    assert api.call("admin", "POST", "/v1/sessions/lab/down").status_code == 200
    assert api.manager.agent.desired() == []  # type: ignore[attr-defined]
    assert api.driver.running("lab") == []
