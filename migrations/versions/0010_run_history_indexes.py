"""indexes that keep a catalog with months of run history fast

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 22:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Deleting an adapter revision (`sources remove`) checks merge_run_inputs' foreign key to it;
    # without an index each check read the whole table: 244 s for 2,500 revisions on SQLite,
    # 2 M inputs, holding the write lock all along.
    op.create_index('ix_merge_run_inputs_revision_id', 'merge_run_inputs', ['revision_id'])
    # A group's newest runs, and newest runs of a status (the runner, `status`, /metrics): on
    # group_id alone PostgreSQL walked the primary key backwards past every other group's runs.
    # The second ends with repeats so that the /metrics run counts read the index alone.
    op.create_index('ix_merge_runs_group', 'merge_runs', ['group_id', 'id'])
    op.create_index('ix_merge_runs_group_status', 'merge_runs', ['group_id', 'status', 'id', 'repeats'])
    op.drop_index('ix_merge_runs_group_id', table_name='merge_runs')  # the first one's prefix


def downgrade() -> None:
    op.create_index('ix_merge_runs_group_id', 'merge_runs', ['group_id'])
    op.drop_index('ix_merge_runs_group_status', table_name='merge_runs')
    op.drop_index('ix_merge_runs_group', table_name='merge_runs')
    op.drop_index('ix_merge_run_inputs_revision_id', table_name='merge_run_inputs')
