"""fetches: studies and priors retrieved from a source, leased like jobs; studies fetched as
priors name the study they are priors of

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fetches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="1", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("prior_of", sa.String(length=64), nullable=True),
        sa.Column("studies", sa.Text(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_fetches_due", "fetches", ["state", "run_after"])
    op.create_index("ix_fetches_lease_expires_at", "fetches", ["lease_expires_at"])
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prior_of", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("prior_of")
    op.drop_index("ix_fetches_lease_expires_at", table_name="fetches")
    op.drop_index("ix_fetches_due", table_name="fetches")
    op.drop_table("fetches")
