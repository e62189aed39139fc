"""ancillary instances: non-image objects and our own objects, never analysed

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ancillary_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("receive_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("ancillary_instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ancillary_instances_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("ancillary_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ancillary_instances_study_instance_uid"))
    op.drop_table("ancillary_instances")
