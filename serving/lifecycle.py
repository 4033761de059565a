"""Model versions side by side on a running TorchServe: `make deploy | promote | rollback | versions | undeploy`.

`deploy` registers another version of the model from the local model store, beside the one serving:
`/predictions/mnist/<version>` reaches it directly (shadow testing) while `/predictions/mnist` keeps
answering with the default. `promote` makes it the default, `rollback` returns to the version that
was the default before the last promote. Every call goes to the loopback management API with the
management token; TorchServe only registers at run time when the server was started with
`make serve MODEL_API=on`, and even then only archives in its private store (`allowed_urls` is the
file:// pattern of <run dir>/store). TorchServe itself checks no signature, so `deploy` reads the
archive once, verifies those bytes (signature and checksum) and writes them into that private store,
which is what TorchServe loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from serving.client import ROOT, ServerClient
from serving.drain import parse_samples
from serving.errors import ServerError
from serving.server import copy_verified, verify_checksum
from serving.signing import SignatureError, verify_archive
from serving.store import archive_version, find_archive, record_default, same_version
from training.cli import ArgumentParser

HISTORY = "lifecycle.json"  # in the run dir: the defaults before each promote, for rollback


class HistoryError(ServerError):
    """lifecycle.json cannot be read or locked; the message says what to do."""


def archive_workers(mar: Path) -> int:
    """minWorkers of the model-config.yaml packed in the archive (configs/model-config.yaml: 2), else 1.
    A registration names its workers itself (`initial_workers`, TorchServe ignores the packed value), so
    a deployed version gets as many as the archive asks for, like the version loaded at start."""
    try:
        with zipfile.ZipFile(mar) as z:
            settings = yaml.safe_load(z.read("model-config.yaml"))
        return max(1, int(settings["minWorkers"]))
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError, zipfile.BadZipFile):
        return 1


def checked_archive(store: Path, name: str, version: str) -> tuple[Path, str]:
    """The archive to register and its signer, after the same checks `make serve` makes at start."""
    mar = find_archive(store, name, version)
    # Only a plain file directly in the store: no symlink out of it, nothing TorchServe would fetch.
    if mar.is_symlink() or mar.resolve().parent != store.resolve():
        raise ServerError(f"{mar} is not a file of the model store {store}: refusing to register it")
    verify_checksum(mar)
    return mar, verify_archive(mar).signer  # early, one-line refusals; deploy serves a verified copy


def _call(client: ServerClient, method: str, path: str, timeout: float = 120) -> Any:
    status, body = client.request("management", path, method=method, timeout=timeout)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {"message": body[:200].decode(errors="replace")}
    if status == 405 and method == "POST":
        raise ServerError("this server's model API is closed (the secure default): restart it with "
                          "`make serve MODEL_API=on` to register versions at run time")
    if status not in (200, 202):  # 202: an asynchronous registration was accepted
        raise ServerError(f"{method} {path} answered {status}: {answer.get('message', answer)}")
    return answer


def deploy(client: ServerClient, store: Path, version: str, workers: int | None = None, timeout: float = 180) -> str:
    mar, signer = checked_archive(store, client.model_name, version)
    version = archive_version(mar) or version
    already = [str(m["modelVersion"]) for m in registered(client)]
    if any(same_version(v, version) for v in already):
        role = "the default" if same_version(default_version(client), version) else "beside the default"
        raise ServerError(f"{client.model_name} {version} is already registered ({role}): nothing to deploy; "
                          f"`make versions` lists what serves")
    workers = workers or archive_workers(mar)
    # TorchServe loads from the server's private store (serving/server.py: served_store): the bytes it
    # registers are the ones verified here, whatever happens to the model store meanwhile.
    served = client.run_dir / "store"
    served.mkdir(mode=0o700, exist_ok=True)
    signer = copy_verified(mar, served)
    # Asynchronous, then polled: a synchronous registration holds one of the frontend's netty threads
    # until the new worker has loaded, and the inference connections served by that thread stall as
    # long (measured: requests to the serving version timed out during a 20-s deploy).
    _call(client, "POST", f"/models?url={mar.name}&model_name={client.model_name}&initial_workers={workers}"
                          "&synchronous=false")
    wait_until_ready(client, version, timeout)
    return f"deployed {client.model_name} {version} from {mar.name} (signed by {signer}) beside the default; " \
           f"try {client.url('inference', f'/predictions/{client.model_name}/{version}')}"


def wait_until_ready(client: ServerClient, version: str, timeout: float) -> None:
    deadline, states = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        status, body = client.request("management", f"/models/{client.model_name}/{version}", timeout=10)
        if status == 200:
            states = [w["status"] for w in json.loads(body)[0].get("workers", [])]
            if states and all(s == "READY" for s in states):
                return
        time.sleep(0.5)
    raise ServerError(f"{client.model_name} {version} registered but its workers are not ready after "
                      f"{timeout:.0f}s ({states or 'no workers'}); see {client.run_dir}/model_log.log, then "
                      f"`make undeploy VERSION={version}`")


def registered(client: ServerClient) -> list[dict]:
    return _call(client, "GET", f"/models/{client.model_name}/all", timeout=10)


def default_version(client: ServerClient) -> str:
    return str(_call(client, "GET", f"/models/{client.model_name}", timeout=10)[0]["modelVersion"])


def resolve_registered(client: ServerClient, version: str) -> str:
    versions = [str(m["modelVersion"]) for m in registered(client)]
    match = next((v for v in versions if same_version(v, version)), None)
    if match is None:
        raise ServerError(f"version {version} of {client.model_name} is not registered (registered: "
                          f"{', '.join(versions)}): `make deploy VERSION={version}` first")
    return match


def set_default(client: ServerClient, version: str) -> None:
    _call(client, "PUT", f"/models/{client.model_name}/{version}/set-default", timeout=10)


def _server_start(client: ServerClient) -> str:
    """Which run of the server this is (its frontend's pid file): a restarted server has a new history."""
    try:
        return (client.run_dir / "tmp" / ".model_server.pid").read_text().strip()  # see TorchServe.pid_file
    except OSError:
        return ""


@contextlib.contextmanager
def promote_history(client: ServerClient) -> Iterator[list[str]]:
    """The defaults before each promote, held under an exclusive lock for a read-modify-write: two
    promotes or rollbacks at once (two terminals, a script) would otherwise read the same list, and the
    later write would drop the other's record. The list as the block leaves it is written, also when
    the block fails: by then the server's default may have changed."""
    lock_path = client.run_dir / f"{HISTORY}.lock"  # not lifecycle.json itself: os.replace swaps that file
    try:
        lock = lock_path.open("a")
    except OSError as err:
        raise HistoryError(f"cannot lock {lock_path} ({err.strerror}): is a server running from "
                           f"{client.run_dir} (`make serve`)?") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        history = _history(client)
        try:
            yield history
        finally:
            _save_history(client, history)


def _history(client: ServerClient) -> list[str]:
    path = client.run_dir / HISTORY
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(saved, dict) or not isinstance(saved.get("defaults", []), list):
            raise ValueError("not an object with a list of defaults")
    except (OSError, ValueError) as err:  # a file cut short by a crash or a full disk, or edited by hand
        raise HistoryError(f"{path} is not a promote history ({err}): delete it to start a new one "
                           "(`make rollback` then has nothing to go back to)") from None
    # Promotes recorded for an earlier run of the server mean nothing to this one (it loads one version).
    return saved.get("defaults", []) if saved.get("server_start") == _server_start(client) else []


def _save_history(client: ServerClient, history: list[str]) -> None:
    """Written whole (a temporary file, renamed): a reader sees the old history or the new one, never half."""
    record = {"server_start": _server_start(client), "defaults": history}
    path = client.run_dir / HISTORY
    tmp = path.with_name(f".{HISTORY}.tmp-{os.getpid()}")  # one writer at a time: the caller holds the lock
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def promote(client: ServerClient, version: str, store: Path | None = None) -> str:
    """Make a registered version the default; with `store`, also the version `make serve` starts next."""
    version = resolve_registered(client, version)
    with promote_history(client) as history:  # the default read, changed and recorded by one promote at a time
        previous = default_version(client)
        if previous == version:
            return f"{client.model_name} {version} is already the default"
        set_default(client, version)
        history.append(previous)
        if store is not None:
            record_default(store, client.model_name, version)
    return f"{client.model_name} {version} is the default (was {previous}; `make rollback` returns to it)"


def rollback(client: ServerClient, store: Path | None = None) -> str:
    """Return to the default before the last promote; with `store`, also for the next `make serve`."""
    with promote_history(client) as history:
        if not history:
            raise ServerError("nothing to roll back to: no promote recorded for this server")
        current, previous = default_version(client), resolve_registered(client, history[-1])
        set_default(client, previous)
        history.pop()
        if store is not None:
            record_default(store, client.model_name, previous)
    return f"{client.model_name} {previous} is the default again (was {current})"


def undeploy(client: ServerClient, version: str) -> str:
    version = resolve_registered(client, version)
    if version == default_version(client):
        raise ServerError(f"{version} is the default: promote or roll back to another version first")
    _call(client, "DELETE", f"/models/{client.model_name}/{version}", timeout=60)
    return f"unregistered {client.model_name} {version}"


def scrape(client: ServerClient) -> dict[tuple[str, frozenset], float]:
    """The metrics endpoint's samples: {(name, {(label, value)}): value}."""
    status, raw = client.request("metrics", "/metrics", timeout=10)
    return parse_samples(raw.decode(errors="replace")) if status == 200 else {}


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def versions_table(client: ServerClient, store: Path) -> list[str]:
    """One line per registered version: default or not, answers, low-confidence share, mean worker time per
    batch, workers, and who signed the store's archive of that version. Answers are counted by the handler
    per version (TorchServe counts `/predictions/mnist` under `model_version="default"`, whoever answered)."""
    default, samples = default_version(client), scrape(client)
    lines = [f"{'version':<9} {'default':<8} {'answers':>8} {'low conf':>9} {'batch ms':>9} {'workers':<12} "
             f"{'signer':<17} archive"]
    for model in registered(client):
        v, url = str(model["modelVersion"]), model.get("modelUrl", "")
        answers = metric_sum(samples, "MNISTPredictions", ModelVersion=v)
        low = metric_sum(samples, "mnist_low_confidence_predictions_total", ModelVersion=v)
        batches = metric_sum(samples, "mnist_handle_seconds_count", ModelVersion=v)
        seconds = metric_sum(samples, "mnist_handle_seconds_sum", ModelVersion=v)
        try:  # the store's archive of that version: make archive may have renamed the file it was loaded from
            mar = find_archive(store, client.model_name, v)
            signer, url = verify_archive(mar).signer, mar.name
        except SignatureError:
            signer = "BAD SIGNATURE"
        except ServerError:
            signer = "no archive"
        workers = ",".join(w["status"] for w in model.get("workers", [])) or "none"
        share = f"{low / answers:.1%}" if answers else "-"
        mean = f"{seconds / batches * 1000:.2f}" if batches else "-"
        lines.append(f"{v:<9} {'*' if v == default else '':<8} {answers:>8.0f} {share:>9} {mean:>9} "
                     f"{workers:<12} {signer:<17} {url}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.lifecycle", description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--model-store", default=ROOT / "model_store", type=Path)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("deploy", "register a signed archive version from the store beside the default"),
                       ("promote", "make a registered version the default"),
                       ("undeploy", "unregister a version that is not the default")):
        sub.add_parser(name, help=text).add_argument("version")
    sub.add_parser("rollback", help="make the version before the last promote the default again")
    sub.add_parser("versions", help="registered versions with their requests, latency and signer")
    args = parser.parse_args(argv)
    client = ServerClient(model_name=args.model_name)
    client.auth = (client.run_dir / "key_file.json").exists()  # as the CLI: the token file says
    try:
        if args.command == "deploy":
            print(deploy(client, args.model_store, args.version))
        elif args.command == "promote":
            print(promote(client, args.version, args.model_store))
        elif args.command == "rollback":
            print(rollback(client, args.model_store))
        elif args.command == "undeploy":
            print(undeploy(client, args.version))
        else:
            print("\n".join(versions_table(client, args.model_store)))
    except (ServerError, OSError) as err:  # OSError: lifecycle.json could not be written (a full disk)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
