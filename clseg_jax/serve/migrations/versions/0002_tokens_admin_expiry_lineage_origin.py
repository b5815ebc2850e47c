"""Tokens: an admin flag (admin routes list and revoke tokens) and an optional expiry;
lineages: the version a fork starts from.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "tokens", sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.add_column("tokens", sa.Column("expires_at", sa.Float, nullable=True))
    op.add_column("lineages", sa.Column("origin", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lineages") as batch:
        batch.drop_column("origin")
    with op.batch_alter_table("tokens") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("expires_at")
        batch.drop_column("admin")
