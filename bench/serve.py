"""Serving benchmark: this project's TorchServe setup against TorchServe's own MNIST example setup.

`make bench-serve` (`python -m bench.serve`) archives the same weights twice, starts each server
on free loopback ports one after the other, and drives it with `wrk` (keep-alive connections, a Lua
script cycling through real MNIST test digits as PNG) at each concurrency. While wrk runs, a sampler
sends digits of its own and checks every answer against the offline model: no wrong answers at speed.
Prints a Markdown table and writes results.json and a plot to artifacts/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.load import WRK_SCRIPT, Sampler, run_wrk, write_digits
from bench.report import plot_serving, serving_table
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


def ensemble_answers(path: Path, images: torch.Tensor) -> list[int]:
    """What the ensemble says offline (members one by one): the sampler checks the server against it."""
    from training.ensemble import build_ensemble
    from training.ensemble_train import load_ensemble_checkpoint

    ckpt = load_ensemble_checkpoint(path)
    members = []
    for state_dict in ckpt["members"]:
        members.append(model_from_checkpoint({"model_config": ckpt["model_config"], "state_dict": state_dict}))
    with torch.inference_mode():
        return build_ensemble(members, ckpt["temperatures"], "loop")(normalize(images)).argmax(1).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--seconds", type=int, default=10, help="per concurrency point")
    parser.add_argument("--setups", default="baseline,project")
    parser.add_argument("--digits", type=int, default=200, help="distinct MNIST test digits cycled through")
    parser.add_argument("--out", default="artifacts/bench", type=Path)
    parser.add_argument("--variants-only", action="store_true", help="only the in-process variant table")
    parser.add_argument("--ensemble", type=Path, default=None, metavar="ENSEMBLE_PT",
                        help="one more row: this ensemble (make train-ensemble) served from one .mar")
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
    if args.ensemble is not None and not args.ensemble.is_file():
        print(f"error: no ensemble at {args.ensemble}: run `make train-ensemble` first", file=sys.stderr)
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
        setups = args.setups.split(",") + (["ensemble"] if args.ensemble is not None else [])
        for setup in setups:
            answers = expected
            if setup == "baseline":
                baseline_archive(args.checkpoint, store, work / "baseline")
            if setup == "ensemble":
                build_archive(args.ensemble, store, "ensemble", "1.0", ensemble=True)
                answers = ensemble_answers(args.ensemble, images)
            name = {"project": "mnist", "baseline": "baseline"}.get(setup, setup)
            # The baseline keeps TorchServe's defaults: no tuned netty threads or heap settings.
            extra = {} if setup != "baseline" else {"number_of_netty_threads": "0", "netty_client_threads": "0"}
            server = TorchServe.on_free_ports(work / f"run-{setup}", store, model_name=name, extra_properties=extra)

            def parse(body: bytes, setup=setup) -> int:
                data = json.loads(body)
                return data["digit"] if setup != "baseline" else int(data)

            rows += bench_setup(setup, server, work / f"{setup}.lua", digits, answers, parse, concurrencies,
                                args.seconds)
    table = serving_table(rows)
    variants = variant_table(args.checkpoint, *load_split(None, train=False))
    (args.out / "serving.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_serving(rows, args.out / "serving.png")
    print(f"\nserving benchmark: {os.cpu_count()} CPUs, {args.seconds}s per point, {args.digits} MNIST test digits "
          f"as PNG, torch {torch.__version__}\n")
    print(table)
    print("\nmodel variants, in-process (one thread, channels_last, full MNIST test set):\n")
    print(variants)
    print(f"\nwrote {args.out}/serving.json and {args.out}/serving.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
