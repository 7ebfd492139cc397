"""initial catalog

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 11:34:35.468363
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('merge_groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('base_model', sa.String(length=512), nullable=False),
    sa.Column('selection', sa.JSON(), nullable=False),
    sa.Column('strategy', sa.String(length=100), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('destinations', sa.JSON(), nullable=False),
    sa.Column('claimed_by', sa.String(length=200), nullable=True),
    sa.Column('claimed_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_merge_groups')),
    sa.UniqueConstraint('name', name=op.f('uq_merge_groups_name'))
    )
    op.create_table('sources',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.Enum('local', 'hub', name='source_kind', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('healthy', sa.Boolean(), nullable=False),
    sa.Column('last_poll_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sources')),
    sa.UniqueConstraint('name', name=op.f('uq_sources_name'))
    )
    op.create_table('adapters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('locator', sa.String(length=1024), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('status', sa.Enum('registered', 'rejected', 'removed', name='adapter_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], name=op.f('fk_adapters_source_id_sources'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters')),
    sa.UniqueConstraint('source_id', 'locator', name=op.f('uq_adapters_source_id_locator'))
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_source_id'), ['source_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_status'), ['status'], unique=False)

    op.create_table('merge_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('group_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('running', 'succeeded', 'failed', 'skipped', name='run_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('input_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('output_location', sa.String(length=1024), nullable=True),
    sa.Column('output_commit', sa.String(length=64), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['group_id'], ['merge_groups.id'], name=op.f('fk_merge_runs_group_id_merge_groups'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_merge_runs'))
    )
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_merge_runs_group_id'), ['group_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_merge_runs_input_fingerprint'), ['input_fingerprint'], unique=False)
        batch_op.create_index(batch_op.f('ix_merge_runs_status'), ['status'], unique=False)

    op.create_table('adapter_revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.String(length=64), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=True),
    sa.Column('files_path', sa.String(length=1024), nullable=True),
    sa.Column('base_model', sa.String(length=512), nullable=True),
    sa.Column('task_type', sa.String(length=32), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('alpha', sa.Double(), nullable=True),
    sa.Column('target_modules', sa.JSON(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('has_calibration', sa.Boolean(), nullable=False),
    sa.Column('status', sa.Enum('registered', 'rejected', 'removed', name='revision_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('discovered_at', sa.DateTime(), nullable=False),
    sa.Column('validated_at', sa.DateTime(), nullable=True),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_revisions_adapter_id_adapters'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_revisions')),
    sa.UniqueConstraint('adapter_id', 'revision', name=op.f('uq_adapter_revisions_adapter_id_revision'))
    )
    with op.batch_alter_table('adapter_revisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_revisions_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_revisions_base_model'), ['base_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_revisions_content_sha256'), ['content_sha256'], unique=False)

    op.create_table('merge_run_inputs',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('revision_id', sa.Integer(), nullable=False),
    sa.Column('calibration_source', sa.String(length=1024), nullable=True),
    sa.Column('calibration_sha256', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['revision_id'], ['adapter_revisions.id'], name=op.f('fk_merge_run_inputs_revision_id_adapter_revisions'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['run_id'], ['merge_runs.id'], name=op.f('fk_merge_run_inputs_run_id_merge_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'revision_id', name=op.f('pk_merge_run_inputs'))
    )


def downgrade() -> None:
    op.drop_table('merge_run_inputs')
    with op.batch_alter_table('adapter_revisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_revisions_content_sha256'))
        batch_op.drop_index(batch_op.f('ix_adapter_revisions_base_model'))
        batch_op.drop_index(batch_op.f('ix_adapter_revisions_adapter_id'))

    op.drop_table('adapter_revisions')
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_merge_runs_status'))
        batch_op.drop_index(batch_op.f('ix_merge_runs_input_fingerprint'))
        batch_op.drop_index(batch_op.f('ix_merge_runs_group_id'))

    op.drop_table('merge_runs')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapters_status'))
        batch_op.drop_index(batch_op.f('ix_adapters_source_id'))

    op.drop_table('adapters')
    op.drop_table('sources')
    op.drop_table('merge_groups')
