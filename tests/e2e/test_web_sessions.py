"""The sessions pages in a browser, on a real netns session: an admin launches VMs from
the session page, sees where each field came from and a refused override next to its
field; the live view's rate follows iperf3 to the profile's rate; the audit page lists
a runtime change; a reader sees no buttons and the API refuses them; a session of 200
VMs shows all 200 (how fast it renders is measured by ``vnic bench ui``, not here)."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.e2e.conftest import Client
from tests.e2e.web import Web, browser, screenshot, wait_rendered, web  # noqa: F401
from tests.netns.conftest import leftovers
from vnic.drivers.netns import NetnsDriver
from vnic.lab import measure

RATE = 20_000_000  # bit/s, both ways
BIG = 200


def card_value(page: Any, vm: str, key: str) -> float | None:
    text = page.get_attribute(f'.live-card[data-vm="{vm}"]', f"data-{key}")
    return float(text) if text else None


def test_sessions_pages_on_a_real_session(web: Web, session_name: str) -> None:  # noqa: F811
    admin = web.admin
    s = session_name
    big = f"{s}big"
    admin("POST", "/v1/profiles", 201, json={
        "name": "p20",
        "egress": {"rate": "20Mbit", "delay": "2ms"},
        "ingress": {"rate": "20Mbit", "delay": "2ms"},
    })  # fmt: skip
    admin("POST", "/v1/sessions", 201, json={"name": s, "default_profile": "p20"})
    admin("POST", f"/v1/sessions/{s}/vms", 201, json={"name": "a"})
    try:
        page = web.page()
        page.goto(f"{web.url}/#/sessions")
        wait_rendered(page, "/sessions")
        page.click(f'tr[data-session="{s}"] a')
        wait_rendered(page, f"/sessions/{s}")
        assert page.inner_text('[data-policy="default"]') == "p20", page.inner_text("main")

        # Launch the defined VM with its button; add and launch a second with the form.
        page.click('tr[data-vm="a"] button[data-action="launch"]')
        page.wait_for_selector('tr[data-vm="a"][data-state="running"]', timeout=30000)
        page.fill('#add-vm input[name="name"]', "b")
        page.click('#add-vm button[value="launch"]')
        page.wait_for_selector('tr[data-vm="b"][data-state="running"]', timeout=30000)
        assert "p20 r1" in page.inner_text('tr[data-vm="a"] td.profile')

        # Where each field came from.
        page.click('tr[data-vm="a"] button[data-action="explain"]')
        rate_row = page.locator('tr[data-explain="egress.rate"]')
        assert "20Mbit" in rate_row.inner_text() and "session-default" in rate_row.inner_text()

        # A bad override is refused next to its field.
        page.click('tr[data-vm="a"] button[data-action="override"]')
        page.fill('form[data-override="a"] input[name="egress.rate"]', "fast")
        page.click('form[data-override="a"] button[type="submit"]')
        error = page.locator('[data-field="patch.egress.rate"] .field-error')
        error.wait_for()
        assert "a rate such as" in error.inner_text()
        screenshot(page, "session")

        # The live view: the sender's rate rises to the profile's while iperf3 runs.
        ips = {v["name"]: v["ipv4"] for v in admin("GET", f"/v1/sessions/{s}/vms")}
        page.goto(f"{web.url}/#/sessions/{s}/live")
        wait_rendered(page, f"/sessions/{s}/live")
        page.wait_for_selector('.live-card[data-vm="a"][data-samples]')
        assert card_value(page, "a", "egress-limit-bps") == RATE
        assert card_value(page, "a", "configured-delay-s") == 0.004
        result: dict[str, Any] = {}
        flow = threading.Thread(
            target=lambda: result.update(t=measure.iperf3(s, "a", "b", ips["b"], seconds=6, omit=1))
        )
        flow.start()
        seen: list[float] = []
        started = time.monotonic()
        shot = False
        while time.monotonic() < started + 10 and flow.is_alive():
            rate = card_value(page, "a", "egress-bps")
            if rate is not None:
                seen.append(rate)
            if not shot and time.monotonic() > started + 5:
                screenshot(page, "session-live")  # the charts after some seconds of flow
                shot = True
            time.sleep(0.25)
        flow.join(timeout=20)
        assert not flow.is_alive()
        near = [r for r in seen if abs(r - RATE) / RATE < 0.15]
        print(f"\nlive egress rate of the sender (bit/s): max {max(seen):.0f}, {len(near)} near")
        assert near and max(seen) < RATE * 1.15, seen
        assert abs(result["t"].bits_per_second - RATE) / RATE < 0.15, result["t"]

        # A runtime change arrives in the live view's list, then in the audit log.
        admin(
            "PUT",
            f"/v1/sessions/{s}/vms/b/adjustments/user",
            json={"set": {"egress": {"rate": "5Mbit"}}, "reason": "slow b down"},
        )
        entry = page.locator("table.audit tr[data-audit]").first
        entry.wait_for(timeout=10000)
        assert "slow b down" in entry.inner_text()
        page.goto(f"{web.url}/#/audit")
        wait_rendered(page, "/audit")
        first = page.locator("table.audit tbody tr").first
        assert "slow b down" in first.inner_text() and "5Mbit" in first.inner_text()
        screenshot(page, "audit")
        page.context.close()

        # A reader sees no buttons, and the API refuses a reader's launch.
        reader_page = web.page(web.reader_secret)
        reader_page.goto(f"{web.url}/#/sessions/{s}")
        wait_rendered(reader_page, f"/sessions/{s}")
        assert reader_page.locator("button[data-action=launch]").count() == 0
        assert reader_page.locator("button[data-action=destroy]").count() == 0
        assert reader_page.locator("#add-vm").count() == 0
        reader = Client(web.url, web.reader_secret)
        reader("POST", f"/v1/sessions/{s}/vms/a/destroy", 403)
        reader("POST", f"/v1/sessions/{s}/vms", 403, json={"name": "c", "launch": True})
        reader_page.context.close()

        # 200 defined VMs: the session page shows every one (its speed: vnic bench ui).
        admin("POST", "/v1/sessions", 201, json={"name": big, "default_profile": "p20"})
        for i in range(BIG):
            admin("POST", f"/v1/sessions/{big}/vms", 201, json={"name": f"vm{i:03d}"})
        page = web.page()
        page.evaluate("location.hash = '#/sessions'")
        wait_rendered(page, "/sessions")
        page.evaluate(f"location.hash = '#/sessions/{big}'")
        wait_rendered(page, f"/sessions/{big}")
        assert page.locator("table.vms tbody tr[data-vm]").count() == BIG
        page.context.close()
    finally:
        for name in (s, big):
            web.admin.http.delete(f"/v1/sessions/{name}", params={"force": True})
        NetnsDriver().teardown_session(s)
        assert leftovers(big) == []  # the fixture checks the first session


def test_a_page_that_answers_late_does_not_replace_a_newer_page(web: Web) -> None:  # noqa: F811
    """Log in (the profiles page starts loading), go to the sessions page before the
    profiles answer comes: when it comes, the sessions page stays. (The browser tests
    log in and navigate at once, which is how this race first showed, in CI.)"""
    web.admin("POST", "/v1/sessions", 201, json={"name": "late"})
    context = web.browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15000)
    held: list[Any] = []
    page.route("**/v1/profiles", lambda route: held.append(route))
    page.goto(web.url + "/#/profiles")
    page.fill("#token", web.admin_secret)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#logout")
    page.goto(f"{web.url}/#/sessions")
    wait_rendered(page, "/sessions")
    for _ in range(750):  # until the held profiles request reaches the handler (15 s)
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the profiles page never asked for /v1/profiles"
    with page.expect_response("**/v1/profiles"):
        held[0].continue_()
    from playwright.sync_api import TimeoutError as StayedOut

    try:
        page.wait_for_selector('body[data-page="/profiles"]', state="attached", timeout=1500)
    except StayedOut:
        pass
    else:
        raise AssertionError("the profiles page, answered late, replaced the sessions page")
    assert page.locator('tr[data-session="late"]').count() == 1
    context.close()


def test_session_page_shows_networks_and_every_vnic(web: Web, session_name: str) -> None:  # noqa: F811
    """A VM with two vNICs on two networks: the session page lists both networks and a
    row per vNIC with its own profile, explain answers per vNIC, and the live view draws a
    card per vNIC with its own limit."""
    admin = web.admin
    s = session_name
    for name, rate in (("p20", "20Mbit"), ("p40", "40Mbit")):
        admin("POST", "/v1/profiles", 201, json={
            "name": name, "egress": {"rate": rate}, "ingress": {"rate": rate},
        })  # fmt: skip
    admin("POST", "/v1/sessions", 201, json={"name": s, "default_profile": "p20"})
    admin(
        "POST", f"/v1/sessions/{s}/networks", 201, json={"name": "data", "default_profile": "p40"}
    )
    admin("POST", f"/v1/sessions/{s}/vms", 201, json={
        "name": "a", "nics": [{"network": "default"}, {"network": "data"}], "launch": True,
    })  # fmt: skip
    try:
        page = web.page()
        page.goto(f"{web.url}/#/sessions/{s}")
        wait_rendered(page, f"/sessions/{s}")
        assert page.locator("table.networks tr[data-network]").count() == 2
        assert "p40" in page.inner_text('table.networks tr[data-network="data"]')
        assert "p20 r1" in page.inner_text('tr[data-vm="a"] td.profile')
        eth1 = 'tr.nic-row[data-of-vm="a"][data-nic="eth1"]'
        assert "p40 r1" in page.inner_text(f"{eth1} td.profile")
        assert "data" in page.inner_text(eth1)
        assert "40Mbit / 40Mbit" in page.inner_text(eth1)
        page.click(f'{eth1} button[data-action="explain"]')
        rate_row = page.locator('table.explain[data-nic="eth1"] tr[data-explain="egress.rate"]')
        rate_row.wait_for()
        assert "40Mbit" in rate_row.inner_text() and "network data" in rate_row.inner_text()
        screenshot(page, "session-nics")

        page.goto(f"{web.url}/#/sessions/{s}/live")
        wait_rendered(page, f"/sessions/{s}/live")
        for nic, limit in (("eth0", 20e6), ("eth1", 40e6)):
            card = f'.live-card[data-vm="a"][data-nic="{nic}"]'
            page.wait_for_selector(f"{card}[data-samples]")
            assert float(page.get_attribute(card, "data-egress-limit-bps") or 0) == limit
    finally:
        web.admin.http.delete(f"/v1/sessions/{s}", params={"force": True})
        NetnsDriver().teardown_session(s)
