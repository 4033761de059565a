"""The KServe bundle: `make kserve-bundle`, `python -m serving.kserve`.

Lays out what KServe's TorchServe runtime reads under an InferenceService's storageUri:

    <out>/config/config.properties   configs/kserve.properties + a model_snapshot for the archive
    <out>/config/metrics.yaml        the handler's metrics, declared for Prometheus mode
    <out>/model-store/<name>.mar     the archive (and <name>.mar.* beside it: checksum, signatures)
    <out>/bundle.json                which archive, and that this tool made the folder (see MARKER)

`start_local` runs TorchServe on such a bundle the way the runtime does, on free loopback ports:
the live tests and the drain measurement use it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from serving.ports import free_ports
from serving.server import ServerError, TorchServe, copy_verified, verify_checksum
from serving.signing import verify_archive
from serving.store import archive_to_serve, manifest
from training.cli import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "configs" / "kserve.properties"
MODEL_CONFIG = ROOT / "configs" / "model-config.yaml"
METRICS = ROOT / "configs" / "metrics.yaml"
MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's content
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
# A bundle is rebuilt whole, so the build deletes <out> first: only where this file says an earlier
# build made it (or where it is empty), never a folder given by mistake (`--out model_store`, `--out .`).
MARKER = "bundle.json"
MADE_BY = "python -m serving.kserve"


class BundleError(RuntimeError):
    """The bundle cannot be built from what is there."""


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines as TorchServe (java.util.Properties) and KServe's wrapper read them."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def model_snapshot(mar: Path, batch_size: int | None = None, max_batch_delay: int | None = None) -> dict:
    """TorchServe's startup snapshot for one archive: which model to load, with what workers and batching.
    `max_batch_delay` may be 0, which a snapshot carries and an archive cannot (bench/serve_settings.py)."""
    model = manifest(mar)
    if model is None:
        raise BundleError(f"{mar} is not a readable model archive (no MAR-INF/MANIFEST.json)")
    settings = yaml.safe_load(MODEL_CONFIG.read_text())
    entry = {"defaultVersion": True, "marName": mar.name, **{k: settings[k] for k in SNAPSHOT_KEYS}}
    if batch_size is not None:  # GPU replicas batch more (configs/model-config.yaml)
        entry["batchSize"] = batch_size
    if max_batch_delay is not None:
        entry["maxBatchDelay"] = max_batch_delay
    return {"name": "startup.cfg", "modelCount": 1, "models": {model["modelName"]: {model["modelVersion"]: entry}}}


def check_replaceable(out: Path) -> None:
    """BundleError unless `out` is missing, an empty folder, or a bundle an earlier build made."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink():
        try:
            if not any(out.iterdir()) or json.loads((out / MARKER).read_text()).get("made_by") == MADE_BY:
                return
        except (OSError, ValueError, AttributeError):  # no marker, or not the JSON object this tool writes
            pass
    raise BundleError(f"{out} exists and is not a bundle made by `make kserve-bundle` (no {MARKER}): refusing to "
                      "delete it; choose another --out, or delete it yourself")


def build_bundle(model_store: Path, model_name: str, out: Path, batch_size: int | None = None) -> Path:
    try:
        mar, _ = archive_to_serve(model_store, model_name)  # as `make serve`: the last promoted version, if any
        verify_checksum(mar)
        verify_archive(mar)  # the checksum catches corruption; only the signature catches tampering
    except ServerError as err:
        raise BundleError(str(err)) from None
    check_replaceable(out)
    if out.exists():
        shutil.rmtree(out)  # a bundle is derived: rebuilt whole, never merged with an older one
    (out / "config").mkdir(parents=True)
    (out / "model-store").mkdir()
    try:  # the archive's bytes as verified (checksum and signature): what goes to the cluster
        copy_verified(mar, out / "model-store")
    except ServerError as err:
        shutil.rmtree(out)
        raise BundleError(str(err)) from None
    for path in sorted(model_store.glob(f"{mar.name}.*")):  # its checksum and signature, for checks downstream
        shutil.copy2(path, out / "model-store" / path.name)
    shutil.copy2(METRICS, out / "config" / "metrics.yaml")
    snapshot = json.dumps(model_snapshot(mar, batch_size), separators=(",", ":"))
    config = out / "config" / "config.properties"
    config.write_text(TEMPLATE.read_text() + f"model_snapshot={snapshot}\n")
    (out / MARKER).write_text(json.dumps({"made_by": MADE_BY, "model": model_name, "archive": mar.name}) + "\n")
    return config


def start_local(bundle: Path, run_dir: Path, envelope: str | None = "kservev2", timeout: float = 120) -> TorchServe:
    """TorchServe on the bundle as KServe's runtime starts it (same arguments, TorchServe's default
    request decoding, the runtime's TS_SERVICE_ENVELOPE), moved to free loopback ports and run_dir."""
    props = read_properties(bundle / "config" / "config.properties")
    model_name = next(iter(json.loads(props["model_snapshot"])["models"]))
    port, metrics, grpc, grpc_management = free_ports(4)  # inference and management share one port, as in the bundle
    tmp = run_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    local = {
        "inference_address": f"http://127.0.0.1:{port}", "management_address": f"http://127.0.0.1:{port}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_port": str(grpc), "grpc_management_port": str(grpc_management),
        "model_store": str((bundle / "model-store").resolve()),
        "metrics_config": str((bundle / "config" / "metrics.yaml").resolve()),
        "vmargs": f"{props['vmargs']} -Djava.io.tmpdir={tmp.resolve()}",
    }
    lines = [f"{k}={local[k]}" if (k := line.split("=", 1)[0].strip()) in local and "=" in line else line
             for line in (bundle / "config" / "config.properties").read_text().splitlines()]
    config = run_dir / "config.properties"
    config.write_text("\n".join(lines) + "\n")
    server = TorchServe(run_dir=run_dir, model_store=bundle / "model-store", model_name=model_name, auth=False,
                        addresses={"inference": local["inference_address"],
                                   "management": local["management_address"],
                                   "metrics": local["metrics_address"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    env.update({"TMPDIR": str(tmp), "LOG_LOCATION": str(run_dir), "METRICS_LOCATION": str(run_dir)})
    if envelope:
        env["TS_SERVICE_ENVELOPE"] = envelope
    torchserve = Path(sys.executable).parent / "torchserve"
    with (run_dir / "console.log").open("ab") as console:
        subprocess.run([str(torchserve), "--start", f"--model-store={local['model_store']}", f"--ts-config={config}"],
                       cwd=run_dir, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                       check=True, timeout=60)
    server.wait_until_ready(timeout)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m serving.kserve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", default="model_store", type=Path)
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--out", default="artifacts/kserve", type=Path)
    parser.add_argument("--batch-size", type=int, help="override configs/model-config.yaml's batchSize (GPU: 128)")
    args = parser.parse_args(argv)
    try:
        config = build_bundle(args.model_store, args.model_name, args.out, args.batch_size)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        print(f"{path}  ({path.stat().st_size:,} bytes)")
    print(f"upload {args.out}/ to your storageUri (it is mounted at {MOUNT}); config: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
