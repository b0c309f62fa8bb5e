"""The series input guard: each embedding's profile and guard distance, and the fitted
references (one per embedding pipeline)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("embeddings") as batch:
        batch.add_column(sa.Column("profile", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("guard_distance", sa.Float(), nullable=True))
    op.create_table(
        "guard_references",
        sa.Column("pipeline", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("series", sa.Text(), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("pipeline"),
    )


def downgrade() -> None:
    op.drop_table("guard_references")
    with op.batch_alter_table("embeddings") as batch:
        batch.drop_column("guard_distance")
        batch.drop_column("profile")
