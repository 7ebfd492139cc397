"""what a folder or an adapter's config names has no length limit

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

# (table, column, length before): values taken from disk or from an adapter's own config.
# PostgreSQL enforced the lengths (SQLite never did): one adapter whose path was over 1024
# characters, or whose name over 512, ended the whole scan with StringDataRightTruncation.
# VARCHAR to TEXT rewrites no PostgreSQL table; SQLite's batch mode rebuilds each one.
UNBOUNDED = (
    ('adapters', 'locator', 1024),
    ('adapters', 'name', 512),
    ('adapter_revisions', 'files_path', 1024),
    ('adapter_revisions', 'base_model', 512),
    ('merge_run_inputs', 'calibration_source', 1024),
)


def upgrade() -> None:
    for table in dict.fromkeys(t for t, _, _ in UNBOUNDED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for _, column, length in (u for u in UNBOUNDED if u[0] == table):
                batch_op.alter_column(column, existing_type=sa.String(length=length), type_=sa.Text())


def downgrade() -> None:
    # Values longer than the old limits make PostgreSQL refuse this (nothing is truncated).
    for table in dict.fromkeys(t for t, _, _ in UNBOUNDED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for _, column, length in (u for u in UNBOUNDED if u[0] == table):
                batch_op.alter_column(column, existing_type=sa.Text(), type_=sa.String(length=length))
