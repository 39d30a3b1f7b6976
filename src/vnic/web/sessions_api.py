"""Endpoints the web UI's sessions pages need beyond the REST API's (none yet)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

if TYPE_CHECKING:
    from vnic.manager.dispatch import Manager


def add_routes(app: FastAPI, manager: Manager) -> None:
    """Register this part's endpoints on the manager's app."""
