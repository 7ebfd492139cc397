"""an index that finds each adapter's current revision without reading its history

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 18:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # registry.current_revision / list_current: the newest (last_seen_at, id) of one adapter,
    # read from the end of this index instead of sorting the adapter's whole history.
    op.create_index('ix_adapter_revisions_current', 'adapter_revisions', ['adapter_id', 'last_seen_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_adapter_revisions_current', table_name='adapter_revisions')
