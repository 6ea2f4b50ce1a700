"""What a customer trace needs: the last payload sent per contact (compressed), held records kept as history
(released rather than deleted once delivered), and the customer an event held back belongs to.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("sync_contacts", sa.Column("payload", sa.LargeBinary))
    op.add_column("sync_held_records", sa.Column("released_at", sa.DateTime(timezone=True)))
    op.add_column("sync_held_records", sa.Column("customer_id", sa.String(255), index=True))
    op.create_index("ix_sync_events_customer_id", "sync_events", ["customer_id"])


def downgrade() -> None:
    op.drop_index("ix_sync_events_customer_id", "sync_events")
    with op.batch_alter_table("sync_held_records") as batch:
        batch.drop_column("customer_id")
        batch.drop_column("released_at")
    with op.batch_alter_table("sync_contacts") as batch:
        batch.drop_column("payload")
