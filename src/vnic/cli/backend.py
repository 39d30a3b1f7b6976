"""The two sides a ``vnic`` command can work on, with the same methods: :class:`Embedded`
(the database and this host's agent, in this process) and :class:`Remote` (a running
manager, ``--server``, over HTTP). Commands call these methods and never ask which side
they have.

``service`` is :class:`~vnic.manager.service.Service` or the
:class:`~vnic.client.manager.ManagerClient` that mirrors it; tokens, live statistics
and the runtime operations (:class:`~vnic.api.live.LiveOps`) are what the manager's
client offers besides the service's methods, and :class:`Embedded` offers them too.
So are a command run in a VM, a guest's link and the host's report (``vnic vm exec``,
``vnic vm link``, ``vnic doctor``): :class:`Embedded` asks this host's agent through
the agent port (the manager's use cases, :class:`~vnic.manager.dispatch.Manager`, on
the embedded service), :class:`Remote` the manager's, which asks its agent.

``vnic vm exec`` embedded keeps the caller's terminal: the command runs in this
process's agent with this terminal and streams its output; only there is a terminal
to give it. With ``--server`` the output is captured by the
manager's agent and printed when the command ends.

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
    from collections.abc import Sequence

    from vnic.agent.port import AgentPort
    from vnic.api.live import LiveOps
    from vnic.client.manager import ManagerClient, RemoteLive
    from vnic.manager.auth import TokenInfo, Tokens
    from vnic.manager.dispatch import Manager
    from vnic.model.command import ExecResult

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

    def exec_in_vm(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float,
        driver: str | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the running VM. Embedded, the command gets this terminal: its
        output is not captured (the result's is empty) and ``timeout`` does not apply;
        ``driver`` is the driver kind to run it with (default: the one that launched it).
        With ``--server`` its output is captured and it is killed after ``timeout``
        seconds; ``driver`` is refused there."""
        ...

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        """Set the link of the running QEMU guest's vNIC ``nic`` up or down."""
        ...

    def doctor(self) -> dict[str, Any]:
        """The agent's host report (``vnic doctor --json``)."""
        ...


class Embedded:
    """No manager: the service on the database, its tokens, this host's agent."""

    def __init__(self, service: Service | None = None, database_url: str = "") -> None:
        """On ``service``, or on the database at ``database_url``, opened when first used
        (``vnic doctor`` needs none)."""
        self._opened = service
        self._database_url = database_url

    @classmethod
    def open(cls, database_url: str) -> Embedded:
        return cls(database_url=database_url)

    @property
    def _service(self) -> Service:
        if self._opened is None:
            self._opened = Service(Database(self._database_url))
        return self._opened

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
        from vnic.api.live import LiveOps

        return LiveOps(self._manager())

    def _manager(self, agent: AgentPort | None = None) -> Manager:
        """The manager's use cases on ``agent`` (default: this host's)."""
        from vnic.agent.core import local_agent
        from vnic.manager.dispatch import Manager

        agent = agent or local_agent("netns")
        return Manager(self._service, self._tokens(), agent)

    def exec_in_vm(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float,
        driver: str | None = None,
    ) -> ExecResult:
        from vnic.agent.core import local_agent
        from vnic.model.command import ExecResult

        agent = local_agent("netns")
        self._manager(agent).running_vm(session, vm)
        return ExecResult(agent.exec_attached(session, vm, argv, driver))

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        self._manager().set_link(session, vm, up, nic)

    def doctor(self) -> dict[str, Any]:
        from vnic.agent.core import local_agent

        return local_agent("netns").doctor()


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

    def exec_in_vm(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float,
        driver: str | None = None,
    ) -> ExecResult:
        # No terminal reaches the manager's agent: the output is captured.
        if driver is not None:
            from vnic.errors import InvalidInput

            raise InvalidInput.one(
                "--driver", driver, "none with --server: the VM runs on the driver it launched with"
            )
        return self._client.exec_in_vm(session, vm, argv, timeout=timeout)

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        self._client.set_link(session, vm, up, nic)

    def doctor(self) -> dict[str, Any]:
        return self._client.doctor()
