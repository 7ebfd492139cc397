"""what a group's config names (its base model, a destination) has no length limit

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

# (table, column, length before), as 0009 for the sources' columns. PostgreSQL enforced them:
# a group's base model path over 512 characters stopped the daemon at start, and a folder
# destination over 1024 failed every run after it had merged and published, for ever.
UNBOUNDED = (
    ('merge_groups', 'base_model', 512),
    ('merge_runs', 'output_location', 1024),
    ('base_model_shapes', 'base_model', 1024),
)


def upgrade() -> None:
    for table, column, length in UNBOUNDED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=length), type_=sa.Text())


def downgrade() -> None:
    # Values longer than the old limits make PostgreSQL refuse this (nothing is truncated).
    for table, column, length in UNBOUNDED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.Text(), type_=sa.String(length=length))
