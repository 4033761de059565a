"""The feedback table: one user correction of one answer (typed SQLAlchemy 2 models).

The schema is created and changed by migrations only (training/feedback/migrations/versions/), never by
`create_all`: a shared PostgreSQL database and a local SQLite file go through the same steps.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, Float, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The corrected label: a digit 0-9, or NOT_A_DIGIT where the user says the picture is no digit at all.
NOT_A_DIGIT = 10
SIDE = 28  # the stored image is the 28×28 uint8 the model saw (training/core/inputs/preprocess.py)


class Base(DeclarativeBase):
    pass


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (CheckConstraint(f"label >= 0 AND label <= {NOT_A_DIGIT}", name="label_range"),
                      CheckConstraint(f"answer >= 0 AND answer < {NOT_A_DIGIT}", name="answer_range"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # sha256 of the 28×28 bytes and the label: the same picture corrected the same way twice is one row
    dedup_key: Mapped[str] = mapped_column(String(64), unique=True)
    image: Mapped[bytes] = mapped_column(LargeBinary)  # SIDE * SIDE bytes, row-major, 0 = background
    raw_image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # only where the user opted in
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    answer: Mapped[int] = mapped_column(Integer)  # the digit the model answered
    confidence: Mapped[float] = mapped_column(Float)
    is_digit: Mapped[bool]  # the model's own "is this a digit" at the time
    label: Mapped[int] = mapped_column(Integer)  # 0-9, or NOT_A_DIGIT
    source: Mapped[str] = mapped_column(String(32))  # "page", or the name of the API key that sent it
