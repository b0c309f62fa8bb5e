"""where instances came from (DIMSE, DICOMweb, the node's own results), the study attributes
QIDO-RS matches on, and room for a DICOMweb sender's name as the calling identity

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

STUDY_COLUMNS = (
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "accession_number",
    "study_time",
    "dicom_study_id",
    "referring_physician_name",
)


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        for column in STUDY_COLUMNS:
            batch_op.add_column(sa.Column(column, sa.Text(), nullable=True))
        batch_op.create_index("ix_studies_patient_id", ["patient_id"])
    for table in ("series", "associations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("source", sa.String(length=16), nullable=False, server_default="dimse")
            )
    for table in ("series", "instances", "associations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "calling_ae", type_=sa.String(length=64), existing_type=sa.String(length=16)
            )


def downgrade() -> None:
    for table in ("series", "instances", "associations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "calling_ae", type_=sa.String(length=16), existing_type=sa.String(length=64)
            )
    for table in ("series", "associations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("source")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_patient_id")
        for column in STUDY_COLUMNS:
            batch_op.drop_column(column)
