"""Database tables (SQLAlchemy 2). The schema is owned by the Alembic migrations in
``migrations/versions``; a test checks that these models and the migrations agree.

Profiles keep every revision: ``profile_revisions.document`` is the canonical
profile document of that revision and never changes once written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ProfileRow(Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    current_revision: Mapped[int] = mapped_column(Integer)
    # The current revision's MAC range, kept here so overlaps are one query.
    mac_first: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mac_last: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    revisions: Mapped[list[ProfileRevisionRow]] = relationship(
        back_populates="profile",
        cascade="all, delete-orphan",
        order_by="ProfileRevisionRow.revision",
    )


class ProfileRevisionRow(Base):
    __tablename__ = "profile_revisions"
    __table_args__ = (
        UniqueConstraint("profile_id", "revision", name="uq_profile_revisions_profile_revision"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[int] = mapped_column(
        ForeignKey("profiles.id", ondelete="CASCADE"), index=True
    )
    revision: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    profile: Mapped[ProfileRow] = relationship(back_populates="revisions")


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    network_id: Mapped[int] = mapped_column(Integer, unique=True)
    default_profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="RESTRICT"), nullable=True
    )
    overrides_allowed: Mapped[bool] = mapped_column(Boolean, default=True)
    # Name of the API token (role "owner") that may run this session's VMs.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The dynamic-adjustment part of the policy: {"rules": [...], "feedback": {...}}
    # as canonical documents (see vnic.controller).
    controller: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Where its VMs go among many hosts: {"strategy": "spread"|"pack", "labels": {...}}
    # (vnic.model.placement); None: spread, any host.
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    default_profile: Mapped[ProfileRow | None] = relationship()
    rules: Mapped[list[AssignmentRuleRow]] = relationship(
        back_populates="session",
        cascade="all, delete-orphan",
        order_by="AssignmentRuleRow.position",
    )
    vms: Mapped[list[VmRow]] = relationship(
        back_populates="session", cascade="all, delete-orphan", order_by="VmRow.name"
    )
    networks: Mapped[list[NetworkRow]] = relationship(
        back_populates="session", cascade="all, delete-orphan", order_by="NetworkRow.id"
    )


class NetworkRow(Base):
    """One network of a session: a bridge in the session namespace, its subnets and an
    optional default profile of its own. ``default`` (every session has it) has the
    session's ``network_id`` and the subnets derived from it. ``network_id`` is unique
    across every network of every session (a VXLAN VNI on the wire)."""

    __tablename__ = "networks"
    __table_args__ = (UniqueConstraint("session_id", "name", name="uq_networks_session_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(32))
    network_id: Mapped[int] = mapped_column(Integer, unique=True)
    # Subnets as text (ipaddress' form, e.g. "10.0.1.0/24").
    ipv4: Mapped[str] = mapped_column(String(18))
    ipv6: Mapped[str] = mapped_column(String(43))
    default_profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="RESTRICT"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    session: Mapped[SessionRow] = relationship(back_populates="networks")
    default_profile: Mapped[ProfileRow | None] = relationship()
    nics: Mapped[list[NicRow]] = relationship(back_populates="network", order_by="NicRow.id")


class AssignmentRuleRow(Base):
    __tablename__ = "assignment_rules"
    __table_args__ = (
        UniqueConstraint("session_id", "position", name="uq_assignment_rules_session_position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id", ondelete="RESTRICT"))
    # The match part of the rule: name glob, role, labels, needs.
    match: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    session: Mapped[SessionRow] = relationship(back_populates="rules")
    profile: Mapped[ProfileRow] = relationship()


class VmRow(Base):
    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("session_id", "name", name="uq_vms_session_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(32))
    role: Mapped[str | None] = mapped_column(String(64), nullable=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    needs: Mapped[list[str]] = mapped_column(JSON, default=list)
    # defined -> (launching -> running -> stopping) ; the data plane issue adds the rest.
    state: Mapped[str] = mapped_column(String(16), default="defined")
    # What the data plane runs: {"driver", "revisions": {profile: rev}, "values": document}
    # of eth0, and "nics": {nic: {"revisions", "values"}} of every vNIC.
    applied: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The hypervisor host it is placed on; None: the manager's own agent (one host).
    host_id: Mapped[int | None] = mapped_column(
        ForeignKey("hosts.id", ondelete="RESTRICT"), nullable=True, index=True
    )

    session: Mapped[SessionRow] = relationship(back_populates="vms")
    host: Mapped[HostRow | None] = relationship()
    nics: Mapped[list[NicRow]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="NicRow.position"
    )
    adjustments: Mapped[list[AdjustmentRow]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="AdjustmentRow.id"
    )


class NicRow(Base):
    """One vNIC of a VM (``eth0`` at position 0, ...): its network, address and override.

    ``host_index`` is its address in its network's subnets (2..254), unique within the
    network; ``override_patch`` is a canonical profile document without name.
    """

    __tablename__ = "vm_nics"
    __table_args__ = (
        UniqueConstraint("vm_id", "name", name="uq_vm_nics_vm_name"),
        UniqueConstraint("network_id", "host_index", name="uq_vm_nics_network_host_index"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(8))
    position: Mapped[int] = mapped_column(Integer)
    # RESTRICT: a network its vNICs use cannot go (the service names them first).
    network_id: Mapped[int] = mapped_column(
        ForeignKey("networks.id", ondelete="RESTRICT"), index=True
    )
    host_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    override_profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="RESTRICT"), nullable=True
    )
    override_patch: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    vm: Mapped[VmRow] = relationship(back_populates="nics")
    network: Mapped[NetworkRow] = relationship(back_populates="nics")
    override_profile: Mapped[ProfileRow | None] = relationship()
    mac: Mapped[MacAllocationRow | None] = relationship(
        back_populates="nic", cascade="all, delete-orphan", uselist=False
    )


class MacAllocationRow(Base):
    """One allocated MAC. The primary key makes a MAC unique across the database."""

    __tablename__ = "mac_allocations"

    mac: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    nic_id: Mapped[int] = mapped_column(ForeignKey("vm_nics.id", ondelete="CASCADE"), unique=True)
    allocated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    nic: Mapped[NicRow] = relationship(back_populates="mac")


class AdjustmentRow(Base):
    """A runtime adjustment of a VM's profile (a resolution layer with an expiry).

    One per vNIC (``nic``, ``eth0`` by default) and ``source`` ("user", "rule:NAME",
    "feedback", "scenario:NAME"):
    a source's newer decision replaces its older one instead of piling up.
    ``profile`` names a profile whose values the layer holds under ``patch``.
    """

    __tablename__ = "runtime_adjustments"
    __table_args__ = (
        UniqueConstraint("vm_id", "nic", "source", name="uq_runtime_adjustments_vm_nic_source"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    nic: Mapped[str] = mapped_column(String(8), default="eth0", server_default="eth0")
    source: Mapped[str] = mapped_column(String(96), default="user", server_default="user")
    profile: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patch: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    vm: Mapped[VmRow] = relationship(back_populates="adjustments")


class TokenRow(Base):
    """An API token. Only the SHA-256 of its secret is stored; the secret is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditRow(Base):
    """One runtime change of a VM's effective profile: when, who or what, why, old and new.

    Not tied to the VM's row by a foreign key: the log outlives the VMs it names.
    ``old``/``new`` map each changed field path to its value as text (None = unset).
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    session: Mapped[str] = mapped_column(String(32), index=True)
    vm: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The vNIC changed, when not eth0 (None: eth0, or the whole VM).
    nic: Mapped[str | None] = mapped_column(String(8), nullable=True)
    source: Mapped[str] = mapped_column(String(96))
    reason: Mapped[str] = mapped_column(Text)
    old: Mapped[dict[str, Any]] = mapped_column(JSON)
    new: Mapped[dict[str, Any]] = mapped_column(JSON)


class HostRow(Base):
    """A hypervisor host whose agent dials out to the manager (``vnic agent --manager``).

    Only the SHA-256 of its token is stored. ``epoch`` rises with every registration;
    ``lease_until`` is when the host turns ``unknown`` unless its agent renews.
    ``vnics`` and ``cpus`` are the capacity the agent reported (0 until it registers).
    """

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    underlay: Mapped[str | None] = mapped_column(String(45), nullable=True)
    vnics: Mapped[int] = mapped_column(Integer, default=0)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    metrics_url: Mapped[str | None] = mapped_column(String(200), nullable=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cordoned: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FleetStateRow(Base):
    """One row: the newest change's revision and the newest revision pruned (see 0006)."""

    __tablename__ = "fleet_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    floor: Mapped[int] = mapped_column(BigInteger, default=0)


class HostChangeRow(Base):
    """One change of a host's desired state: VM ``session/vm`` is to be looked at again.

    Level-based: the row names the VM, and whoever reads it sends what the VM's desired
    state is then (run it with this request, or not at all).
    """

    __tablename__ = "host_changes"

    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    session: Mapped[str] = mapped_column(String(32))
    vm: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VmStatusRow(Base):
    """What a host's agent last reported for a VM: the revision it applied, under which
    epoch, and the error or the kernel changes."""

    __tablename__ = "vm_status"

    vm_id: Mapped[int] = mapped_column(
        ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    changes: Mapped[list[str]] = mapped_column(JSON, default=list)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
