"""An instance's image size (rows, columns, bits allocated, frames): QIDO-RS answers them at
instance level (PS3.18 Table 6.7.1-2a); rows received before stay empty

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

COLUMNS = ("rows", "columns", "bits_allocated", "number_of_frames")


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
