"""report stage in two passes: the SR first, the other objects (map, GSPS, summary) after

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 08:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("analysis_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("extras_state", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("analysis_runs", schema=None) as batch_op:
        batch_op.drop_column("extras_state")
