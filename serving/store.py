"""The model store: which archive holds which version, and which one `make serve` starts.

`make archive` writes `<name>.mar` (the newest archive) and keeps the one it replaces as
`<name>-<version>.mar`. `make serve` starts `<name>.mar`, unless `make promote` or `make rollback`
chose another default on the running server since: that choice is recorded in `<name>.default` (the
version, one line), so a server restarted after a rollback serves what it had rolled back to, not the
archive that was rolled back. `make archive` removes the record: a new archive is what serves next.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from serving.errors import ServerError


def manifest(mar: Path) -> dict | None:
    """The "model" entry of the archive's MAR-INF/MANIFEST.json; None when it is not a readable archive."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def archive_version(mar: Path) -> str | None:
    """The modelVersion in the archive's manifest; None when it is not a readable archive."""
    model = manifest(mar)
    return None if model is None or "modelVersion" not in model else str(model["modelVersion"])


def same_version(a: str, b: str) -> bool:
    """`2` and `2.0` name the same version (`make deploy VERSION=2` for an archive built as 2.0)."""
    def norm(v: str) -> str:
        return f"{v}.0" if v.isdigit() else v
    return norm(a) == norm(b)


def _archives(store: Path, name: str) -> list[tuple[Path, str]]:
    """(archive, version) of `name` in the store: <name>.mar first (the newest, maybe rebuilt with
    --force), then the kept <name>-<version>.mar; another model's archives (mnist-small-1.0.mar) are
    told apart by the model name in their manifest."""
    found = []
    for mar in [store / f"{name}.mar", *sorted(store.glob(f"{name}-*.mar"))]:
        model = manifest(mar) if mar.is_file() else None
        if model is not None and model.get("modelName") == name and "modelVersion" in model:
            found.append((mar, str(model["modelVersion"])))
    return found


def find_archive(store: Path, name: str, version: str) -> Path:
    """The store's archive of `name` at `version`."""
    archives = _archives(store, name)
    for mar, found in archives:
        if same_version(found, version):
            return mar
    have = sorted({v for _, v in archives})
    raise ServerError(f"no archive of {name} version {version} in {store} (found: {', '.join(have) or 'none'}): "
                      f"build it with `make archive VERSION={version}`")


def default_record(store: Path, name: str) -> Path:
    return store / f"{name}.default"


def recorded_default(store: Path, name: str) -> str | None:
    try:
        return default_record(store, name).read_text().strip() or None
    except FileNotFoundError:
        return None


def record_default(store: Path, name: str, version: str) -> None:
    """Remember `version` as the one to serve at the next start (written whole: a temporary file,
    renamed). The newest archive needs no record: it is what serves without one."""
    newest = archive_version(store / f"{name}.mar")
    if newest is not None and same_version(newest, version):
        forget_default(store, name)
        return
    record = default_record(store, name)
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(f"{version}\n")
        os.replace(tmp, record)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ServerError(f"could not record {version} as the version `make serve` starts ({err}): the running "
                          f"server serves it, a restart serves {name}.mar") from None


def forget_default(store: Path, name: str) -> None:
    default_record(store, name).unlink(missing_ok=True)


def archive_to_serve(store: Path, name: str) -> tuple[Path, str | None]:
    """The archive `make serve` starts, and the recorded default version that chose it (None: the newest)."""
    version = recorded_default(store, name)
    if version is None:
        mar = store / f"{name}.mar"
        if not mar.is_file():
            raise ServerError(f"no archive at {mar}: run `make archive` first")
        return mar, None
    try:
        return find_archive(store, name, version), version
    except ServerError as err:
        raise ServerError(f"{default_record(store, name)} says to serve version {version} (the last `make promote` "
                          f"or `make rollback`), but {err}; or delete that file to serve {name}.mar") from None
