"""model governance: model modes, review selection, run observations

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 12:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("analysis_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("review_selection", sa.String(length=24), nullable=True))
        batch_op.add_column(sa.Column("sample_fraction", sa.Float(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_analysis_runs_review_selection"), ["review_selection"], unique=False
        )
    op.create_table(
        "model_mode_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.Column("changed_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("model_mode_changes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_mode_changes_model_name"), ["model_name"], unique=False
        )
    op.create_table(
        "run_observations",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("analysed_at", sa.DateTime(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part", sa.String(length=64), nullable=True),
        sa.Column("manufacturer", sa.String(length=64), nullable=True),
        sa.Column("manufacturer_model", sa.String(length=64), nullable=True),
        sa.Column("kernel", sa.String(length=64), nullable=True),
        sa.Column("slice_thickness", sa.Float(), nullable=True),
        sa.Column("kvp", sa.Float(), nullable=True),
        sa.Column("pixel_spacing", sa.Float(), nullable=True),
        sa.Column("contrast", sa.String(length=8), nullable=True),
        sa.Column("p01", sa.Float(), nullable=True),
        sa.Column("p50", sa.Float(), nullable=True),
        sa.Column("p99", sa.Float(), nullable=True),
        sa.Column("noise", sa.Float(), nullable=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("patient_sex", sa.String(length=1), nullable=True),
        sa.Column("age_band", sa.String(length=8), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["analysis_runs.id"]),
        sa.PrimaryKeyConstraint("run_id"),
    )
    with op.batch_alter_table("run_observations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_run_observations_analysed_at"), ["analysed_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("run_observations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_observations_analysed_at"))
    op.drop_table("run_observations")
    with op.batch_alter_table("model_mode_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_mode_changes_model_name"))
    op.drop_table("model_mode_changes")
    with op.batch_alter_table("analysis_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analysis_runs_review_selection"))
        batch_op.drop_column("sample_fraction")
        batch_op.drop_column("review_selection")
        batch_op.drop_column("mode")
