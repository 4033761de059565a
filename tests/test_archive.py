"""serving/archive.py: what goes into the .mar, how it loads, and how existing archives are protected."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from serving.archive import ARCHIVE_DEFAULT_VARIANT, ArchiveError, archive_version, build_archive, main
from serving.signing import verify_archive
from training.checkpoint import CheckpointError, load_checkpoint
from training.core.model import build_model

# Shared fixtures (tiny_archive) load as a plugin, so each
# exists once per session; helpers are imported by name, after registering for assert rewriting.
pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]
from serving_fixtures import ROOT, TINY_MODEL, failing_replace, save_tiny_checkpoint  # noqa: E402

CORE_FILES = {f"training/core/{p.relative_to(ROOT / 'training' / 'core')}"
              for p in (ROOT / "training" / "core").rglob("*.py")}
WORKER_FILES = {f"serving/worker/{p.name}" for p in (ROOT / "serving" / "worker").glob("*.py")}
EXPECTED_FILES = {
    "handler.py", "weights.pt", "model.json", "index_to_name.json", "model-config.yaml",
    "training/__init__.py", *CORE_FILES,
    "MAR-INF/MANIFEST.json", "serving/__init__.py", *WORKER_FILES,
    "model.onnx", "selfcheck.npy",  # the default variant auto: its onnx candidate, its exactness check
}  # the tiny checkpoint predates calibration: no ood.pt (the trained one's archive adds it)


def read_member(mar: Path, name: str) -> bytes:
    with zipfile.ZipFile(mar) as z:
        return z.read(name)


def test_archive_holds_exactly_what_the_server_needs(tiny_archive):
    checkpoint, archive = tiny_archive
    assert archive.path.name == "mnist.mar"
    with zipfile.ZipFile(archive.path) as z:
        assert z.testzip() is None
        assert set(z.namelist()) == EXPECTED_FILES
    manifest = json.loads(read_member(archive.path, "MAR-INF/MANIFEST.json"))["model"]
    assert {k: manifest[k] for k in ("modelName", "modelVersion", "handler", "serializedFile")} == {
        "modelName": "mnist", "modelVersion": "1.0", "handler": "handler.py", "serializedFile": "weights.pt"}
    # The served code is the repository's code at archive time, byte for byte.
    served = [(f, f) for f in sorted(CORE_FILES | WORKER_FILES)]
    for packed, source in [("handler.py", "serving/worker/handler.py"), *served,
                           ("model-config.yaml", "configs/model-config.yaml")]:
        assert read_member(archive.path, packed) == (ROOT / source).read_bytes(), packed
    meta = json.loads(read_member(archive.path, "model.json"))
    assert meta["model_config"] == dict(vars(TINY_MODEL))
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["variant"] == ARCHIVE_DEFAULT_VARIANT == "auto"
    assert meta["metrics"]["test_accuracy"] == 0.5
    assert meta["temperature"] == 1.0 and "ood" not in meta  # a checkpoint from before temperature scaling
    assert meta["checkpoint"] == {"file": "model.pt", "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert json.loads(read_member(archive.path, "index_to_name.json")) == {str(d): str(d) for d in range(10)}
    assert yaml.safe_load(read_member(archive.path, "model-config.yaml"))["batchSize"] == 32


@pytest.mark.slow
def test_the_trained_archive_carries_the_temperature_and_the_detector(trained_archive, trained_checkpoint):
    ckpt = load_checkpoint(trained_checkpoint)
    meta = json.loads(read_member(trained_archive.path, "model.json"))
    assert meta["temperature"] == ckpt["temperature"]
    assert meta["ood"] == {k: v for k, v in ckpt["ood"].items() if not isinstance(v, torch.Tensor)}
    tensors = torch.load(io.BytesIO(read_member(trained_archive.path, "ood.pt")), weights_only=True)
    assert set(tensors) == {"whitening", "white_means"}
    assert all(torch.equal(tensors[k], ckpt["ood"][k]) for k in tensors)


def test_weights_are_a_plain_state_dict_that_rebuilds_the_model(tiny_archive, tmp_path):
    checkpoint, archive = tiny_archive
    (tmp_path / "weights.pt").write_bytes(read_member(archive.path, "weights.pt"))
    state_dict = torch.load(tmp_path / "weights.pt", weights_only=True)  # tensors only: no pickled code
    model = build_model(json.loads(read_member(archive.path, "model.json"))["model_config"])
    model.load_state_dict(state_dict)  # strict: every key and shape matches
    original = load_checkpoint(checkpoint)["state_dict"]
    assert state_dict.keys() == original.keys()
    assert all(torch.equal(state_dict[k], original[k]) for k in original)


def test_checksum_file_matches_the_archive(tiny_archive):
    _, archive = tiny_archive
    digest = hashlib.sha256(archive.path.read_bytes()).hexdigest()
    assert archive.sha256 == digest
    assert archive.size == archive.path.stat().st_size
    assert archive.test_accuracy == 0.5
    assert archive.replaced is None
    assert (archive.path.parent / "mnist.mar.sha256").read_text() == f"{digest}  mnist.mar\n"


def test_same_version_is_refused_unless_forced(tmp_path):
    store = tmp_path / "store"
    first = build_archive(save_tiny_checkpoint(tmp_path / "a.pt", seed=0), store, "mnist", "1.0")
    other = save_tiny_checkpoint(tmp_path / "b.pt", seed=1)
    with pytest.raises(ArchiveError, match=r"mnist\.mar \(version 1\.0\) already exists: pass --force"):
        build_archive(other, store, "mnist", "1.0")
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256  # untouched

    forced = build_archive(other, store, "mnist", "1.0", force=True)
    assert forced.path == first.path and forced.sha256 != first.sha256 and forced.replaced is None
    assert (store / "mnist.mar.sha256").read_text() == f"{forced.sha256}  mnist.mar\n"
    assert sorted(p.name for p in store.iterdir()) == ["mnist.mar", "mnist.mar.sha256", "mnist.mar.sig"]


def test_new_version_keeps_the_old_one_beside_it(tmp_path):
    store = tmp_path / "store"
    old = build_archive(save_tiny_checkpoint(tmp_path / "a.pt", seed=0), store, "mnist", "1.0")
    new = build_archive(save_tiny_checkpoint(tmp_path / "b.pt", seed=1), store, "mnist", "2.0")
    kept = store / "mnist-1.0.mar"
    assert new.replaced == kept
    assert sorted(p.name for p in store.iterdir()) == [
        "mnist-1.0.mar", "mnist-1.0.mar.sha256", "mnist-1.0.mar.sig", "mnist.mar", "mnist.mar.sha256", "mnist.mar.sig"]
    assert verify_archive(kept).sha256 == old.sha256  # the kept version's signature moved with it
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == old.sha256
    assert (store / "mnist-1.0.mar.sha256").read_text().split()[0] == old.sha256
    assert (archive_version(kept), archive_version(new.path)) == ("1.0", "2.0")
    assert (store / "mnist.mar.sha256").read_text() == f"{new.sha256}  mnist.mar\n"


def test_missing_checkpoint_says_to_train_first(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope\.pt: run `make train` first"):
        build_archive(tmp_path / "nope.pt", tmp_path / "store", "mnist", "1.0")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_unusable_checkpoint_is_refused_before_anything_is_written(tmp_path, damage):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    if damage == "truncated":  # an interrupted copy
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
        message = r"model\.pt is not a readable checkpoint \(\w+\); retrain it"
    else:  # a readable torch file that is not one of ours
        torch.save({"weights": torch.zeros(3)}, checkpoint)
        message = r"model\.pt is not a checkpoint written by training\.train"
    with pytest.raises(CheckpointError, match=message):
        build_archive(checkpoint, tmp_path / "store", "mnist", "1.0")
    assert not (tmp_path / "store").exists()


def test_unknown_variant_is_refused(tmp_path):
    expected = r"unknown variant 'fp4': choose one of auto, eager, fused, bf16, onnx, int8, int8-legacy$"
    with pytest.raises(ArchiveError, match=expected):
        build_archive(save_tiny_checkpoint(tmp_path / "model.pt"), tmp_path / "store", "mnist", "1.0", "fp4")


def test_cli_reports_the_archive_and_fails_in_one_line(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", test_accuracy=0.9876)
    store = tmp_path / "store"
    args = ["--checkpoint", str(checkpoint), "--model-store", str(store), "--model-name", "digits"]

    assert main(args) == 0
    out, err = capsys.readouterr()
    mar = store / "digits.mar"
    digest = hashlib.sha256(mar.read_bytes()).hexdigest()
    assert out.splitlines() == [
        f"archive        {mar}  (version 1.0, variant {ARCHIVE_DEFAULT_VARIANT})",
        f"size           {mar.stat().st_size / 1e6:.2f} MB",
        f"sha256         {digest}",
        f"signed by      key {verify_archive(mar).signer} (digits.mar.sig)",
        f"test accuracy  98.76% (recorded in {checkpoint})",
    ]
    assert err == ""

    assert main(args) == 1  # same version again
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {mar} (version 1.0) already exists: pass --force to replace it\n"

    assert main([*args, "--version", "2.0"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[-1] == f"previous version kept as {store / 'digits-1.0.mar'}"

    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--model-store", str(store)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: no checkpoint at {tmp_path / 'missing.pt'}: run `make train` first\n"


# --- replacing and versioning: a valid archive at every instant, kept versions never overwritten --------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fail_on", [1, 2, 3, 4])
def test_a_failure_between_the_steps_of_a_new_version_leaves_a_valid_archive(tmp_path, monkeypatch, fail_on):
    store = tmp_path / "store"
    old = build_archive(save_tiny_checkpoint(tmp_path / "a.pt", seed=0), store, "mnist", "1.0")
    checkpoint = save_tiny_checkpoint(tmp_path / "b.pt", seed=1)
    calls = failing_replace(monkeypatch, fail_on)
    with pytest.raises(OSError, match="injected"):
        build_archive(checkpoint, store, "mnist", "2.0")
    monkeypatch.undo()
    assert len(calls) == fail_on
    mar = store / "mnist.mar"
    with zipfile.ZipFile(mar) as z:  # never missing, never half-written
        assert z.testzip() is None
    if archive_version(mar) == "1.0":  # the old archive, still matching its checksum
        assert sha256_file(mar) == old.sha256
        assert (store / "mnist.mar.sha256").read_text() == f"{old.sha256}  mnist.mar\n"
    else:  # only the last rename (the checksum's) failed: make serve refuses the pair until a rebuild
        assert fail_on == 4 and archive_version(mar) == "2.0"
    kept = store / "mnist-1.0.mar"
    if kept.exists():
        assert sha256_file(kept) == old.sha256
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_kept_version_is_never_overwritten_unless_forced(tmp_path, capsys):
    store = tmp_path / "store"
    args = ["--model-store", str(store), "--checkpoint"]
    checkpoints = [str(save_tiny_checkpoint(tmp_path / f"{seed}.pt", seed=seed)) for seed in range(3)]
    assert main([*args, checkpoints[0], "--version", "1.0"]) == 0
    assert main([*args, checkpoints[1], "--version", "2.0"]) == 0  # 1.0 kept as mnist-1.0.mar
    first = sha256_file(store / "mnist-1.0.mar")
    capsys.readouterr()

    # Another archive as 1.0 would leave two different "1.0"s: refused.
    assert main([*args, checkpoints[2], "--version", "1.0"]) == 1
    assert capsys.readouterr().err == (f"error: version 1.0 is already kept as {store / 'mnist-1.0.mar'}: "
                                       "choose another version, or pass --force\n")
    assert main([*args, checkpoints[2], "--version", "1.0", "--force"]) == 0  # 2.0 kept as mnist-2.0.mar
    assert sha256_file(store / "mnist-1.0.mar") == first
    capsys.readouterr()

    # Now mnist.mar is a 1.0 and a 1.0 is kept: a new version would overwrite the kept one. Refused.
    assert main([*args, checkpoints[0], "--version", "3.0"]) == 1
    assert capsys.readouterr().err == (f"error: {store / 'mnist.mar'} (version 1.0) would replace the kept "
                                       f"{store / 'mnist-1.0.mar'}: pass --force to overwrite it\n")
    assert sha256_file(store / "mnist-1.0.mar") == first
    assert archive_version(store / "mnist.mar") == "1.0"
    assert main([*args, checkpoints[0], "--version", "3.0", "--force"]) == 0
    assert archive_version(store / "mnist.mar") == "3.0"
    assert sha256_file(store / "mnist-1.0.mar") != first


def _project_imports(path: Path, everywhere: bool) -> set[str]:
    """The training.* / serving.* modules a file imports: at module level, or anywhere in it."""
    import ast

    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if everywhere else [n for top in tree.body for n in ast.walk(top)
                                                  if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("training", "serving"):
            names = [f"{node.module}.{a.name}" for a in node.names]  # from training import model
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            names = []
        found |= {n for n in names if n.split(".")[0] in ("training", "serving")}
    return found


def test_the_packed_files_import_only_packed_files():
    """The .mar is self-contained: a server without this repository installed (KServe's runtime image)
    has only what the archive holds, so a packed file that imports another project module breaks there
    even though every test here passes (the project is installed in the virtualenv)."""
    from serving.archive import CORE, WORKER

    def modules(folder: Path, package: str) -> set[str]:
        names = {".".join((package, *p.relative_to(folder).with_suffix("").parts)) for p in folder.rglob("*.py")}
        return {n.removesuffix(".__init__") for n in names}

    core = modules(CORE, "training.core") | {"training"}
    packed = core | modules(WORKER, "serving.worker") | {"serving"}
    # The served core imports nothing outside itself, not even inside a function; the worker only the two.
    for path in CORE.rglob("*.py"):
        assert _project_imports(path, everywhere=True) <= core, path
    for path in WORKER.glob("*.py"):
        assert _project_imports(path, everywhere=True) <= packed, path.name
