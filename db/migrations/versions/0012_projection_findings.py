"""projection and detection findings: the side, the views, the lesion and its diameter

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 00:10:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("laterality", sa.String(length=1), nullable=True))
        batch_op.add_column(sa.Column("view", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("views", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("lesion", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("diameter_mm", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_column("diameter_mm")
        batch_op.drop_column("lesion")
        batch_op.drop_column("views")
        batch_op.drop_column("view")
        batch_op.drop_column("laterality")
