"""refused runs; forced merge requests

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 14:20:34.316527
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

OLD_STATUS = ('running', 'succeeded', 'failed', 'skipped', 'cancelled')
NEW_STATUS = (*OLD_STATUS, 'refused')


def _status(values):
    return sa.Enum(*values, name='run_status', native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table('merge_groups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('force_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
    # The status CHECK constraint gains 'refused' (a publish gate said no).
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.alter_column('status', existing_type=_status(OLD_STATUS), type_=_status(NEW_STATUS),
                              existing_nullable=False)


def downgrade() -> None:
    op.execute("UPDATE merge_runs SET status = 'failed' WHERE status = 'refused'")
    with op.batch_alter_table('merge_runs', schema=None) as batch_op:
        batch_op.alter_column('status', existing_type=_status(NEW_STATUS), type_=_status(OLD_STATUS),
                              existing_nullable=False)
    with op.batch_alter_table('merge_groups', schema=None) as batch_op:
        batch_op.drop_column('force_requested')
