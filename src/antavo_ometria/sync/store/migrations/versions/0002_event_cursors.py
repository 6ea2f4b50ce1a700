"""Where each event trigger rule has read Antavo's event feed up to.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "sync_event_cursors",
        sa.Column("rule", sa.String(100), primary_key=True),
        sa.Column("processed_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sync_event_cursors")
