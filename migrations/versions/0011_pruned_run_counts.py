"""the runs db prune deleted, counted per group and status

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # /metrics adds these to the remaining runs' counts: iteris_merge_runs_total counted the
    # runs' rows alone, so it dropped after a prune, and Prometheus took that for a reset.
    op.create_table(
        'pruned_runs',
        sa.Column('group_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.Enum('running', 'succeeded', 'failed', 'skipped', 'cancelled', 'refused',
                                    name='run_status', native_enum=False, create_constraint=True, length=16),
                  nullable=False),
        sa.Column('runs', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['group_id'], ['merge_groups.id'], name=op.f('fk_pruned_runs_group_id_merge_groups'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('group_id', 'status', name=op.f('pk_pruned_runs')),
    )


def downgrade() -> None:
    op.drop_table('pruned_runs')
