"""serving/store.py: which archive `make serve` starts; a promote or rollback outlives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.archive import build_archive
from serving.errors import ServerError
from serving.server import TorchServe
from serving.store import archive_to_serve, archive_version, find_archive, record_default, recorded_default

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import save_tiny_checkpoint  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store with versions 1.0 (kept as mnist-1.0.mar) and 2.0 (mnist.mar, the newest)."""
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    store = tmp_path / "model_store"
    for version in ("1.0", "2.0"):
        build_archive(ckpt, store, "mnist", version)
    return store


def test_serve_starts_the_newest_archive_until_a_default_is_recorded(store):
    assert archive_to_serve(store, "mnist") == (store / "mnist.mar", None)
    record_default(store, "mnist", "1.0")  # what `make rollback` to 1.0 writes
    assert archive_to_serve(store, "mnist") == (store / "mnist-1.0.mar", "1.0")
    record_default(store, "mnist", "2")  # back to the newest archive (as `2`): no record needed
    assert recorded_default(store, "mnist") is None
    assert archive_to_serve(store, "mnist") == (store / "mnist.mar", None)


@pytest.mark.slow  # check_can_start looks for Java and the torchserve launcher too
def test_the_server_starts_the_recorded_version(store, tmp_path):
    record_default(store, "mnist", "1.0")
    server = TorchServe.on_free_ports(tmp_path / "run", store)
    assert server.check_can_start() == store / "mnist-1.0.mar"  # what start() passes to --models


def test_archives_are_found_by_the_name_and_version_in_their_manifest(store, tmp_path):
    # Another model's archive whose file name starts like this one's is not a version of it...
    build_archive(save_tiny_checkpoint(tmp_path / "small.pt"), store, "mnist-small", "1.0")
    assert find_archive(store, "mnist", "1.0") == store / "mnist-1.0.mar"
    with pytest.raises(ServerError, match=r"\(found: 1\.0, 2\.0\)"):
        find_archive(store, "mnist", "3.0")
    # ...and mnist.mar comes first: rebuilt with --force as 1.0, it is newer than the kept copy.
    build_archive(save_tiny_checkpoint(tmp_path / "again.pt", seed=5), store, "mnist", "1.0", force=True)
    assert find_archive(store, "mnist", "1") == store / "mnist.mar"


def test_a_record_that_cannot_be_written_is_a_server_error(store):
    (store / "mnist.default").mkdir()  # in the way of the rename, even for root
    with pytest.raises(ServerError, match=r"^could not record 1\.0 as the version `make serve` starts"):
        record_default(store, "mnist", "1.0")
    assert sorted(p.name for p in store.glob(".mnist.default.tmp-*")) == []


def test_a_new_archive_forgets_the_recorded_default(store, tmp_path):
    record_default(store, "mnist", "1.0")
    build_archive(save_tiny_checkpoint(tmp_path / "tiny3.pt", seed=3), store, "mnist", "3.0")
    assert recorded_default(store, "mnist") is None
    mar, chosen = archive_to_serve(store, "mnist")
    assert (archive_version(mar), chosen) == ("3.0", None)


def test_a_recorded_version_without_its_archive_is_a_clear_error(store):
    record_default(store, "mnist", "7.0")
    with pytest.raises(ServerError, match=r"mnist\.default says to serve version 7\.0 .* no archive of mnist "
                                          r"version 7\.0 in .*\(found: 1\.0, 2\.0\).*delete that file"):
        archive_to_serve(store, "mnist")
    with pytest.raises(ServerError, match=r"^no archive of mnist version 7 in .*`make archive VERSION=7`$"):
        find_archive(store, "mnist", "7")
