"""An index on series.study_id: a study's series are looked up by it (C-FIND and QIDO-RS
count them per study match; completion and routing read a study's series)

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_series_study_id", "series", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_series_study_id", table_name="series")
