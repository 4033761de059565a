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

from bench.largest_images import worst_case_rows, worst_case_table
from bench.load import Sampler, prerequisites_missing, run_wrk, write_digits, write_wrk_script
from bench.record import markdown_tables, write_record
from bench.report import machine_line, plot_serving, serving_table
from serving.archive import build_archive
from serving.server import TorchServe
from serving.signing import sign_archive
from serving.worker.variants import ARCHIVE_DEFAULT_VARIANT
from training.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from training.core.tensors import normalize
from training.data import load_split, sha256_of

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
# BaseHandler wants exactly one class defined in the model file, built without arguments: the same
# network (the checkpoint's model config written in), same weights.
BASELINE_MODEL = """from training.core.model import ModelConfig, Net


class MNISTNet(Net):
    def __init__(self):
        super().__init__(ModelConfig(**{config!r}))
"""

def baseline_archive(checkpoint: Path, store: Path, work: Path) -> None:
    """The same weights packaged the way TorchServe's MNIST example does it."""
    ckpt = load_checkpoint(checkpoint)
    (work / "extra" / "training" / "core").mkdir(parents=True)
    shutil.copy2(ROOT / "training" / "core" / "model.py", work / "extra" / "training" / "core" / "model.py")
    (work / "extra" / "training" / "__init__.py").write_text("")
    (work / "extra" / "training" / "core" / "__init__.py").write_text("")
    (work / "mnist_handler.py").write_text(BASELINE_HANDLER)
    (work / "mnist.py").write_text(BASELINE_MODEL.format(config=dict(ckpt["model_config"])))
    torch.save(ckpt["state_dict"], work / "weights.pt")
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "baseline",
                    "--version", "1.0", "--model-file", str(work / "mnist.py"),
                    "--serialized-file", str(work / "weights.pt"), "--handler", str(work / "mnist_handler.py"),
                    "--extra-files", str(work / "extra"), "--export-path", str(store)],
                   check=True, env={**os.environ, "TMPDIR": str(work)})
    mar = store / "baseline.mar"
    (store / "baseline.mar.sha256").write_text(f"{sha256_of(mar)}  baseline.mar\n")
    sign_archive(mar)  # the project's server loads only signed archives, the baseline's too


def bench_setup(label: str, server: TorchServe, script_path: Path, digits: list[Path], expected: list[int],
                parse, concurrencies: list[int], seconds: int, then=None) -> list[dict]:
    """wrk at each concurrency against `server`; `then(server)` runs before it stops (more rows of its own)."""
    rows = []
    server.start(timeout=180)
    try:
        write_wrk_script(script_path, digits, server.token("inference") or "")
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
        if then is not None:
            then(server)
    finally:
        server.stop()
    return rows


def variant_model(checkpoint: Path, variant: str, work: Path):
    """The model exactly as a worker of a `variant` archive runs it (one thread)."""
    from serving.worker.variants import ONNX_FILES, serving_model
    from training.core.runners import OnnxModel
    from training.tools.export import calibration_images, export_all

    if variant not in ONNX_FILES:
        return serving_model(model_from_checkpoint(load_checkpoint(checkpoint)), variant)
    fmt = "int8-onnx" if variant == "int8" else "onnx"
    calibration = calibration_images(None, 512) if variant == "int8" else None  # what serving/archive.py uses
    export_all(checkpoint, work, (fmt,), calibration, log=lambda _: None)
    return OnnxModel(work / ONNX_FILES[variant], threads=1, use_features=variant == "onnx")


def _ms_per_batch(model, x: torch.Tensor, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
    return (time.perf_counter() - start) / runs * 1e3


def in_process_rps(checkpoint: Path, variant: str, images: torch.Tensor, threads: int = 1) -> float:
    """Digits per second the variant does in-process at batch 32 on `threads` (the worker's): uint8 in,
    normalisation included, no HTTP, no decode. The ceiling a served rate is a fraction of."""
    from serving.worker.auto import AUTO, AUTO_CANDIDATES
    from serving.worker.variants import to_model_input

    if variant == AUTO:  # the worker serves the fastest exact candidate: the ceiling is the best of them
        return max(in_process_rps(checkpoint, v, images, threads) for v in AUTO_CANDIDATES)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-rps-") as tmp:
            model = variant_model(checkpoint, variant, Path(tmp))
        batch = images[:32]
        with torch.inference_mode():
            for _ in range(5):
                model(to_model_input(batch))
            start = time.perf_counter()
            runs = 100
            for _ in range(runs):
                model(to_model_input(batch)).argmax(1).tolist()
        return runs * 32 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)


def variant_table(checkpoint: Path, compiled: bool = True) -> str:
    """Each archive variant as a worker runs it (one thread, channels_last): accuracy, argmax agreement with
    fp32 (fused) on the whole test set, and batch latency; `+compile`: the same under torch.compile."""
    from serving.archive import VARIANTS
    from serving.worker.variants import serving_model, to_model_input

    images, labels = load_split(None, train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines = ["| variant | test accuracy | argmax = fp32 | ms per batch of 1 | ms per batch of 32 |",
             "|---|---:|---:|---:|---:|"]
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-variants-") as tmp:
            reference = serving_model(model_from_checkpoint(load_checkpoint(checkpoint)), "fused")
            with torch.inference_mode():
                fp32 = reference(to_model_input(images)).argmax(1)
            names = [v for v in VARIANTS if v != "auto"]  # auto is a choice among these, not a model
            names += [f"{v}+compile" for v in ("fused", "bf16")] if compiled else []
            for name in names:
                variant = name.removesuffix("+compile")
                model = variant_model(checkpoint, variant, Path(tmp))
                if name.endswith("+compile"):
                    model = torch.compile(model)  # a worker would pay this in initialize, once
                with torch.inference_mode():
                    predicted = torch.cat([model(to_model_input(images[i : i + 1000])).argmax(1)
                                           for i in range(0, len(images), 1000)])
                accuracy = (predicted == labels).double().mean().item()
                same = int((predicted == fp32).sum())
                cells = [f"{_ms_per_batch(model, to_model_input(images[:b]), 200 if b == 1 else 50):.3f}"
                         for b in (1, 32)]
                lines.append(f"| {name} | {accuracy:.2%} | {same:,}/{len(images):,} | {cells[0]} | {cells[1]} |")
    finally:
        torch.set_num_threads(threads)
    return "\n".join(lines)


def ensemble_answers(path: Path, images: torch.Tensor) -> list[int]:
    """What the ensemble says offline (members one by one): the sampler checks the server against it."""
    from training.core.ensemble import build_ensemble
    from training.recipes.ensemble_train import ensemble_members, load_ensemble_checkpoint

    ckpt = load_ensemble_checkpoint(path)
    members = ensemble_members(ckpt)
    with torch.inference_mode():
        return build_ensemble(members, ckpt["temperatures"], "loop")(normalize(images)).argmax(1).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--seconds", type=int, default=10, help="per concurrency point")
    parser.add_argument("--setups", default="baseline,project,project-onnx",
                        help="baseline, project (the default variant), project-onnx, project-int8, project-no-trust "
                             "(the same without temperature and \"not a digit\" detector: what they cost)")
    parser.add_argument("--digits", type=int, default=200, help="distinct MNIST test digits cycled through")
    parser.add_argument("--out", default="artifacts/bench", type=Path)
    parser.add_argument("--variants-only", action="store_true", help="only the in-process variant table")
    parser.add_argument("--variant", default=None, help="archive variant the project serves (default: the default)")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile rows out")
    parser.add_argument("--no-variants", action="store_true", help="leave the in-process variant table out")
    parser.add_argument("--no-worst-case", action="store_true",
                        help="leave out the largest-image rows and the mixed load (bench/largest_images.py)")
    parser.add_argument("--model-config", default=ROOT / "configs" / "model-config.yaml", type=Path,
                        help="the project's TorchServe per-model settings (batch size, delay, workers)")
    parser.add_argument("--ensemble", type=Path, default=None, metavar="ENSEMBLE_PT",
                        help="one more row: this ensemble (make train-ensemble) served from one .mar")
    args = parser.parse_args(argv)
    machine = machine_line()
    print(machine, flush=True)
    if args.variants_only:
        if not args.checkpoint.is_file():
            print(f"error: no checkpoint at {args.checkpoint}: run `make train` first", file=sys.stderr)
            return 1
        table = variant_table(args.checkpoint, compiled=not args.no_compile)
        print(f"\n{machine_line()}\n\n{table}")
        write_record("bench-serve", {"tables": {"variants in-process": markdown_tables(table)[0]}},
                     baseline={"variant": "eager (its row)"})
        return 0
    if prerequisites_missing(args.checkpoint):
        return 1
    if args.ensemble is not None and not args.ensemble.is_file():
        print(f"error: no ensemble at {args.ensemble}: run `make train-ensemble` first", file=sys.stderr)
        return 1
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    worst: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        work = Path(tmp)
        digits, images, _ = write_digits(work / "digits", args.digits, None)
        model = model_from_checkpoint(load_checkpoint(args.checkpoint))
        with torch.inference_mode():
            expected = model(normalize(images)).argmax(1).tolist()  # what the offline model says
        store = work / "store"
        variant = args.variant or ARCHIVE_DEFAULT_VARIANT
        build_archive(args.checkpoint, store, "mnist", "1.0", variant, model_config=args.model_config)
        threads = int(os.environ.get("MNIST_WORKER_THREADS", "1"))
        ceiling = in_process_rps(args.checkpoint, variant, images, threads)
        print(f"  in-process ceiling: {ceiling:,.0f} digits/s ({variant}, batch 32, {threads} thread(s))", flush=True)
        setups = args.setups.split(",") + (["ensemble"] if args.ensemble is not None else [])
        for setup in setups:
            setup_store, answers = store, expected
            if setup == "baseline":
                baseline_archive(args.checkpoint, store, work / "baseline")
            elif setup == "project-no-trust":  # the same weights without temperature and "not a digit" detector
                setup_store = work / f"store-{setup}"
                bare = {k: v for k, v in load_checkpoint(args.checkpoint).items() if k not in ("ood", "temperature")}
                atomic_save(bare, work / "no-trust.pt")
                build_archive(work / "no-trust.pt", setup_store, "mnist", "1.0", variant,
                              model_config=args.model_config)
            elif setup.startswith("project-"):  # project-onnx, project-int8: the same server, another variant
                setup_store = work / f"store-{setup}"
                build_archive(args.checkpoint, setup_store, "mnist", "1.0", setup.removeprefix("project-"))
            elif setup == "ensemble":
                build_archive(args.ensemble, store, "ensemble", "1.0", ensemble=True)
                answers = ensemble_answers(args.ensemble, images)
            name = {"baseline": "baseline", "ensemble": "ensemble"}.get(setup, "mnist")
            # The baseline keeps TorchServe's defaults: no tuned netty threads or heap settings.
            extra = {"number_of_netty_threads": "0", "netty_client_threads": "0"} if setup == "baseline" else {}
            server = TorchServe.on_free_ports(work / f"run-{setup}", setup_store, model_name=name,
                                              extra_properties=extra)

            def parse(body: bytes, setup=setup) -> int:
                data = json.loads(body)
                return int(data) if setup == "baseline" else data["digit"]

            then = None
            if setup == "project" and not args.no_worst_case:
                def then(srv: TorchServe) -> None:
                    worst.extend(worst_case_rows(srv, work / "worst", digits, expected, args.seconds))
            rows += bench_setup(setup, server, work / f"{setup}.lua", digits, answers, parse, concurrencies,
                                args.seconds, then)
        # Measured again after the load: on a shared machine the better of the two is the ceiling.
        ceiling = max(ceiling, in_process_rps(args.checkpoint, variant, images, threads))
        for row in rows:
            row["in_process_rps"] = ceiling if row["setup"] == "project" else None
    table = serving_table(rows)
    variants = "" if args.no_variants else variant_table(args.checkpoint, compiled=not args.no_compile)
    (args.out / "serving.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_serving(rows, args.out / "serving.png")
    print(f"\n{machine}\nat the end: load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"serving benchmark: {os.cpu_count()} CPUs, {args.seconds}s per point, {args.digits} MNIST test digits "
          f"as PNG, variant {variant}, in-process ceiling {ceiling:,.0f}/s, torch {torch.__version__}\n")
    print(table)
    if variants:
        print("\nmodel variants, in-process (one thread, channels_last, full MNIST test set):\n")
        print(variants)
    if worst:
        print(f"\nthe worst accepted requests ({args.variant or ARCHIVE_DEFAULT_VARIANT}, bench/largest_images.py):\n")
        print(worst_case_table(worst))
    tables = {"served": markdown_tables(table)[0], **({"variants in-process": markdown_tables(variants)[0]}
                                                     if variants else {}),
              **({"worst case": markdown_tables(worst_case_table(worst))[0]} if worst else {})}
    record = write_record("bench-serve", {"tables": tables, "rows": rows, "worst_case_rows": worst, "variant": variant,
                                          "seconds_per_point": args.seconds},
                          baseline={"setup": "baseline (TorchServe's MNIST example setup)", "in_process_rps": ceiling})
    print(f"\nwrote {args.out}/serving.json, {args.out}/serving.png and {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
