"""The timestamp each custom event was sent with (staggered): a delivery counts those already sent on each
timestamp it may use, so that no more than 1,000 reach Ometria on one timestamp across deliveries too.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("sync_events") as table:
        table.add_column(sa.Column("sent_at", sa.DateTime(timezone=True)))
    op.create_index("ix_sync_events_type_sent_at", "sync_events", ["event_type", "sent_at"])


def downgrade() -> None:
    op.drop_index("ix_sync_events_type_sent_at", "sync_events")
    with op.batch_alter_table("sync_events") as table:
        table.drop_column("sent_at")
