"""skipped runs that repeat the last one are counted in one row

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 19:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, also on SQLite: no batch-mode table rebuild (which cascades deletes).
    op.add_column('merge_runs', sa.Column('repeats', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('merge_runs') as batch:
        batch.drop_column('repeats')
