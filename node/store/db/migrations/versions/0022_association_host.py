"""Associations name the host of the process that holds them: with roles on several hosts, an
edge that starts closes only what died (on its host, or on a host no tree runs on any more)

Revision ID: 0022
Revises: 0021
"""

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.add_column(sa.Column("host", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.drop_column("host")
