"""base model shapes, cached for torch-free adapter validation

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 15:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'base_model_shapes',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('base_model', sa.String(length=1024), nullable=False),
        sa.Column('shapes', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('key', name=op.f('pk_base_model_shapes')),
    )


def downgrade() -> None:
    op.drop_table('base_model_shapes')
