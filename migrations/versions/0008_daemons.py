"""the daemons using the catalog and the settings they must share

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 00:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'daemons',
        sa.Column('holder', sa.String(length=200), nullable=False),
        sa.Column('settings', sa.JSON(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=False),
        sa.Column('seen_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('holder', name=op.f('pk_daemons')),
    )
    op.create_index(op.f('ix_daemons_seen_at'), 'daemons', ['seen_at'])


def downgrade() -> None:
    op.drop_index(op.f('ix_daemons_seen_at'), table_name='daemons')
    op.drop_table('daemons')
