"""The UI's login: a wrong token is refused next to the field; a right one shows who is
logged in; logging out forgets the cookie."""

from __future__ import annotations

from tests.e2e.web import Web, wait_rendered
from tests.e2e.web import browser as browser
from tests.e2e.web import web as web


def test_login_refuses_a_wrong_token_and_remembers_a_right_one(web: Web) -> None:
    context = web.browser.new_context()
    page = context.new_page()
    page.goto(web.url + "/")
    page.fill("#token", "vnic_not-a-token")
    page.click("#login button[type=submit]")
    error = page.locator('[data-field="token"] .field-error')
    error.wait_for()
    assert "a token this manager issued" in error.inner_text()
    page.fill("#token", web.reader_secret)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#logout")
    assert "watcher (reader)" in page.inner_text("#who")
    wait_rendered(page, "/profiles")
    page.reload()  # the cookie keeps the login
    page.wait_for_selector("#logout")
    page.click("#logout")
    page.wait_for_selector("#login")
    page.reload()
    page.wait_for_selector("#login")
    context.close()
