"""A dispatch's storage commitment: its state (pending, committed, failed) and the
Transaction UID of its request, by which the destination's report finds it

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(sa.Column("commitment", sa.String(16), nullable=True))
        batch.add_column(sa.Column("transaction_uid", sa.String(64), nullable=True))
        batch.create_index("ix_dispatches_transaction_uid", ["transaction_uid"])


def downgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_index("ix_dispatches_transaction_uid")
        batch.drop_column("transaction_uid")
        batch.drop_column("commitment")
