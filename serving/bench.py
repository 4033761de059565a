"""Serving benchmark: this project's TorchServe setup against TorchServe's own MNIST example setup.

`make bench-serve` (`python -m serving.bench`) archives the same weights twice, starts each server
on free loopback ports one after the other, and drives it with `wrk` (keep-alive connections, a Lua
script cycling through real MNIST test digits as PNG) at each concurrency. While wrk runs, a sampler
sends digits of its own and checks every answer against the offline model: no wrong answers at speed.
Prints a Markdown table and writes results.json and a plot to artifacts/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import torch

from serving.archive import build_archive
from serving.server import TorchServe
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data import load_split, sha256_of
from training.preprocess import normalize

ROOT = Path(__file__).resolve().parent.parent

# TorchServe's examples/image_classifier/mnist handler, as published: PIL + torchvision transforms
# on top of the stock ImageClassifier (vision handler), one request at a time.
BASELINE_HANDLER = '''
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class MNISTDigitClassifier(ImageClassifier):
    image_processing = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def postprocess(self, data):
        return data.argmax(1).tolist()
'''
# BaseHandler wants exactly one class defined in the model file: the same network, same weights.
BASELINE_MODEL = "from training.model import Net\n\n\nclass MNISTNet(Net):\n    pass\n"

WRK_SCRIPT = '''
local bodies = {}
local n = 0
for line in io.lines("%(list)s") do
  local f = assert(io.open(line, "rb")); n = n + 1; bodies[n] = f:read("*a"); f:close()
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  i = (i %% n) + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format("JSON{\\"requests\\": %%d, \\"seconds\\": %%f, \\"non2xx\\": %%d, \\"socket_errors\\": %%d, "
    .. "\\"p50\\": %%f, \\"p90\\": %%f, \\"p99\\": %%f, \\"max\\": %%f}\\n",
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
'''


def write_digits(folder: Path, count: int, data_dir: str | None) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """Real MNIST test digits as 28×28 PNG files, with their images and labels."""
    images, labels = load_split(data_dir, train=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}-{int(labels[i])}.png"
        cv2.imwrite(str(path), images[i].numpy())
        paths.append(path)
    return paths, images[:count], labels[:count]


def baseline_archive(checkpoint: Path, store: Path, work: Path) -> None:
    """The same weights packaged the way TorchServe's MNIST example does it."""
    ckpt = load_checkpoint(checkpoint)
    (work / "extra" / "training").mkdir(parents=True)
    shutil.copy2(ROOT / "training" / "model.py", work / "extra" / "training" / "model.py")
    (work / "extra" / "training" / "__init__.py").write_text("")
    (work / "mnist_handler.py").write_text(BASELINE_HANDLER)
    (work / "mnist.py").write_text(BASELINE_MODEL)
    torch.save(ckpt["state_dict"], work / "weights.pt")
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "baseline",
                    "--version", "1.0", "--model-file", str(work / "mnist.py"),
                    "--serialized-file", str(work / "weights.pt"), "--handler", str(work / "mnist_handler.py"),
                    "--extra-files", str(work / "extra"), "--export-path", str(store)],
                   check=True, env={**os.environ, "TMPDIR": str(work)})
    mar = store / "baseline.mar"
    (store / "baseline.mar.sha256").write_text(f"{sha256_of(mar)}  baseline.mar\n")


def run_wrk(server: TorchServe, script: Path, connections: int, seconds: int) -> dict:
    url = server.url("inference", f"/predictions/{server.model_name}")
    threads = max(1, min(2, connections))
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60)
    line = next((line for line in out.stdout.splitlines() if line.startswith("JSON")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
    result = json.loads(line[4:])
    result["rps"] = result["requests"] / result["seconds"]
    return result


class Sampler(threading.Thread):
    """Sends digits while wrk runs and compares each answer with the offline prediction."""

    def __init__(self, server: TorchServe, pngs: list[bytes], expected: list[int], parse, limit: int = 200):
        super().__init__(daemon=True)
        self.server, self.pngs, self.expected, self.parse, self.limit = server, pngs, expected, parse, limit
        self.checked = self.wrong = self.failed = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        rng = random.Random(0)
        while not self.stop_flag.is_set() and self.checked + self.failed < self.limit:
            i = rng.randrange(len(self.pngs))
            try:
                status, body = self.server.request("inference", f"/predictions/{self.server.model_name}",
                                                   data=self.pngs[i], timeout=15,
                                                   headers={"Content-Type": "application/octet-stream"})
            except Exception:
                self.failed += 1
                continue
            if status != 200:
                self.failed += 1
                continue
            self.checked += 1
            self.wrong += self.parse(body) != self.expected[i]
            time.sleep(0.02)


def bench_setup(label: str, server: TorchServe, script_path: Path, digits: list[Path], expected: list[int],
                parse, concurrencies: list[int], seconds: int) -> list[dict]:
    rows = []
    server.start(timeout=180)
    try:
        script_path.write_text(WRK_SCRIPT % {"list": script_path.with_suffix(".txt"),
                                             "token": server.token("inference") or ""})
        script_path.with_suffix(".txt").write_text("\n".join(str(p) for p in digits) + "\n")
        run_wrk(server, script_path, 8, 3)  # warm-up, not reported
        pngs = [p.read_bytes() for p in digits]
        for c in concurrencies:
            sampler = Sampler(server, pngs, expected, parse)
            sampler.start()
            result = run_wrk(server, script_path, c, seconds)
            sampler.stop_flag.set()
            sampler.join()
            result.update(setup=label, concurrency=c, checked=sampler.checked, wrong=sampler.wrong,
                          sampler_failed=sampler.failed)
            rows.append(result)
            print(f"  {label:8} c={c:<4} {result['rps']:8.0f} req/s  p50 {result['p50']:7.1f} ms  "
                  f"p99 {result['p99']:7.1f} ms  errors {result['non2xx'] + result['socket_errors']}  "
                  f"wrong {sampler.wrong}/{sampler.checked}", flush=True)
    finally:
        server.stop()
    return rows


def variant_table(checkpoint: Path, images: torch.Tensor, labels: torch.Tensor) -> str:
    """Each archive variant as a worker runs it (one thread, channels_last): accuracy and batch latency."""
    from serving.archive import VARIANTS
    from serving.handler import serving_model, to_model_input
    from training.evaluate import confusion, summarize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines = ["| variant | test accuracy | ms per batch of 1 | ms per batch of 32 |", "|---|---:|---:|---:|"]
    try:
        for variant in VARIANTS:
            model = serving_model(model_from_checkpoint(load_checkpoint(checkpoint)), variant)
            accuracy = summarize(*confusion(model, images, labels))["accuracy"]
            cells = []
            for batch in (1, 32):
                x = to_model_input(images[:batch])
                with torch.inference_mode():
                    for _ in range(10):
                        model(x)
                    runs = 200 if batch == 1 else 50
                    start = time.perf_counter()
                    for _ in range(runs):
                        model(x)
                    cells.append(f"{(time.perf_counter() - start) / runs * 1e3:.3f}")
            lines.append(f"| {variant} | {accuracy:.2%} | {cells[0]} | {cells[1]} |")
    finally:
        torch.set_num_threads(threads)
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    base = {r["concurrency"]: r for r in rows if r["setup"] == "baseline"}
    lines = ["| setup | conc. | req/s | p50 ms | p90 ms | p99 ms | errors | wrong answers | vs baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["concurrency"])
        ratio = f"{r['rps'] / b['rps']:.1f}x" if b and r["setup"] != "baseline" and b["rps"] else ""
        lines.append(f"| {r['setup']} | {r['concurrency']} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p90']:.1f} | "
                     f"{r['p99']:.1f} | {r['non2xx'] + r['socket_errors']} | {r['wrong']}/{r['checked']} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for setup in dict.fromkeys(r["setup"] for r in rows):
        pts = [r for r in rows if r["setup"] == setup]
        left.plot([r["concurrency"] for r in pts], [r["rps"] for r in pts], "o-", label=setup)
        right.plot([r["concurrency"] for r in pts], [r["p99"] for r in pts], "o-", label=setup)
    for ax, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms)")):
        ax.set(xscale="log", yscale="log", xlabel="concurrent connections", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--seconds", type=int, default=10, help="per concurrency point")
    parser.add_argument("--setups", default="baseline,project")
    parser.add_argument("--digits", type=int, default=200, help="distinct MNIST test digits cycled through")
    parser.add_argument("--out", default="artifacts/bench", type=Path)
    parser.add_argument("--variants-only", action="store_true", help="only the in-process variant table")
    args = parser.parse_args(argv)
    if args.variants_only:
        if not args.checkpoint.is_file():
            print(f"error: no checkpoint at {args.checkpoint}: run `make train` first", file=sys.stderr)
            return 1
        print(variant_table(args.checkpoint, *load_split(None, train=False)))
        return 0
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (Debian/Ubuntu: sudo apt-get install wrk)", file=sys.stderr)
        return 1
    if not args.checkpoint.is_file():
        print(f"error: no checkpoint at {args.checkpoint}: run `make train` first", file=sys.stderr)
        return 1
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        work = Path(tmp)
        digits, images, _ = write_digits(work / "digits", args.digits, None)
        model = model_from_checkpoint(load_checkpoint(args.checkpoint))
        with torch.inference_mode():
            expected = model(normalize(images)).argmax(1).tolist()  # what the offline model says
        store = work / "store"
        build_archive(args.checkpoint, store, "mnist", "1.0")
        for setup in args.setups.split(","):
            if setup == "baseline":
                baseline_archive(args.checkpoint, store, work / "baseline")
            name = "mnist" if setup == "project" else "baseline"
            # The baseline keeps TorchServe's defaults: no tuned netty threads or heap settings.
            extra = {} if setup == "project" else {"number_of_netty_threads": "0", "netty_client_threads": "0"}
            server = TorchServe.on_free_ports(work / f"run-{setup}", store, model_name=name, extra_properties=extra)

            def parse(body: bytes, setup=setup) -> int:
                data = json.loads(body)
                return data["digit"] if setup == "project" else int(data)

            rows += bench_setup(setup, server, work / f"{setup}.lua", digits, expected, parse, concurrencies,
                                args.seconds)
    table = markdown(rows)
    variants = variant_table(args.checkpoint, *load_split(None, train=False))
    (args.out / "serving.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "serving.png")
    print(f"\nserving benchmark: {os.cpu_count()} CPUs, {args.seconds}s per point, {args.digits} MNIST test digits "
          f"as PNG, torch {torch.__version__}\n")
    print(table)
    print("\nmodel variants, in-process (one thread, channels_last, full MNIST test set):\n")
    print(variants)
    print(f"\nwrote {args.out}/serving.json and {args.out}/serving.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
