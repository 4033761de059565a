"""The feedback store: one engine from a URL, migrated to the newest schema when opened.

SQLite in the project folder by default (`feedback/feedback.db`, gitignored); `MNIST_FEEDBACK_DB` or
`--db` names any SQLAlchemy URL instead, e.g. `postgresql+psycopg://user@host/db` for a shared
deployment. The same code runs on both (tests/test_feedback_store.py runs it against a real PostgreSQL).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, case, create_engine, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from training.feedback.models import NOT_A_DIGIT, SIDE, Feedback

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = ROOT / "feedback" / "feedback.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DB_HELP = "SQLAlchemy URL (default: $MNIST_FEEDBACK_DB, else feedback/feedback.db)"  # every --db flag


class FeedbackStoreError(Exception):
    """The database cannot be opened or migrated."""


@dataclass(frozen=True)
class Correction:
    """What one correction says, before it is a row."""

    image: bytes  # the 28×28 uint8 the model saw
    model_name: str
    model_version: str
    answer: int
    confidence: float
    is_digit: bool
    label: int  # 0-9 or NOT_A_DIGIT
    source: str
    raw_image: bytes | None = None

    def dedup_key(self) -> str:
        return hashlib.sha256(self.image + bytes([self.label])).hexdigest()


def database_url(url: str | None = None) -> str:
    """`url`, else $MNIST_FEEDBACK_DB, else the SQLite file in the project folder."""
    return url or os.environ.get("MNIST_FEEDBACK_DB") or f"sqlite:///{DEFAULT_DB}"


def migrate(engine: Engine) -> None:
    """Alembic `upgrade head` on this engine: every open brings an older database up to date."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class FeedbackStore:
    def __init__(self, url: str | None = None) -> None:
        self.url = database_url(url)
        if self.url.startswith("sqlite:///") and not self.url.startswith("sqlite:///:memory:"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(self.url)
            migrate(self.engine)
        except (SQLAlchemyError, OSError) as err:
            raise FeedbackStoreError(f"cannot open the feedback database {self.safe_url()}: {err}") from None

    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True) if hasattr(self, "engine") else self.url

    def add(self, correction: Correction) -> tuple[int, bool]:
        """(row id, True) for a new row; (the existing row's id, False) for a picture already corrected
        to the same label: counted once, whoever sends it again."""
        if len(correction.image) != SIDE * SIDE or not 0 <= correction.label <= NOT_A_DIGIT:
            raise ValueError("a correction is a 28×28 image and a label 0-10")
        key = correction.dedup_key()
        row = Feedback(created_at=datetime.now(UTC), dedup_key=key, image=correction.image,
                       raw_image=correction.raw_image, model_name=correction.model_name,
                       model_version=correction.model_version, answer=correction.answer,
                       confidence=correction.confidence, is_digit=correction.is_digit, label=correction.label,
                       source=correction.source)
        with Session(self.engine) as session:
            existing = session.scalar(select(Feedback.id).where(Feedback.dedup_key == key))
            if existing is not None:
                return existing, False
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # another writer stored the same one between the select and here
                session.rollback()
                return session.scalar(select(Feedback.id).where(Feedback.dedup_key == key)) or 0, False
            return row.id, True

    def rows(self) -> list[Feedback]:
        """Every row, oldest first (detached: read freely after the session closes)."""
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(Feedback).order_by(Feedback.id)))

    def counts(self) -> list[tuple[str, str, int, int]]:
        """(model name, version, rows, corrections) per version: a correction is a label other than the answer."""
        corrected = func.sum(case((Feedback.label != Feedback.answer, 1), else_=0))
        query = select(Feedback.model_name, Feedback.model_version, func.count(), corrected) \
            .group_by(Feedback.model_name, Feedback.model_version).order_by(Feedback.model_version)
        with Session(self.engine) as session:
            return [(n, v, int(total), int(fixes or 0)) for n, v, total, fixes in session.execute(query)]

    def close(self) -> None:
        self.engine.dispose()


def images_and_labels(rows: list[Feedback]) -> tuple[np.ndarray, np.ndarray]:
    """The rows' 28×28 images (N, 28, 28) uint8 and labels (N,) int64."""
    images = np.frombuffer(b"".join(r.image for r in rows), dtype=np.uint8).reshape(-1, SIDE, SIDE)
    return images.copy(), np.array([r.label for r in rows], dtype=np.int64)
