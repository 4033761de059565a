"""KServe predictor against TorchServe, same archive, same run: `make bench-kserve`, `python -m bench.kserve`.

Both servers get the same Open Inference Protocol v2 request (`POST /v2/models/mnist/infer`, a base64 PNG
of a real MNIST test digit as BYTES) from `wrk` (keep-alive connections, a Lua script cycling through the
digits) at each concurrency, on free loopback ports: TorchServe as KServe's TorchServe runtime starts it
(serving/kserve.py's start_local, configs/model-config.yaml's two workers and batching) and the predictor
(serving/predictor/, one process, micro-batched). Both run for the whole benchmark, idle while the other is
measured, and are measured alternately at each concurrency, so a change in the machine's other load hits
both alike. Before timing, both must give the offline model's digit for every request body. The archive is
signed with a throwaway key that only this run's servers trust. Prints a Markdown table and writes a record
under results/.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.load import prerequisites_missing, run_wrk_url, write_digits, write_wrk_script
from bench.record import markdown_tables, write_record
from bench.report import machine_line
from serving.archive import build_archive
from serving.kserve import build_bundle, start_local
from serving.ports import free_ports
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.core.tensors import normalize

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v2/models/mnist/infer"
def v2_bodies(digits: list[Path], folder: Path) -> list[Path]:
    """One v2 request body per digit PNG, as files for wrk's script."""
    folder.mkdir()
    paths = []
    for png in digits:
        body = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(png.read_bytes()).decode()]}]}
        path = folder / f"{png.stem}.json"
        path.write_text(json.dumps(body))
        paths.append(path)
    return paths


def check_answers(url: str, bodies: list[Path], expected: list[int], label: str) -> None:
    """Every body once, sequentially: the offline model's digit, or the benchmark stops."""
    for path, digit in zip(bodies, expected, strict=True):
        request = urllib.request.Request(url, data=path.read_bytes(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            got = json.loads(answer.read())["outputs"][1]["data"][0]
        if got != digit:
            raise SystemExit(f"error: {label} answered {got} for {path.name}, the offline model {digit}")


def start_predictor(archive: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port, grpc_port = free_ports(2)
    cmd = [sys.executable, "-m", "serving.predictor", "--archive", str(archive), "--http_port", str(port),
           "--grpc_port", str(grpc_port)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: the predictor exited: {log.read_text()[-1000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("error: the predictor was not ready in 180 s")


def measure(label: str, url: str, script: Path, c: int, seconds: int) -> dict:
    result = run_wrk_url(url + PATH, script, c, seconds)
    print(f"  {label:<22} c={c:<3} {result['rps']:8,.0f} req/s  p50 {result['p50']:6.1f} ms  "
          f"p99 {result['p99']:6.1f} ms  non-2xx {result['non2xx']}  socket errors {result['socket_errors']}",
          flush=True)
    return {"server": label, "conc.": c, **result}


def table(rows: list[dict]) -> str:
    base = {r["conc."]: r["rps"] for r in rows if r["server"].startswith("TorchServe")}
    lines = ["| server | conc. | req/s | p50 ms | p99 ms | non-2xx | vs TorchServe |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['conc.']} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['non2xx'] + r['socket_errors']} | {r['rps'] / base[r['conc.']]:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kserve", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--seconds", type=int, default=15, help="per concurrency point")
    parser.add_argument("--digits", type=int, default=200, help="distinct MNIST test digits cycled through")
    args = parser.parse_args(argv)
    if prerequisites_missing(args.checkpoint):
        return 1
    print(machine_line(), flush=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="mnist-bench-kserve-") as tmp:
        work = Path(tmp)
        os.environ["MNIST_SERVE_KEY_DIR"] = str(work / "keys")  # a throwaway key, trusted by this run only
        os.environ.pop("MNIST_SERVE_TRUSTED_DIR", None)
        digits, images, _ = write_digits(work / "digits", args.digits, None)
        with torch.inference_mode():
            expected = model_from_checkpoint(load_checkpoint(args.checkpoint))(normalize(images)).argmax(1).tolist()
        bodies = v2_bodies(digits, work / "bodies")
        script = write_wrk_script(work / "v2.lua", bodies, None, "application/json")
        archive = build_archive(args.checkpoint, work / "store", "mnist", "1.0")
        build_bundle(archive.path.parent, "mnist", work / "bundle")
        torchserve = start_local(work / "bundle", work / "torchserve", envelope=None)
        process = None
        try:
            process, url = start_predictor(archive.path, work / "predictor.log")
            servers = {"TorchServe (2 workers)": torchserve.url("inference", ""), "KServe predictor": url}
            for label, base in servers.items():
                check_answers(base + PATH, bodies, expected, label)
                run_wrk_url(base + PATH, script, 8, 3)  # warm-up: workers, batches, connection set-up
            rows = [measure(label, base, script, c, args.seconds) for c in concurrencies
                    for label, base in servers.items()]
        finally:
            torchserve.stop()
            if process is not None:
                process.terminate()
                process.wait(60)
    text = table(rows)
    print(f"\n{machine_line()}\n\n{text}\n\nSame v2 request body to both, measured alternately, {args.seconds} s per "
          f"point, {args.digits} digits cycled; `{' '.join(['python -m bench.kserve', *(argv or sys.argv[1:])])}`")
    path = write_record("bench-kserve", {"tables": {"kserve vs torchserve": markdown_tables(text)[0]}, "rows": rows},
                        baseline={"server": "TorchServe (2 workers), same run, same requests"})
    print(f"record: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
