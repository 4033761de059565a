"""The "Compression and edge" table: `make bench-compress`, `python -m bench.compress`.

One row per way of running the model (eager and fused as the handler serves them, each file of
`make export`, the distilled student): file size, test accuracy, single-image latency and batch-32
throughput on ONE CPU thread, and the peak memory (max RSS) of a fresh process that loads the model
and predicts one image. Each row runs in its own fresh process, one after the other, so the memory
is the row's own; ONNX rows never import torch (as on the edge). Rows whose file is missing are
skipped with a note. The machine is shared, so the ratios to eager in the same run are what to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from training.run_files import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
ROWS = {  # name: (file, how it runs)
    "eager": ("artifacts/model.pt", "eager"),
    "fused": ("artifacts/model.pt", "fused"),
    "onnx": ("artifacts/export/model.onnx", "file"),
    "pt2 (torch.export)": ("artifacts/export/model.pt2", "file"),
    "aoti": ("artifacts/export/model_aoti.pt2", "file"),
    "int8 (PT2E + AOTI)": ("artifacts/export/model_int8.pt2", "file"),
    "int8 onnx": ("artifacts/export/model_int8.onnx", "file"),
    "student (eager)": ("artifacts/student.pt", "eager"),
    "student onnx": ("artifacts/export/student/model.onnx", "file"),
}


def runner_for(path: Path, how: str):
    """eager and fused as a worker runs them (channels_last, one thread), without importing TorchServe."""
    from training.tools.export import load_runner

    if how == "file":
        return load_runner(path, threads=1)
    import torch

    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.core.model import fuse_batch_norm

    model = model_from_checkpoint(load_checkpoint(path))
    model = (fuse_batch_norm(model) if how == "fused" else model).to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # x is normalised already: what to_model_input does, minus normalize
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    return run


def measure(path: Path, how: str, data: Path, repeats: int) -> dict:
    """In a fresh process: load, predict one image, read the peak RSS; then time and score."""
    if how != "file" or path.suffix == ".pt2":
        import torch

        torch.set_num_threads(1)
    arrays = np.load(data)
    start = time.perf_counter()
    run = runner_for(path, how)
    run(arrays["one"])  # one test image: the peak memory is the model's, not the test set's
    load_s = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    x, y = arrays["x"], arrays["y"]
    for _ in range(20):
        run(x[:1])
    single = []
    for i in range(repeats):
        t = time.perf_counter()
        run(x[i : i + 1])
        single.append(time.perf_counter() - t)
    batches = [x[i : i + 32] for i in range(0, 32 * max(1, repeats // 4), 32)]
    run(batches[0])
    batch_s = []
    for batch in batches:
        t = time.perf_counter()
        run(batch)
        batch_s.append(time.perf_counter() - t)
    throughput = 32 / statistics.median(batch_s)  # medians: a shared machine's stalls hit a few calls
    predicted = np.concatenate([run(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return {"size_mb": path.stat().st_size / 1e6, "accuracy": float((predicted == y).mean()),
            "latency_ms": statistics.median(single) * 1e3, "throughput": throughput, "peak_mb": peak_mb,
            "load_s": load_s}


def table(rows: dict[str, dict]) -> str:
    base = rows.get("eager")
    lines = ["| model | file MB | test acc. | 1-image ms | batch-32 img/s | vs eager | peak MB (fresh process) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ratio = f"{r['throughput'] / base['throughput']:.2f}x" if base else ""
        lines.append(f"| {name} | {r['size_mb']:.2f} | {r['accuracy']:.2%} | {r['latency_ms']:.2f} | "
                     f"{r['throughput']:,.0f} | {ratio} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    parser.add_argument("--repeats", type=int, default=200, help="single-image calls timed per row")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="artifacts/bench/compress.json", type=Path)
    parser.add_argument("--measure", nargs=3, metavar=("FILE", "HOW", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child: one row, printed as JSON
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], Path(args.measure[2]), args.repeats)))
        return 0
    from training.core.inputs.preprocess import normalize_array
    from training.data import data_dir, load_split

    images, labels = load_split(data_dir(args.data_dir), train=False)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.npz"
        x = normalize_array(images.numpy())
        np.savez(data, x=x, y=labels.numpy(), one=x[:1])
        for name in args.rows.split(","):
            if name not in ROWS:
                parser.error(f"unknown row {name!r}: choose from {', '.join(ROWS)}")
            file, how = ROWS[name]
            if not (ROOT / file).is_file():
                print(f"skipped {name}: no {file} (make export / make distill)", file=sys.stderr)
                continue
            child = subprocess.run([sys.executable, "-m", "bench.compress", "--repeats", str(args.repeats),
                                    "--measure", str(ROOT / file), how, str(data)],
                                   capture_output=True, text=True, cwd=ROOT)
            if child.returncode != 0:
                print(f"failed {name}: {child.stderr.strip()[-400:]}", file=sys.stderr)
                continue
            results[name] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"measured {name}: {results[name]}", file=sys.stderr, flush=True)
    print(f"CPU: {cpu_name()}; one thread per model; {args.repeats} single-image calls per row")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_name(), "rows": results}, indent=2) + "\n")
    from bench.record import markdown_tables, write_record

    record = write_record("bench-compress", {"tables": {"formats": markdown_tables(table(results))[0]},
                                             "rows": results, "repeats": args.repeats},
                          baseline={"model": "eager", **results.get("eager", {})})
    print(f"record: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
