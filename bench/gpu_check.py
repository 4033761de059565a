"""Everything that needs CUDA, in one go and one table: `make gpu-check` (`python -m bench.gpu_check`).

Rows: bench-train on CUDA (bf16 autocast; with torch.compile; at batch 256 for 2 epochs and at batch
512) with seconds to 99.0% / 99.5%;
`make train-ddp` on every GPU with nccl; TorchServe serving the archive with its worker on cuda:0
under wrk (bench-serve's project rows); `torch.cuda.is_available()` inside the built image where
docker and the image are there. Each step is a subprocess with its own time limit inside an overall
budget (8 minutes by default), so a stuck step fails its row instead of hanging the check. Without a
GPU it exits at once with status 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def no_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only torch build)"
        return f"no CUDA GPU visible (torch {torch.__version__}, CUDA build {built})"
    return None


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        return max(0.0, min(cap, self.end - time.monotonic()))


def _run(cmd: list[str], timeout: float, **kwargs) -> tuple[int, str, float]:
    """(exit status, last lines of output, seconds); 124 when it ran out of time."""
    start = time.monotonic()
    if timeout < 5:
        return 124, "skipped: the overall time budget is spent", 0.0
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
        out = (done.stdout + done.stderr).strip().splitlines()
        return done.returncode, "\n".join(out[-3:]), time.monotonic() - start
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s", time.monotonic() - start


def train_rows(budget: Budget, tmp: Path) -> list[tuple[str, str, str]]:
    out = tmp / "train"
    code, tail, _ = _run([sys.executable, "-m", "bench.train", "--seeds", "1", "--out", str(out),
                             "--config", "cuda-bf16=--device cuda",
                             "--config", "cuda-bf16-compile=--device cuda --compile true",
                             # One step costs the GPU ~5 ms of launches whatever the batch (H100, README):
                             # larger batches are the first lever. On the CPU, 2 epochs at batch 256 ended
                             # at 99.03-99.10% (2 seeds) and 8 epochs at 512 is the default's recipe scaled.
                             "--config", "cuda-bf16-b256-2ep=--device cuda --batch-size 256 --lr 0.2 --epochs 2 "
                                         "--augment false",
                             "--config", "cuda-bf16-b512=--device cuda --batch-size 512 --lr 0.4"],
                            budget.left(300))
    if code:
        return [("bench-train on CUDA", f"FAILED ({code})", tail)]
    data = json.loads((out / "training.json").read_text())
    unit = data["baseline"]["seconds_per_epoch"] if data.get("baseline") else None
    rows = []
    for name, runs in data["runs"].items():
        r = runs[0]

        def at(t: str, r=r) -> str:
            s = r[f"seconds_to_{t}"]
            return "not reached" if s is None else f"{s:.1f}s" + (f" ({s / unit:.2f} bl-ep)" if unit else "")

        rows.append((f"bench-train {name}", "ok", f"{r['device']}, {r['precision']}: 99.0% at {at('0.990')}, "
                     f"99.5% at {at('0.995')}; final {r['test_accuracy']:.2%} in {r['train_seconds']:.1f}s, "
                     f"peak CUDA {r['peak_cuda_mb']} MB"))
    return rows


def ddp_row(budget: Budget, tmp: Path, gpus: int) -> tuple[str, str, str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    code, tail, secs = _run([str(torchrun), "--standalone", "--nproc-per-node", str(gpus), "-m", "training.train",
                             "--device", "cuda", "--quiet", "--out-dir", str(tmp / "ddp")], budget.left(150))
    if code:
        return (f"train-ddp NPROC={gpus} (nccl)", f"FAILED ({code})", tail)
    m = json.loads((tmp / "ddp" / "metrics.json").read_text())
    return (f"train-ddp NPROC={gpus} (nccl)", "ok", f"{m['world_size']} ranks: test {m['test_accuracy']:.2%} in "
            f"{m['train_seconds']:.1f}s ({m['images_per_second']:,.0f} img/s), wall {secs:.0f}s")


def serve_rows(budget: Budget, tmp: Path, checkpoint: Path) -> list[tuple[str, str, str]]:
    if not checkpoint.is_file():
        return [("bench-serve on cuda:0", "skipped", f"no {checkpoint}: the bench-train step writes none either")]
    if shutil.which("wrk") is None:
        return [("bench-serve on cuda:0", "skipped", "wrk is not installed (make system-deps)")]
    code, tail, _ = _run([sys.executable, "-m", "bench.serve", "--checkpoint", str(checkpoint), "--setups",
                             "project", "--concurrency", "1,64,256", "--seconds", "5", "--no-compile",
                             "--model-config", str(ROOT / "configs" / "model-config-gpu.yaml"),
                             "--out", str(tmp / "serve")], budget.left(150))
    if code:
        return [("bench-serve on cuda:0", f"FAILED ({code})", tail)]
    rows = json.loads((tmp / "serve" / "serving.json").read_text())
    return [(f"bench-serve project c={r['concurrency']}", "ok",
             f"{r['rps']:,.0f} req/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, wrong {r['wrong']}/{r['checked']}")
            for r in rows]


def image_row(budget: Budget, image: str) -> tuple[str, str, str]:
    if shutil.which("docker") is None:
        return ("image: torch.cuda.is_available()", "skipped", "no docker on this host")
    code, tail, _ = _run(["docker", "run", "--rm", "--gpus", "all", "--entrypoint", "python", image, "-c",
                          "import torch; print(torch.cuda.is_available(), torch.cuda.get_device_name(0))"],
                         budget.left(60))
    return ("image: torch.cuda.is_available()", "ok" if code == 0 and tail.startswith("True") else
            f"FAILED ({code})", tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default: 8 min)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="archive this for the serving rows (default: the one the CUDA training step wrote)")
    parser.add_argument("--image", default=os.environ.get("DOCKER_IMAGE", "mnist-serve:latest"))
    args = parser.parse_args(argv)
    if (reason := no_gpu_reason()) is not None:
        print(f"gpu-check: {reason}: nothing to measure; run it on a host with an NVIDIA GPU", file=sys.stderr)
        return 2
    import torch

    from bench.report import machine_line

    gpus = torch.cuda.device_count()
    names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(gpus)}))
    budget = Budget(args.budget)
    with tempfile.TemporaryDirectory(prefix="mnist-gpu-check-") as tmp:
        work = Path(tmp)
        rows = train_rows(budget, work)
        rows.append(ddp_row(budget, work, gpus))
        rows += serve_rows(budget, work, args.checkpoint or work / "ddp" / "model.pt")
        rows.append(image_row(budget, args.image))
    print(f"\nGPU: {gpus} × {names}, driver {driver_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"
          f"\n{machine_line()}\n")
    print("| check | result | measured |\n|---|---|---|")
    for name, result, detail in rows:
        flat = re.sub(r"[|\n]", " ", detail)
        print(f"| {name} | {result} | {flat} |")
    from bench.record import write_record

    checks = [{"check": name, "result": result, "measured": re.sub(r"[|\n]", " ", detail)}
              for name, result, detail in rows]
    print(write_record("gpu-check", {"tables": {"checks": checks}, "gpus": gpus, "gpu_names": names,
                                     "driver": driver_version(), "cuda": torch.version.cuda},
                       baseline={"bl-ep": "the plain recipe's epoch on this host's CPU, same run"}))
    return 0 if all(r[1] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
