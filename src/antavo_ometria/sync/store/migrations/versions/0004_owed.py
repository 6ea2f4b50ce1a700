"""Owed until accepted: per contact the payload Ometria accepted (apart from the one last sent), the tries
since, when the next is due and why the last failed; a contact that left the programme; a run that asks for a
reconciliation.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("sync_contacts") as batch:
        batch.add_column(sa.Column("accepted_hash", sa.String(64)))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("retry_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("reason", sa.Text))
        batch.add_column(sa.Column("left_at", sa.DateTime(timezone=True)))
    # what was recorded as sent before was accepted; a rejected payload stays owed from now on
    op.execute("UPDATE sync_contacts SET accepted_hash = payload_hash WHERE status = 'sent'")
    op.execute("UPDATE sync_contacts SET attempts = 1 WHERE status = 'rejected'")
    op.create_index("ix_sync_contacts_status", "sync_contacts", ["status"])
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("reconcile_reason", sa.String(500)))
        batch.add_column(sa.Column("reconcile_requested", sa.String(500)))


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("reconcile_requested")
        batch.drop_column("reconcile_reason")
    op.drop_index("ix_sync_contacts_status", "sync_contacts")
    with op.batch_alter_table("sync_contacts") as batch:
        for name in ("left_at", "reason", "retry_at", "attempts", "accepted_hash"):
            batch.drop_column(name)
