"""What the service takes and returns: plain frozen dataclasses, never ORM rows.

:class:`VmRequest` is the one input (a VM to add); the others are results. Their
JSON shapes, shared by the API and the CLI, are in :mod:`vnic.manager.views`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vnic.model.network import NicSpec
from vnic.model.resolve import Effective
from vnic.model.session import Policy


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    description: str
    labels: Mapping[str, str]
    revision: int
    document: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    users: Sequence[str] = ()


@dataclass(frozen=True)
class RevisionInfo:
    revision: int
    created_at: datetime
    document: Mapping[str, Any]


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_profiles`` did to one profile: created, updated or unchanged."""

    name: str
    action: str
    revision: int


@dataclass(frozen=True)
class NetworkInfo:
    """One network of a session. ``default_profile``: its own (None: the session's
    applies); ``nics``: the vNICs on it, as ``VM/NIC``."""

    session: str
    name: str
    network_id: int
    ipv4: str
    ipv6: str
    default_profile: str | None = None
    nics: Sequence[str] = ()


@dataclass(frozen=True)
class SessionInfo:
    name: str
    network_id: int
    policy: Policy
    vms: Sequence[str]
    created_at: datetime
    owner: str | None = None
    networks: Sequence[str] = ("default",)
    #: Where its VMs go among many hosts (:class:`vnic.model.placement.Constraint` as a
    #: document); None: spread over any host.
    placement: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class NicInfo:
    """One vNIC of a VM: its network, identity and its own override."""

    name: str
    network: str
    network_id: int
    mac: str | None
    ipv4: str | None
    ipv6: str | None
    override_profile: str | None = None
    override_patch: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class VmInfo:
    session: str
    name: str
    role: str | None
    labels: Mapping[str, str]
    needs: Sequence[str]
    override_profile: str | None
    override_patch: Mapping[str, Any] | None
    mac: str | None
    state: str
    ipv4: str | None = None
    ipv6: str | None = None
    #: The driver a running VM was launched with (netns, qemu); None while defined.
    driver: str | None = None
    #: Every vNIC, eth0 first (``mac``, ``ipv4``, ``ipv6``, ``override_*`` above are eth0's).
    nics: Sequence[NicInfo] = ()
    #: The hypervisor host it is placed on; None: the manager's own agent.
    host: str | None = None


@dataclass(frozen=True)
class Explanation:
    """A VM's effective profile: ``effective`` is eth0's, ``nics`` maps every vNIC's
    name to its own (eth0 first)."""

    vm: VmInfo
    effective: Effective
    nics: Mapping[str, Effective] = field(default_factory=dict)


@dataclass(frozen=True)
class VmChange:
    """What a live change did to one running VM.

    ``fields`` maps each changed field path to ``(old, new)`` in document form
    (None = unset); ``sources`` names the layer each new value came from;
    ``kernel`` has one line per kernel object the driver changed (in the VM's
    change of all its vNICs); ``error`` is set when the driver refused or failed
    (the VM then runs what it ran before).
    """

    session: str
    vm: str
    fields: Mapping[str, tuple[Any, Any]]
    sources: Mapping[str, str] = field(default_factory=dict)
    kernel: Sequence[str] = ()
    error: str | None = None
    revisions: Mapping[str, int] = field(default_factory=dict)
    #: The vNIC changed (one VmChange per changed vNIC of a VM).
    nic: str = "eth0"


@dataclass(frozen=True)
class VmRequest:
    """A request to add a VM: facts for the rules plus an optional override.

    Without ``nics`` the VM gets ``eth0`` on ``default`` with ``profile``/``patch`` as
    its override. With ``nics`` (eth0 first) each vNIC has its own network and
    override, and ``profile``/``patch`` must be unset (refused: one place says what a
    vNIC gets).
    """

    session: str
    name: str
    role: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    needs: Sequence[str] = ()
    profile: str | None = None
    patch: Mapping[str, Any] | None = None
    nics: Sequence[NicSpec] = ()


@dataclass(frozen=True)
class LaunchOutcome:
    """One VM of a parallel launch: seconds taken, or the error that stopped it."""

    vm: str
    seconds: float
    error: str | None = None
