"""merge group schedule, calibration, requests; cancelled runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 11:54:13.187420
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

OLD_STATUS = ('running', 'succeeded', 'failed', 'skipped')
NEW_STATUS = (*OLD_STATUS, 'cancelled')


def _status(values):
    return sa.Enum(*values, name='run_status', native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table('merge_groups', schema=None) as batch_op:
        # Existing groups get empty settings; the daemon rewrites them from the config.
        batch_op.add_column(sa.Column('calibration', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('schedule', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('requested_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('next_run_at', sa.DateTime(), nullable=True))
    # The status CHECK constraint gains 'cancelled' (batch mode recreates it on SQLite).
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.alter_column('status', existing_type=_status(OLD_STATUS), type_=_status(NEW_STATUS),
                              existing_nullable=False)


def downgrade() -> None:
    op.execute("UPDATE merge_runs SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.alter_column('status', existing_type=_status(NEW_STATUS), type_=_status(OLD_STATUS),
                              existing_nullable=False)
    with op.batch_alter_table('merge_groups', schema=None) as batch_op:
        batch_op.drop_column('next_run_at')
        batch_op.drop_column('requested_at')
        batch_op.drop_column('schedule')
        batch_op.drop_column('calibration')
