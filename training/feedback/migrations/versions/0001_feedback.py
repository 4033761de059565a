"""The feedback table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dedup_key", sa.String(64), nullable=False, unique=True),
        sa.Column("image", sa.LargeBinary, nullable=False),
        sa.Column("raw_image", sa.LargeBinary, nullable=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("answer", sa.Integer, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("is_digit", sa.Boolean, nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.CheckConstraint("label >= 0 AND label <= 10", name="label_range"),
        sa.CheckConstraint("answer >= 0 AND answer < 10", name="answer_range"),
    )
    op.create_index("ix_feedback_model_version", "feedback", ["model_version"])


def downgrade() -> None:
    op.drop_index("ix_feedback_model_version", "feedback")
    op.drop_table("feedback")
