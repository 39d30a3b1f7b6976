"""The hosts page in a browser: hosts added through the API, one registered by its agent's
token (ready, with its capacity and labels); an admin cordons, uncordons and drains with
the page's buttons; a reader sees the hosts and no buttons, and the API refuses them."""

from __future__ import annotations

import httpx

from tests.e2e.web import Web, browser, screenshot, wait_rendered, web  # noqa: F401


def test_hosts_page(web: Web) -> None:  # noqa: F811
    admin = web.admin
    token = admin("POST", "/v1/hosts", 201, json={"name": "hv1", "labels": {"rack": "a"}})["token"]
    admin("POST", "/v1/hosts", 201, json={"name": "hv2"})
    # hv1's agent registers (what vnic agent --manager does first).
    answer = httpx.post(
        f"{web.url}/v1/agent/register",
        headers={"Authorization": f"Bearer {token}"},
        json={"host": "hv1", "underlay": "10.250.0.11", "capacity": {"vnics": 16, "cpus": 2}},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text

    page = web.page()
    page.goto(f"{web.url}/#/hosts")
    wait_rendered(page, "/hosts")
    assert page.get_attribute('tr[data-host="hv1"]', "data-state") == "ready"
    assert page.get_attribute('tr[data-host="hv2"]', "data-state") == "new"
    hv1 = page.inner_text('tr[data-host="hv1"]')
    assert "10.250.0.11" in hv1 and "0 / 16" in hv1 and "rack=a" in hv1

    page.click('tr[data-host="hv1"] button[data-action="cordon"]')
    page.wait_for_selector('tr[data-host="hv1"][data-cordoned="yes"]')
    assert "host hv1: cordoned" in page.inner_text("main")
    assert admin("GET", "/v1/hosts/hv1", 200)["cordoned"] is True
    page.click('tr[data-host="hv1"] button[data-action="uncordon"]')
    page.wait_for_selector('tr[data-host="hv1"][data-cordoned="no"]')
    page.click('tr[data-host="hv2"] button[data-action="drain"]')
    page.wait_for_selector('text="host hv2 drained: no VMs ran there"')
    assert admin("GET", "/v1/hosts/hv2", 200)["cordoned"] is True  # a drained host stays cordoned
    screenshot(page, "hosts")

    # A reader sees the hosts, no buttons; the API refuses the reader's cordon.
    reader = web.page(web.reader_secret)
    reader.goto(f"{web.url}/#/hosts")
    wait_rendered(reader, "/hosts")
    assert reader.locator('tr[data-host="hv1"]').count() == 1
    assert reader.locator("button[data-action]").count() == 0
    refused = httpx.post(
        f"{web.url}/v1/hosts/hv1/cordon",
        headers={"Authorization": f"Bearer {web.reader_secret}"},
        timeout=10,
    )
    assert refused.status_code == 403, refused.text
