"""Many hypervisor hosts: the hosts, where each VM is placed, the change log of each
host's desired state and what each agent last reported.

``fleet_state`` is one row: the revision of the newest change (every writer of a change
increments it in its own transaction, so revisions commit in order and a watcher that
has seen revision R has seen every change up to R) and ``floor``, the newest revision
pruned from the log (a watcher behind it must relist). A VM with no host (every VM
that exists before this migration) runs on the manager's own agent, as before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("underlay", sa.String(length=45), nullable=True),
        sa.Column("vnics", sa.Integer(), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("metrics_url", sa.String(length=200), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cordoned", sa.Boolean(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hosts")),
        sa.UniqueConstraint("name", name=op.f("uq_hosts_name")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_hosts_secret_hash")),
    )
    op.create_table(
        "fleet_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("floor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_state")),
    )
    op.execute("INSERT INTO fleet_state (id, revision, floor) VALUES (1, 0, 0)")
    op.create_table(
        "host_changes",
        sa.Column("revision", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("session", sa.String(length=32), nullable=False),
        sa.Column("vm", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_id"],
            ["hosts.id"],
            name=op.f("fk_host_changes_host_id_hosts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("revision", name=op.f("pk_host_changes")),
    )
    op.create_index(op.f("ix_host_changes_host_id"), "host_changes", ["host_id"], unique=False)
    op.create_table(
        "vm_status",
        sa.Column("vm_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_status_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_vm_status_host_id_hosts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("vm_id", name=op.f("pk_vm_status")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("placement", sa.JSON(), nullable=True))
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_vms_host_id"), ["host_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_vms_host_id_hosts"), "hosts", ["host_id"], ["id"], ondelete="RESTRICT"
        )


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_vms_host_id_hosts"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_vms_host_id"))
        batch_op.drop_column("host_id")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("placement")
    op.drop_table("vm_status")
    op.drop_index(op.f("ix_host_changes_host_id"), table_name="host_changes")
    op.drop_table("host_changes")
    op.drop_table("fleet_state")
    op.drop_table("hosts")
