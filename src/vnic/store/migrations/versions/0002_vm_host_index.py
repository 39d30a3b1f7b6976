"""VM host index: the VM's address within its session's subnets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_index", sa.Integer(), nullable=True))
        batch_op.create_unique_constraint("uq_vms_session_host_index", ["session_id", "host_index"])


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_constraint("uq_vms_session_host_index", type_="unique")
        batch_op.drop_column("host_index")
