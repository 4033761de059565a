"""docker/run.sh, the entrypoint and the compose file mount the signing keys as they should, with no engine.

`DRY_RUN=1 docker/run.sh ...` prints each container command instead of running it: these tests read
those commands. `make docker-test` runs the same paths in a real container (buildah or docker).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "docker" / "run.sh"


@pytest.fixture
def host(tmp_path) -> dict[str, Path]:
    """Host folders of one run: a key dir with a trusted/ folder, a store with an archive, a checkpoint."""
    paths = {name: tmp_path / name for name in ("keys", "store", "artifacts", "data")}
    (paths["keys"] / "trusted").mkdir(parents=True, mode=0o700)
    paths["keys"].chmod(0o700)
    paths["store"].mkdir()
    (paths["store"] / "mnist.mar").write_bytes(b"not opened by a dry run")
    paths["artifacts"].mkdir()
    (paths["artifacts"] / "model.pt").write_bytes(b"not opened by a dry run")
    return paths


def dry_run(host: dict[str, Path], *args: str, engine: str = "docker") -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "ENGINE": engine, "GPUS": "none", "DOCKER_IMAGE": "mnist-serve:test",
           "MNIST_SERVE_KEY_DIR": str(host["keys"]), "MODEL_STORE": str(host["store"]),
           "ARTIFACTS": str(host["artifacts"]), "MNIST_DIR": str(host["data"])}
    env.pop("MODEL_NAME", None)
    return subprocess.run([str(RUN), *args], env=env, capture_output=True, text=True, timeout=60)


def containers(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The container commands a dry run printed, one argument list each."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def options(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == flag]


@pytest.mark.parametrize("engine", ["docker", "buildah"])
def test_serve_mounts_the_trusted_keys_read_only_and_never_the_private_key(host, engine):
    [serve] = containers(dry_run(host, "serve", engine=engine))
    assert serve[serve.index("entrypoint.sh" if engine == "buildah" else "mnist-serve:test") + 1] == "serve"
    assert sorted(options(serve, "-v")) == sorted([f"{host['store']}:/app/model_store:ro",
                                                   f"{host['keys']}/trusted:/app/trusted:ro"])
    assert "MNIST_SERVE_TRUSTED_DIR=/app/trusted" in options(serve, "--env")
    assert not any(env.startswith("MNIST_SERVE_KEY_DIR=") for env in options(serve, "--env"))
    if engine == "docker":
        assert options(serve, "-p") == ["127.0.0.1:8080:8080", "127.0.0.1:8081:8081", "127.0.0.1:8082:8082"]


@pytest.mark.parametrize("engine", ["docker", "buildah"])
def test_archive_signs_with_the_host_key_dir(host, engine):
    [archive] = containers(dry_run(host, "archive", "--version", "2.0", engine=engine))
    assert archive[-3:] == ["archive", "--version", "2.0"]
    assert sorted(options(archive, "-v")) == sorted([f"{host['artifacts']}:/app/artifacts:ro",
                                                     f"{host['store']}:/app/model_store",
                                                     f"{host['keys']}:/app/keys"])
    assert "MNIST_SERVE_KEY_DIR=/app/keys" in options(archive, "--env")


def test_serve_with_no_archive_archives_first_in_a_container_of_its_own(host):
    (host["store"] / "mnist.mar").unlink()
    archive, serve = containers(dry_run(host, "serve"))
    assert archive[-1] == "archive" and f"{host['keys']}:/app/keys" in options(archive, "-v")
    assert serve[-1] == "serve" and f"{host['keys']}:/app/keys" not in options(serve, "-v")


def test_the_key_dir_is_made_with_mode_0700_on_first_use(host, tmp_path):
    host["keys"] = tmp_path / "config" / "mnist-serve"
    result = dry_run(host, "archive")
    assert containers(result)
    assert f"created the signing key dir {host['keys']} (mode 0700)" in result.stdout
    assert oct(host["keys"].stat().st_mode & 0o777) == "0o700"


def test_a_key_dir_readable_by_others_is_refused(host):
    host["keys"].chmod(0o755)
    result = dry_run(host, "archive")
    assert result.returncode == 1
    assert result.stderr == (f"run.sh: {host['keys']} holds the private key but is mode 755: "
                             f"chmod 700 {host['keys']}\n")


def test_serve_without_trusted_keys_says_so_in_one_line(host):
    (host["keys"] / "trusted").rmdir()
    result = dry_run(host, "serve")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"run.sh: no trusted keys: {host['keys']}/trusted is missing; sign an archive")


def test_train_gets_the_data_and_artifacts_folders(host):
    [train] = containers(dry_run(host, "train", "--epochs", "1"))
    assert sorted(options(train, "-v")) == sorted([f"{host['artifacts']}:/app/artifacts", f"{host['data']}:/app/data"])
    assert train[-3:] == ["train", "--epochs", "1"]


@pytest.mark.parametrize("key_dir", [None, "missing"])
def test_the_entrypoint_will_not_sign_with_a_key_that_dies_with_the_container(tmp_path, key_dir):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_SERVE_KEY_DIR"}
    if key_dir:
        env["MNIST_SERVE_KEY_DIR"] = str(tmp_path / key_dir)
    result = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), "archive"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    shown = str(tmp_path / key_dir) if key_dir else "$MNIST_SERVE_KEY_DIR"
    assert result.stderr == (f"entrypoint: no signing key dir at {shown}: mount the host's (docker/run.sh "
                             "archive does: -v ~/.config/mnist-serve:/app/keys); a key made here would die with "
                             "the container\n")


def test_compose_serves_with_public_keys_only_and_archives_with_the_key_dir():
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    key_dir = "${MNIST_SERVE_KEY_DIR:-${XDG_CONFIG_HOME:-${HOME}/.config}/mnist-serve}"
    for name in ("mnist", "mnist-cpu"):
        volumes = services[name]["volumes"]
        assert volumes[0] == "../model_store:/app/model_store:ro"
        assert volumes[1] == {"type": "bind", "source": f"{key_dir}/trusted", "target": "/app/trusted",
                              "read_only": True, "bind": {"create_host_path": False}}
        assert len(volumes) == 2
        assert services[name]["environment"] == {"MNIST_SERVE_TRUSTED_DIR": "/app/trusted"}
    for name in ("archive", "archive-cpu"):
        service = services[name]
        assert service["command"] == ["archive"] and service["profiles"] == ["archive"]
        assert service["volumes"][2] == {"type": "bind", "source": key_dir, "target": "/app/keys",
                                         "bind": {"create_host_path": False}}
        assert service["environment"] == {"MNIST_SERVE_KEY_DIR": "/app/keys"}
