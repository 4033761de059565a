"""bench/: the plain-recipe baseline and the tables in baseline-epoch units, on known inputs (no timing)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import models
from bench.plain import plain_net
from bench.report import serving_table
from bench.serve import baseline_archive
from bench.train import goals, table
from training.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from training.core.model import ModelConfig, Net

ROOT = Path(__file__).resolve().parent.parent


def test_plain_recipe_is_the_mission_cnn_without_batch_norm_or_dropout():
    net = plain_net()
    assert [type(m).__name__ for m in net] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
                                                "Flatten", "Linear", "ReLU", "Linear"]
    # 1·32·9+32, 32·64·9+64, 3136·128+128, 128·10+10
    assert sum(p.numel() for p in net.parameters()) == 320 + 18_496 + 401_536 + 1_290


def _run(seed: int, to99: float | None, to995: float | None) -> dict:
    return {"seed": seed, "test_accuracy": 0.995, "train_seconds": 40.0, "images_per_second": 1000.0,
            "peak_rss_mb": 900.0, "peak_cuda_mb": None, "device": "cpu", "epochs": 4, "precision": "fp32",
            "seconds_to_0.990": to99, "seconds_to_0.994": 30.0, "seconds_to_0.995": to995}


def test_training_table_gives_each_time_in_baseline_epochs():
    base = {"seconds_per_epoch": 20.0, "epochs": [{"seconds": 20.0, "test_accuracy": 0.9812, "images": 60_000}]}
    lines = table({"default": [_run(0, 10.0, 40.0), _run(1, 14.0, None)]}, base).splitlines()
    assert lines[2] == ("| plain recipe (baseline) | cpu | fp32 | 1 | 98.12 after 1 epoch(s) | | | "
                        "| 20 per epoch (= 1 bl-ep) | 3,000 | | — |")
    assert lines[3] == ("| default | cpu | fp32 | 2 | 99.50 ± 0.00 | 12 ± 3 (0.6 bl-ep) | 30 ± 0 (1.5 bl-ep) "
                        "| 1/2 runs, 40 (2.0 bl-ep) | 40 ± 0 (2.0 bl-ep) | 1,000 | 900 | — |")


def test_training_goal_needs_the_mean_accuracy_within_two_baseline_epochs():
    base = {"seconds_per_epoch": 20.0}
    timed = lambda seed, seconds: {**_run(seed, 10.0, seconds), "train_seconds": seconds}  # noqa: E731
    runs = {"fast": [timed(0, 40.0), timed(1, 40.0)], "slow": [timed(0, 40.0), timed(1, 50.0)]}
    verdicts = {row["config"]: (row["mean training time"], row["verdict"]) for row in goals(runs, base)}
    assert verdicts == {"fast": ("2.00 bl-ep", "met"), "slow": ("2.25 bl-ep", "not met")}
    low = [{**r, "test_accuracy": 0.9949} for r in runs["fast"]]
    assert goals({"low": low}, base)[0]["verdict"] == "not met"
    assert goals(runs, None)[0]["verdict"] == "not met"


def test_serving_table_gives_the_share_of_in_process_throughput():
    row = {"setup": "project", "concurrency": 64, "rps": 900.0, "p50": 10.0, "p90": 12.0, "p99": 20.0,
           "non2xx": 0, "socket_errors": 0, "wrong": 0, "checked": 50, "in_process_rps": 1800.0}
    base = {**row, "setup": "baseline", "rps": 60.0, "in_process_rps": None}
    lines = serving_table([base, row]).splitlines()
    assert lines[2] == "| baseline | 64 | 60 | 10.0 | 12.0 | 20.0 | 0 | 0/50 |  |  |"
    assert lines[3] == "| project | 64 | 900 | 10.0 | 12.0 | 20.0 | 0 | 0/50 | 50% | 15.0x |"


def test_decode_bench_bodies_are_what_the_handler_accepts():
    # bench.decode times these: each must decode to a digit, not take the error path.
    from bench.decode import bodies
    from serving.worker.requests import decode_request

    digits = np.zeros((2, 28, 28), np.uint8)
    digits[:, 6:22, 12:16] = 255  # a "1"
    for name, requests in bodies(digits).items():
        for request in requests:
            assert decode_request(request).shape == (28, 28), name


@pytest.mark.slow
def test_report_models_dry_run_prints_a_row_per_model_and_ensemble(tmp_path, mnist_dir, monkeypatch, capsys):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    argv = ["--dry-run", "--seeds", "1", "--members", "2", "--out", str(tmp_path),
            "--member-config", str(ROOT / "configs" / "ensemble-deep.yaml"),
            "--member-config", str(ROOT / "configs" / "ensemble-deep3.yaml")]  # two architectures, alternating
    assert models.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| default (train.yaml)", "| tuned (configs/tuned.yaml)",
        "| ensemble of 2 (ensemble-deep+ensemble-deep3, seeds 0-1)"]
    out = tmp_path / "ensemble-deep+ensemble-deep3"
    assert (out / "ensemble-2.pt").is_file()
    assert [load_checkpoint(out / f"member-{k}" / "model.pt")["model_config"]["convs"] for k in (0, 1)] == [2, 3]


def test_serve_settings_vary_only_the_batch_delay(tmp_path):
    import yaml

    from bench.serve_settings import DEFAULT_CONFIG, LOW_LATENCY, setting_configs

    configs = setting_configs([0, 1, 5], True, tmp_path)
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    written = [yaml.safe_load(path.read_text()) for path in list(configs.values())[:3]]
    # An archive's 0 reads as unset in TorchServe: the 0 row packs the default's delay and is served by snapshot.
    assert written == [default, {**default, "maxBatchDelay": 1}, {**default, "maxBatchDelay": 5}]
    assert list(configs.values())[3] == LOW_LATENCY
    assert list(configs)[:2] == [f"{default['minWorkers']} workers, batch {default['batchSize']}, delay 0 ms "
                                 "(startup snapshot)",
                                 f"{default['minWorkers']} workers, batch {default['batchSize']}, delay 1 ms"]


@pytest.mark.slow
def test_the_largest_images_are_accepted_and_fit_the_frontend_limit(mnist_test_images):
    """What bench/largest_images.py sends must be what the server accepts: within the body limit and the pixel limit."""
    from bench.largest_images import FORMATS, largest_images
    from bench.worst_cases import MAX_REQUEST
    from training.core.inputs.decode import MAX_PIXELS, load_image

    images, _ = mnist_test_images
    found = largest_images(images[0].numpy())
    assert list(found) == list(FORMATS)
    for fmt, (size, body) in found.items():
        side = int(size.split("x")[0])
        assert len(body) <= MAX_REQUEST == 2**20, fmt
        assert side * side <= MAX_PIXELS, fmt
        assert load_image(body).ndim == 2, fmt  # accepted (a decoder may reduce a large image while decoding)
    assert int(found["PNG"][0].split("x")[0]) ** 2 == MAX_PIXELS  # compressible formats reach the pixel limit


def test_the_baseline_archive_builds_the_checkpoints_own_network(tmp_path):
    """bench-serve's baseline (TorchServe's MNIST example) packs a model file whose class TorchServe builds
    without arguments: it must carry the checkpoint's model config. With the default one, the pool-first
    network that `make train` writes did not load (missing and unexpected batch-norm keys)."""
    torch.manual_seed(0)
    net = Net(ModelConfig(conv1=4, conv2=8, hidden=16, pool_first=True)).eval()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)  # not the initial statistics: a wrong layer order would show
    checkpoint = tmp_path / "model.pt"
    atomic_save(make_checkpoint(net, config={}, metrics={}), checkpoint)
    (tmp_path / "store").mkdir()
    (tmp_path / "work").mkdir()
    baseline_archive(checkpoint, tmp_path / "store", tmp_path / "work")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "store" / "baseline.mar") as mar:
        mar.extractall(unpacked)
    x = torch.rand(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    # What a TorchServe worker does with the archive: its model dir on the path, BaseHandler's loader.
    script = ("import sys, torch\nfrom ts.torch_handler.base_handler import BaseHandler\n"
              "handler = BaseHandler()\nhandler.map_location, handler.device = 'cpu', torch.device('cpu')\n"
              "model = handler._load_pickled_model('.', 'mnist.py', 'weights.pt').eval()\n"
              f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=unpacked, capture_output=True, text=True,
                          env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.inference_mode():  # another process, maybe another thread count: the same sums, reordered
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), net(x), rtol=0, atol=1e-5)
