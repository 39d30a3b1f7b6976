"""Runtime adjustments by source, the audit log of runtime changes, and a session's controller.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runtime_adjustments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=96), nullable=False, server_default="user")
        )
        batch_op.add_column(sa.Column("profile", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_runtime_adjustments_vm_id_source"), ["vm_id", "source"]
        )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("controller", sa.JSON(), nullable=True))
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("session", sa.String(length=32), nullable=False),
        sa.Column("vm", sa.String(length=32), nullable=True),
        sa.Column("source", sa.String(length=96), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("old", sa.JSON(), nullable=False),
        sa.Column("new", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_session"), ["session"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_session"))
    op.drop_table("audit_log")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("controller")
    with op.batch_alter_table("runtime_adjustments", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_runtime_adjustments_vm_id_source"), type_="unique")
        batch_op.drop_column("profile")
        batch_op.drop_column("source")
