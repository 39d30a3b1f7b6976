"""A manager over a SQLite file with an in-process agent on the fake driver, and a token
per role: the API's unit tier (no root, no kernel)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from vnic.agent.core import Agent
from vnic.api.app import create_app
from vnic.drivers.fake import FakeDriver
from vnic.manager.auth import Tokens
from vnic.manager.dispatch import Manager
from vnic.manager.service import Service
from vnic.store.db import Database
from vnic.web import add_web_routes

#: The host report of the unit tier's agent: the fake driver's, no kernel probe (the
#: netns and e2e tiers get the real one).
FAKE_DOCTOR: dict[str, Any] = {
    "kernel": {"congestion_control": {}},
    "tools_missing": [],
    "drivers": [FakeDriver().capabilities().to_dict()],
    "delay_engine": {"engine": "none", "why": "the fake driver shapes nothing"},
    "qemu": {},
    "vnics": [],
}

RATE_DOC: dict[str, Any] = {
    "name": "campus",
    "description": "a campus link",
    "egress": {"rate": "20Mbit"},
    "ingress": {"rate": "50Mbit", "delay": "5ms"},
}


@dataclass
class Api:
    manager: Manager
    client: TestClient
    driver: FakeDriver
    secrets: dict[str, str]

    def as_(self, who: str) -> dict[str, str]:
        """Headers that authenticate as ``who`` (admin, alice, bob, reader)."""
        return {"Authorization": f"Bearer {self.secrets[who]}"}

    def call(self, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, headers=self.as_(who), **kwargs)


def make_api(tmp_path: Path) -> Iterator[Api]:
    db = Database(f"sqlite:///{tmp_path / 'vnic.db'}")
    driver = FakeDriver(fail_on=["doomed"])
    agent = Agent(
        tmp_path / "agent", {"fake": driver}, default="fake", doctor=lambda: dict(FAKE_DOCTOR)
    )
    manager = Manager(Service(db), Tokens(db), agent)
    tokens = Tokens(db)
    secrets = {
        name: tokens.create(name, role)[1]
        for name, role in (
            ("admin", "admin"),
            ("alice", "owner"),
            ("bob", "owner"),
            ("reader", "reader"),
        )
    }
    # A loopback Host, as a browser or the CLI on this machine sends (the guard refuses others).
    with TestClient(
        create_app(manager, extensions=[add_web_routes]), base_url="http://127.0.0.1"
    ) as client:
        yield Api(manager, client, driver, secrets)
    db.dispose()
