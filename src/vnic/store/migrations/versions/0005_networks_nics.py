"""Several networks per session and several vNICs per VM.

Every session gets its network ``default`` (the session's network id, the subnets
derived from it as before); every VM gets ``eth0`` on ``default`` with the MAC, host
index and override it had (the MAC's allocation moves to the vNIC); runtime
adjustments and audit entries gain the vNIC (``eth0`` for what exists). Nothing
else changes, so a VM that runs across the upgrade keeps its identity.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import ipaddress

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _subnets(network_id: int) -> tuple[str, str]:
    # A frozen copy of vnic.plan.names.session_ipv4/ipv6 as of this migration: what a
    # session's subnets were before it had networks (a migration must not follow code).
    v4 = ipaddress.IPv4Network(((10 << 24) | ((network_id & 0xFFFF) << 8), 24))
    v6 = ipaddress.IPv6Network(((0xFD766E << 104) | ((network_id & 0xFFFFFF) << 80), 64))
    return str(v4), str(v6)


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("ipv4", sa.String(length=18), nullable=False),
        sa.Column("ipv6", sa.String(length=43), nullable=False),
        sa.Column("default_profile_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["default_profile_id"],
            ["profiles.id"],
            name=op.f("fk_networks_default_profile_id_profiles"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_networks_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_networks")),
        sa.UniqueConstraint("network_id", name=op.f("uq_networks_network_id")),
        sa.UniqueConstraint("session_id", "name", name="uq_networks_session_name"),
    )
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_networks_session_id"), ["session_id"], unique=False)
    op.create_table(
        "vm_nics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=8), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("host_index", sa.Integer(), nullable=True),
        sa.Column("override_profile_id", sa.Integer(), nullable=True),
        sa.Column("override_patch", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["network_id"],
            ["networks.id"],
            name=op.f("fk_vm_nics_network_id_networks"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["override_profile_id"],
            ["profiles.id"],
            name=op.f("fk_vm_nics_override_profile_id_profiles"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_nics_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vm_nics")),
        sa.UniqueConstraint("network_id", "host_index", name="uq_vm_nics_network_host_index"),
        sa.UniqueConstraint("vm_id", "name", name="uq_vm_nics_vm_name"),
    )
    with op.batch_alter_table("vm_nics", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vm_nics_network_id"), ["network_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_vm_nics_vm_id"), ["vm_id"], unique=False)

    conn = op.get_bind()
    for sid, network_id in conn.execute(sa.text("SELECT id, network_id FROM sessions")).all():
        v4, v6 = _subnets(network_id)
        # created_at copied in SQL: the session's, in whatever form the database keeps it.
        conn.execute(
            sa.text(
                "INSERT INTO networks (session_id, name, network_id, ipv4, ipv6, created_at)"
                " SELECT id, 'default', network_id, :v4, :v6, created_at FROM sessions"
                " WHERE id = :sid"
            ),
            {"v4": v4, "v6": v6, "sid": sid},
        )
    conn.execute(
        sa.text(
            "INSERT INTO vm_nics (vm_id, name, position, network_id, host_index,"
            " override_profile_id, override_patch)"
            " SELECT v.id, 'eth0', 0, n.id, v.host_index, v.override_profile_id,"
            " v.override_patch FROM vms v JOIN networks n"
            " ON n.session_id = v.session_id AND n.name = 'default'"
        )
    )

    with op.batch_alter_table("mac_allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nic_id", sa.Integer(), nullable=True))
    conn.execute(
        sa.text(
            "UPDATE mac_allocations SET nic_id = (SELECT n.id FROM vm_nics n"
            " WHERE n.vm_id = mac_allocations.vm_id AND n.name = 'eth0')"
        )
    )
    with op.batch_alter_table("mac_allocations", schema=None) as batch_op:
        batch_op.drop_constraint("uq_mac_allocations_vm_id", type_="unique")
        batch_op.drop_constraint("fk_mac_allocations_vm_id_vms", type_="foreignkey")
        batch_op.drop_column("vm_id")
        batch_op.alter_column("nic_id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_mac_allocations_nic_id"), ["nic_id"])
        batch_op.create_foreign_key(
            batch_op.f("fk_mac_allocations_nic_id_vm_nics"),
            "vm_nics",
            ["nic_id"],
            ["id"],
            ondelete="CASCADE",
        )

    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_constraint("uq_vms_session_host_index", type_="unique")
        batch_op.drop_constraint("fk_vms_override_profile_id_profiles", type_="foreignkey")
        batch_op.drop_column("override_profile_id")
        batch_op.drop_column("override_patch")
        batch_op.drop_column("host_index")

    with op.batch_alter_table("runtime_adjustments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("nic", sa.String(length=8), nullable=False, server_default="eth0")
        )
        batch_op.drop_constraint("uq_runtime_adjustments_vm_id_source", type_="unique")
        batch_op.create_unique_constraint(
            "uq_runtime_adjustments_vm_nic_source", ["vm_id", "nic", "source"]
        )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nic", sa.String(length=8), nullable=True))


def downgrade() -> None:
    """Back to one vNIC per VM: eth0 keeps its MAC, address and override; the other
    vNICs, networks, and their adjustments go."""
    conn = op.get_bind()
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_column("nic")
    conn.execute(sa.text("DELETE FROM runtime_adjustments WHERE nic != 'eth0'"))
    with op.batch_alter_table("runtime_adjustments", schema=None) as batch_op:
        batch_op.drop_constraint("uq_runtime_adjustments_vm_nic_source", type_="unique")
        batch_op.create_unique_constraint(
            "uq_runtime_adjustments_vm_id_source", ["vm_id", "source"]
        )
        batch_op.drop_column("nic")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("override_profile_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("override_patch", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("host_index", sa.Integer(), nullable=True))
    conn.execute(
        sa.text(
            "UPDATE vms SET"
            " override_profile_id = (SELECT n.override_profile_id FROM vm_nics n"
            "  WHERE n.vm_id = vms.id AND n.name = 'eth0'),"
            " override_patch = (SELECT n.override_patch FROM vm_nics n"
            "  WHERE n.vm_id = vms.id AND n.name = 'eth0'),"
            " host_index = (SELECT n.host_index FROM vm_nics n"
            "  WHERE n.vm_id = vms.id AND n.name = 'eth0')"
        )
    )
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_vms_session_host_index", ["session_id", "host_index"])
        batch_op.create_foreign_key(
            "fk_vms_override_profile_id_profiles",
            "profiles",
            ["override_profile_id"],
            ["id"],
            ondelete="RESTRICT",
        )
    with op.batch_alter_table("mac_allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vm_id", sa.Integer(), nullable=True))
    conn.execute(
        sa.text(
            "DELETE FROM mac_allocations WHERE nic_id NOT IN"
            " (SELECT id FROM vm_nics WHERE name = 'eth0')"
        )
    )
    conn.execute(
        sa.text(
            "UPDATE mac_allocations SET vm_id = (SELECT n.vm_id FROM vm_nics n"
            " WHERE n.id = mac_allocations.nic_id)"
        )
    )
    with op.batch_alter_table("mac_allocations", schema=None) as batch_op:
        batch_op.drop_constraint("uq_mac_allocations_nic_id", type_="unique")
        batch_op.drop_constraint("fk_mac_allocations_nic_id_vm_nics", type_="foreignkey")
        batch_op.drop_column("nic_id")
        batch_op.alter_column("vm_id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_mac_allocations_vm_id", ["vm_id"])
        batch_op.create_foreign_key(
            "fk_mac_allocations_vm_id_vms", "vms", ["vm_id"], ["id"], ondelete="CASCADE"
        )
    with op.batch_alter_table("vm_nics", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vm_nics_vm_id"))
        batch_op.drop_index(batch_op.f("ix_vm_nics_network_id"))
    op.drop_table("vm_nics")
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_networks_session_id"))
    op.drop_table("networks")
