"""The custom events sent per event type and moment: a delivery counts those already sent on each second it
pushes, so that more than 1,000 on one second are staggered across deliveries too.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_index("ix_sync_events_type_time", "sync_events", ["event_type", "event_time"])


def downgrade() -> None:
    op.drop_index("ix_sync_events_type_time", "sync_events")
