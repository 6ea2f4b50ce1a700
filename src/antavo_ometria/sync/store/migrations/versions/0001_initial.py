"""The state store: runs, contacts sent, held-back records, pushed events, Ometria's async errors.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

COUNTS = ("extracted", "changed", "unchanged", "sent", "accepted", "rejected", "quarantined", "failed",
          "async_errors")


def upgrade() -> None:
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("full_resync_reason", sa.String(500)),
        sa.Column("dry_run", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("mapping_version", sa.String(32), nullable=False),
        sa.Column("interval_start", sa.DateTime(timezone=True)),
        sa.Column("interval_end", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        *[sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in COUNTS],
        sa.Column("report", sa.Text),
        sa.UniqueConstraint("dag_id", "run_id", name="uq_sync_runs_dag_run"),
    )
    op.create_table(
        "sync_contacts",
        sa.Column("antavo_id", sa.String(255), primary_key=True),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mapping_version", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "sync_held_records",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False, index=True),
        sa.Column("antavo_id", sa.String(255), index=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("reasons", sa.Text, nullable=False),
        sa.Column("payload", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "sync_events",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(255)),
        sa.Column("event_time", sa.DateTime(timezone=True)),
        sa.Column("late", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("pushed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "sync_push_errors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False, index=True),
        sa.Column("error_path", sa.String(500)),
        sa.Column("error_message", sa.String(1000)),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("sync_push_errors", "sync_events", "sync_held_records", "sync_contacts", "sync_runs"):
        op.drop_table(table)
