"""The two sides a ``vnic`` command can work on, with the same methods: :class:`Embedded`
(the database and this host's agent, in this process) and :class:`Remote` (a running
manager, ``--server``, over HTTP). Commands call these methods and never ask which side
they have.

``service`` is :class:`~vnic.manager.service.Service` or the
:class:`~vnic.client.manager.ManagerClient` that mirrors it; tokens, live statistics
and the runtime operations (:class:`~vnic.api.live.LiveOps`) are what the manager's
client offers besides the service's methods, and :class:`Embedded` offers them too.

This module imports the service and SQLAlchemy, so :mod:`vnic.cli.common` imports it
only when a command first needs its backend; the HTTP client (with ``--server``) and the
runtime operations (FastAPI's models) are imported when first used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from vnic.manager.service import Service
from vnic.store.db import Database

if TYPE_CHECKING:
    from vnic.api.live import LiveOps
    from vnic.client.manager import ManagerClient, RemoteLive
    from vnic.manager.auth import TokenInfo, Tokens

#: Per-vNIC samples of a session as plain data (what ``vnic top`` shows).
StatsSource = Callable[[str], list[dict[str, Any]]]


class Backend(Protocol):
    """What a command may ask of either side."""

    @property
    def service(self) -> Service | ManagerClient: ...

    def create_token(self, name: str, role: str) -> tuple[TokenInfo, str]:
        """A new token and its secret (shown once)."""
        ...

    def list_tokens(self) -> list[TokenInfo]: ...

    def revoke_token(self, name: str) -> None: ...

    def stats_source(self, session: str) -> StatsSource:
        """Where ``vnic top`` reads ``session``'s samples (NotFound if there is no session)."""
        ...

    def live(self) -> LiveOps | RemoteLive:
        """The runtime operations: adjustments, audit log, controller, scenarios."""
        ...


class Embedded:
    """No manager: the service on the database, its tokens, this host's agent."""

    def __init__(self, service: Service) -> None:
        self._service = service

    @classmethod
    def open(cls, database_url: str) -> Embedded:
        return cls(Service(Database(database_url)))

    @property
    def service(self) -> Service:
        return self._service

    def _tokens(self) -> Tokens:
        from vnic.manager.auth import Tokens

        return Tokens(self._service.db)

    def create_token(self, name: str, role: str) -> tuple[TokenInfo, str]:
        return self._tokens().create(name, role)

    def list_tokens(self) -> list[TokenInfo]:
        return self._tokens().list()

    def revoke_token(self, name: str) -> None:
        self._tokens().revoke(name)

    def stats_source(self, session: str) -> StatsSource:
        from vnic.agent.core import local_agent

        self._service.get_session(session)
        return local_agent().stats

    def live(self) -> LiveOps:
        from vnic.agent.core import local_agent
        from vnic.api.live import LiveOps
        from vnic.manager.dispatch import Manager

        service = self._service
        return LiveOps(Manager(service, self._tokens(), local_agent("netns")))


class Remote:
    """A running manager (``vnic serve``) through its API."""

    def __init__(self, client: ManagerClient) -> None:
        self._client = client

    @classmethod
    def connect(cls, url: str, token: str | None) -> Remote:
        from vnic.client.manager import ManagerClient

        return cls(ManagerClient(url, token))

    @property
    def service(self) -> ManagerClient:
        return self._client

    def create_token(self, name: str, role: str) -> tuple[TokenInfo, str]:
        return self._client.create_token(name, role)

    def list_tokens(self) -> list[TokenInfo]:
        return self._client.list_tokens()

    def revoke_token(self, name: str) -> None:
        self._client.revoke_token(name)

    def stats_source(self, session: str) -> StatsSource:
        return self._client.stats

    def live(self) -> RemoteLive:
        from vnic.client.manager import RemoteLive

        return RemoteLive(self._client)
