"""UPS-RS workitems (IHE AI Workflow for Imaging), their event reports in order, the
subscriptions to them and how far each subscriber's channel has read

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workitems",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("transaction_uid", sa.String(64), nullable=True),
        sa.Column("performer", sa.String(64), nullable=True),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uids", sa.Text(), nullable=False),
        sa.Column("destinations", sa.Text(), nullable=False),
        sa.Column("jobs", sa.Text(), nullable=False),
        sa.Column("fetch_id", sa.Integer(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("progress", sa.String(64), nullable=True),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_workitems_state", "workitems", ["state"])
    op.create_table(
        "workitem_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("workitem_uid", sa.String(64), nullable=False),
        sa.Column("event_type", sa.Integer(), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
        sa.Column("for_ae", sa.String(16), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_workitem_events_workitem_uid", "workitem_events", ["workitem_uid"])
    op.create_table(
        "workitem_subscriptions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("workitem_uid", sa.String(64), nullable=True),
        sa.Column("deletion_lock", sa.Boolean(), nullable=False),
        sa.Column("since_event", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("ae_title", "workitem_uid", name="uq_workitem_subscription"),
    )
    op.create_index("ix_workitem_subscriptions_ae_title", "workitem_subscriptions", ["ae_title"])
    op.create_table(
        "workitem_channels",
        sa.Column("ae_title", sa.String(16), primary_key=True),
        sa.Column("delivered", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workitem_channels")
    op.drop_table("workitem_subscriptions")
    op.drop_table("workitem_events")
    op.drop_table("workitems")
