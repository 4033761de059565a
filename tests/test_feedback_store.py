"""The feedback store on SQLite and on a real PostgreSQL the test starts (Debian's `postgresql`):
the same code, the same migrations, the same answers."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from training.feedback.models import NOT_A_DIGIT
from training.feedback.store import Correction, FeedbackStore, images_and_labels

INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
_names = itertools.count()


def _as_postgres(*command: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root (CI, containers) its tools run as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway cluster on a Unix socket in its own temp dir (no TCP port), stopped at the end."""
    if not INITDB:
        pytest.skip("PostgreSQL is not installed: `make system-deps` (Debian package postgresql)")
    bin_dir = Path(INITDB[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run(_as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                "--no-sync", "-E", "UTF8"), check=True, capture_output=True)
    options = f"-k {root} -c listen_addresses='' -c fsync=off"
    subprocess.run(_as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
                                str(root / "log"), "start"), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@/{{db}}?host={root}"
    finally:
        subprocess.run(_as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh empty database: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    template = request.getfixturevalue("postgres_server")
    name = f"feedback_{os.getpid()}_{next(_names)}"
    admin = create_engine(template.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return template.format(db=name)


def correction(image: bytes, label: int, version: str = "1.0", answer: int = 3) -> Correction:
    return Correction(image=image, model_name="mnist", model_version=version, answer=answer, confidence=0.75,
                      is_digit=True, label=label, source="test")


def test_migrations_create_the_schema_and_a_second_open_changes_nothing(db_url):
    FeedbackStore(db_url).close()
    store = FeedbackStore(db_url)  # upgrade head again: already there
    tables = set(inspect(store.engine).get_table_names())
    assert {"feedback", "alembic_version"} <= tables
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0001"
    store.close()


def test_rows_round_trip_and_the_same_picture_with_the_same_label_is_one_row(db_url):
    store = FeedbackStore(db_url)
    seven = np.zeros((28, 28), np.uint8)
    seven[5:20, 10:14] = 255
    first = store.add(correction(seven.tobytes(), 7))
    assert first[1] is True
    assert store.add(correction(seven.tobytes(), 7)) == (first[0], False)  # counted once
    other = store.add(correction(seven.tobytes(), NOT_A_DIGIT, version="2.0"))  # another label: another row
    assert other[1] is True and other[0] != first[0]
    store.add(correction(bytes(784), 3, version="2.0"))  # the answer was right: feedback, not a correction
    rows = store.rows()
    assert [r.label for r in rows] == [7, NOT_A_DIGIT, 3]
    assert rows[0].raw_image is None and rows[0].created_at is not None
    images, labels = images_and_labels(rows)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images[0], seven) and labels.tolist() == [7, 10, 3]
    assert store.counts() == [("mnist", "1.0", 1, 1), ("mnist", "2.0", 2, 1)]
    with pytest.raises(ValueError, match="28×28"):
        store.add(correction(bytes(100), 7))
    store.close()
