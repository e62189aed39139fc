"""segmentation findings: the region's volume and the intensity over it; 3D boxes

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 03:50:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("volume_ml", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("mean_intensity", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("max_intensity", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("region_3d", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_column("region_3d")
        batch_op.drop_column("max_intensity")
        batch_op.drop_column("mean_intensity")
        batch_op.drop_column("volume_ml")
