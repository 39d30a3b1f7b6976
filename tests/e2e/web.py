"""Browser-test helpers: a `vnic serve` of the test's own, driven by Playwright through
Debian's Chromium (headless; installed by scripts/install.sh, no browser download).

Screenshots the tests take land in ``docs/screenshots/`` (linked from the README).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Client, Server, admin_token, vnic

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Debian's chromium is missing; scripts/install.sh installs it")


@dataclass
class Web:
    """A running manager, its admin API client, tokens, and the browser."""

    server: Server
    admin: Client
    admin_secret: str
    reader_secret: str
    browser: Any

    @property
    def url(self) -> str:
        return self.server.url

    def page(self, secret: str | None = None) -> Any:
        """A fresh browser page, logged in with ``secret`` (admin's by default)."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.set_default_timeout(15000)
        page.goto(self.url + "/")
        page.fill("#token", secret or self.admin_secret)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#logout")
        return page


def wait_rendered(page: Any, path: str) -> int:
    """Wait until the app has rendered the page at hash ``path``; its render time in ms."""
    # A selector, not wait_for_function: that evaluates a string in the page, which the
    # UI's Content-Security-Policy (no 'unsafe-eval') refuses.
    page.wait_for_selector(f'body[data-page="{path}"]', state="attached")
    return int(page.get_attribute("body", "data-render-ms"))


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def web(tmp_path: Path, browser: Any) -> Iterator[Web]:
    home = tmp_path
    server = Server(home, "serve", "--latency-interval", "1", "--drift-interval", "5")
    secret = admin_token(home)
    reader = vnic(home, "token", "create", "watcher", "--role", "reader").split(": ")[-1].strip()
    server.start()
    try:
        yield Web(server, Client(server.url, secret), secret, reader, browser)
    finally:
        server.kill()
