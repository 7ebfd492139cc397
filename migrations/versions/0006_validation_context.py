"""each verdict records the settings it was reached under

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 03:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, also on SQLite: no batch-mode table rebuild (which cascades deletes).
    # Existing verdicts get NULL: sources take a registered one as reached under their
    # settings and judge a rejected one again (see registry.verdict_stands).
    op.add_column('adapter_revisions', sa.Column('validation_context', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('adapter_revisions') as batch:
        batch.drop_column('validation_context')
