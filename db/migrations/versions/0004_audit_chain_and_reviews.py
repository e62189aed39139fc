"""audit chain columns; finding decisions and verifications (physician review)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('nonce', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('row_mac', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('chain_mac', sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint('uq_audit_events_nonce', ['nonce'])
        batch_op.create_unique_constraint('uq_audit_events_seq', ['seq'])

    op.create_table('verifications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.String(length=64), nullable=False),
    sa.Column('organization', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('sr_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('predecessor_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['analysis_runs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'round', name='uq_verifications_run_round')
    )
    op.create_table('finding_decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('finding_id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('reviewer', sa.String(length=64), nullable=False),
    sa.Column('organization', sa.String(length=64), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('location', sa.JSON(), nullable=True),
    sa.Column('decided_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['finding_id'], ['findings.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['analysis_runs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('finding_id', 'round', name='uq_finding_decisions_finding_round')
    )
    with op.batch_alter_table('finding_decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_finding_decisions_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('finding_decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_finding_decisions_run_id'))
    op.drop_table('finding_decisions')
    op.drop_table('verifications')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_constraint('uq_audit_events_seq', type_='unique')
        batch_op.drop_constraint('uq_audit_events_nonce', type_='unique')
        batch_op.drop_column('chain_mac')
        batch_op.drop_column('seq')
        batch_op.drop_column('row_mac')
        batch_op.drop_column('nonce')
