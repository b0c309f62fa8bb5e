"""Remote workers: what each worker on another host runs, on what device, when last seen

Revision ID: 0021
Revises: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remote_workers",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("pipelines", sa.Text(), nullable=False),
        sa.Column("device", sa.String(200), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("remote_workers")
