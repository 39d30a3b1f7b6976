"""Request and response schemas of the REST API, one per operation (create / update / public).

These exist for the OpenAPI document and for shape checks at the door
(a string where a string goes). Field *values* are validated by
:mod:`vnic.model` through the service, the same path the CLI uses, so a bad
rate or an unknown profile field is refused with the same message either way.
Profile documents are free-form objects here for that reason: their fields
are described in ``docs/profiles.md`` and refused, field by field, by the model.

Update schemas keep "omitted" apart from ``null``: the handler reads
``model_fields_set``, so an omitted key leaves a value unchanged and
``null`` removes it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vnic.model.command import (
    ARGV_BYTES_MAX,
    ARGV_ITEMS_MAX,
    OUTPUT_DEFAULT,
    OUTPUT_MAX,
    TIMEOUT_DEFAULT,
    TIMEOUT_MAX,
)
from vnic.model.limits import ASSIGNMENT_RULES_MAX

Document = dict[str, Any]


class _Strict(BaseModel):
    # strict: no coercion at the door. Lax pydantic reads ``network_id: true`` as 1,
    # ``"1"`` as 1 and ``"yes"`` as True; a request says what it means or is refused.
    model_config = ConfigDict(extra="forbid", strict=True)


# ----------------------------------------------------------------------------- profiles


class FieldChangePublic(BaseModel):
    old: Any = None
    new: Any = None
    source: str = Field(default="", description="The layer the new value came from")


class VmChangePublic(BaseModel):
    session: str
    vm: str
    fields: dict[str, FieldChangePublic] = Field(description="Changed fields, old and new")
    kernel: list[str] = Field(description="One line per kernel object changed in place")
    error: str | None = Field(default=None, description="Why the change did not reach the VM")
    nic: str = Field(default="eth0", description="The vNIC changed (one entry per vNIC)")


def _changes() -> Any:
    return Field(
        default_factory=list, description="Running VMs this request changed, live (write requests)"
    )


class ProfilePublic(BaseModel):
    name: str
    revision: int
    description: str
    labels: dict[str, str]
    document: Document
    created_at: datetime
    updated_at: datetime
    used_by: list[str]


class ProfileChanged(ProfilePublic):
    changes: list[VmChangePublic] = _changes()


class RevisionPublic(BaseModel):
    revision: int
    created_at: datetime
    document: Document


class ApplyResultPublic(BaseModel):
    name: str
    action: Literal["created", "updated", "unchanged"]
    revision: int
    changes: list[VmChangePublic] = _changes()


# ----------------------------------------------------------------------------- sessions


class SessionCreate(_Strict):
    name: str
    default_profile: str | None = None
    rules: list[Document] = Field(
        default_factory=list,
        max_length=ASSIGNMENT_RULES_MAX,
        description="Ordered assignment rules: {profile, name (glob), role, labels, needs}",
    )
    network_id: int | None = Field(default=None, description="VNI 1..16777215; default lowest free")
    overrides_allowed: bool = True
    owner: str | None = Field(default=None, description="Name of the owner token")
    placement: Document | None = Field(
        default=None,
        description='Where its VMs go among hosts: {"strategy": "spread"|"pack", "labels": {...}}',
    )


class SessionUpdate(_Strict):
    default_profile: str | None = None
    rules: list[Document] | None = Field(default=None, max_length=ASSIGNMENT_RULES_MAX)
    overrides_allowed: bool | None = None
    owner: str | None = None
    placement: Document | None = None


class SessionPublic(BaseModel):
    name: str
    network_id: int
    default_profile: str | None
    rules: list[Document]
    overrides_allowed: bool
    owner: str | None
    vms: list[str]
    networks: list[str] = Field(default_factory=list, description="Its networks, default first")
    placement: Document | None = Field(default=None, description="null: spread, any host")
    created_at: datetime


class SessionChanged(SessionPublic):
    changes: list[VmChangePublic] = _changes()


# ----------------------------------------------------------------------------- networks


class NetworkCreate(_Strict):
    name: str
    network_id: int | None = Field(
        default=None, description="VNI 1..16777215, unique across all networks; default lowest free"
    )
    ipv4: str | None = Field(
        default=None, description="IPv4 subnet (CIDR, /8../24); default derived from network_id"
    )
    ipv6: str | None = Field(
        default=None, description="IPv6 subnet (CIDR, /8../120); default derived from network_id"
    )
    default_profile: str | None = Field(
        default=None, description="Default profile of its vNICs; default: the session's"
    )


class NetworkPublic(BaseModel):
    session: str
    name: str
    network_id: int
    ipv4: str
    ipv6: str
    default_profile: str | None
    nics: list[str] = Field(description="The vNICs on it, as VM/NIC")


# ----------------------------------------------------------------------------- VMs


class NicCreate(_Strict):
    network: str = Field(default="default", description="A network of the VM's session")
    profile: str | None = Field(default=None, description="The vNIC's override profile")
    patch: Document | None = Field(
        default=None, description="The vNIC's override fields, a profile document"
    )


class VmCreate(_Strict):
    name: str
    role: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    needs: list[str] = Field(default_factory=list)
    profile: str | None = Field(
        default=None, description="Override profile (of eth0; not with nics)"
    )
    patch: Document | None = Field(
        default=None, description="Override fields, a profile document (of eth0; not with nics)"
    )
    nics: list[NicCreate] | None = Field(
        default=None,
        description="The vNICs, eth0 first (at most 8); default: eth0 on default",
    )
    launch: bool = Field(default=False, description="Launch the VM right away")
    driver: str | None = Field(
        default=None, description="Driver to launch with (netns, qemu); default: the agent's"
    )
    host: str | None = Field(
        default=None, description="Host to launch on (once hosts are added); default: placed"
    )


class VmLaunch(_Strict):
    driver: str | None = Field(
        default=None, description="Driver to launch with (netns, qemu); default: the agent's"
    )
    host: str | None = Field(
        default=None, description="Host to launch on (once hosts are added); default: placed"
    )


class NicUpdate(_Strict):
    profile: str | None = None
    patch: Document | None = Field(
        default=None, description="Merged into the vNIC's override patch (RFC 7386: null removes)"
    )


class VmUpdate(_Strict):
    role: str | None = None
    labels: dict[str, str] | None = None
    needs: list[str] | None = None
    profile: str | None = None
    patch: Document | None = Field(
        default=None, description="Merged into the override patch (RFC 7386: null removes)"
    )


class VmExec(_Strict):
    # The bounds are checked by the model (vnic.model.command), as for the CLI: here only
    # the shape, and what they are, for the document.
    argv: list[str] = Field(
        description=f"The program and its arguments: 1 to {ARGV_ITEMS_MAX} items, at most "
        f"{ARGV_BYTES_MAX} bytes in all, no NUL"
    )
    timeout: float = Field(
        default=TIMEOUT_DEFAULT,
        description=f"Seconds before the command is killed (more than 0, at most {TIMEOUT_MAX:g})",
    )
    max_output: int = Field(
        default=OUTPUT_DEFAULT,
        description=f"Bytes kept of each of stdout and stderr (0 to {OUTPUT_MAX})",
    )


class ExecResultPublic(BaseModel):
    returncode: int | None = Field(
        description="Exit status (-N: ended by signal N); null when killed at the timeout"
    )
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(description="stdout was cut at max_output bytes")
    stderr_truncated: bool = Field(description="stderr was cut at max_output bytes")
    timed_out: bool = Field(description="The command was killed at its timeout")


class VmLink(_Strict):
    up: bool = Field(description="The NIC's link: true up, false down (the guest sees carrier)")
    nic: str = Field(default="eth0", description="The vNIC (eth0..eth7)")


class NicPublic(BaseModel):
    name: str
    network: str
    network_id: int
    mac: str | None
    ipv4: str | None
    ipv6: str | None
    override_profile: str | None
    override_patch: Document | None


class VmPublic(BaseModel):
    session: str
    name: str
    role: str | None
    labels: dict[str, str]
    needs: list[str]
    override_profile: str | None = Field(description="eth0's")
    override_patch: Document | None = Field(description="eth0's")
    mac: str | None = Field(description="eth0's")
    ipv4: str | None = Field(description="eth0's")
    ipv6: str | None = Field(description="eth0's")
    state: str
    driver: str | None = Field(
        default=None, description="Driver the running VM was launched with (netns, qemu)"
    )
    nics: list[NicPublic] = Field(default_factory=list, description="Every vNIC, eth0 first")
    host: str | None = Field(
        None, description="The hypervisor host it is placed on (null: the manager's own agent)"
    )


class SourcePublic(BaseModel):
    layer: str
    detail: str


class FieldPublic(BaseModel):
    value: Any = None
    source: SourcePublic


class EffectivePublic(BaseModel):
    revisions: dict[str, int]
    fields: dict[str, FieldPublic]


class NicExplained(NicPublic):
    effective: EffectivePublic


class ExplanationPublic(BaseModel):
    vm: VmPublic
    effective: EffectivePublic = Field(description="eth0's")
    nics: list[NicExplained] = Field(default_factory=list, description="Every vNIC's, eth0 first")


class NicChanged(NicExplained):
    changes: list[VmChangePublic] = _changes()


class ExplanationChanged(ExplanationPublic):
    changes: list[VmChangePublic] = _changes()


# ----------------------------------------------------------------------------- other


class DriverPublic(BaseModel):
    agent: str
    kind: str
    fields: list[str]
    missing: dict[str, str]
    max_nics: int = Field(default=1, description="How many vNICs one VM may have on it")
    max_nics_why: str = Field(default="", description="Why no more")


class TokenCreate(_Strict):
    name: str
    role: Literal["admin", "owner", "reader"]


class TokenPublic(BaseModel):
    name: str
    role: str
    created_at: datetime


class TokenCreated(TokenPublic):
    secret: str = Field(description="The token; shown only in this response")


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ReconcilePublic(BaseModel):
    reapplied: dict[str, list[str]] = Field(description="VM -> differences that made it rebuilt")
    removed: list[str] = Field(description="VMs and sessions removed: nobody desired them")
    failed: dict[str, str] = Field(description="VM -> why it could not be rebuilt")
    drift: dict[str, list[str]] = Field(description="VM -> differences left after the pass")
