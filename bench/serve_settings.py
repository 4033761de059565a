"""Serving settings side by side: the default model config at several `maxBatchDelay`s, and the low-latency profile.

`python -m bench.serve_settings` builds one archive per setting from the same checkpoint and variant,
serves each in turn on free loopback ports and drives it with wrk at each concurrency (bench/serve.py's
machinery), in `--rounds` interleaved rounds: on a shared machine a neighbour's burst then lands on
every setting alike. The question it answers: does a shorter batch delay, which spares a lone request
the wait for a batch that will not come, cost throughput under load (where the queue fills batches anyway)?

A delay of 0 cannot come from an archive: TorchServe 0.12 reads 0 there as unset and waits its default
100 ms. It is served through a startup snapshot instead (config.properties' `model_snapshot`, as the
KServe bundle starts), which TorchServe takes as it is. Each row says which batch size and delay the
server reported (its describe-model answer), so a label can never claim a setting that did not serve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from bench.load import write_digits
from bench.record import markdown_tables, write_record
from bench.report import machine_line
from bench.serve import ROOT, bench_setup
from serving.archive import build_archive
from serving.kserve import model_snapshot
from serving.server import TorchServe
from serving.worker.variants import ARCHIVE_DEFAULT_VARIANT
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.core.tensors import normalize

DEFAULT_CONFIG = ROOT / "configs" / "model-config.yaml"
LOW_LATENCY = ROOT / "configs" / "model-config-lowlatency.yaml"


def setting_configs(delays: list[int], low_latency: bool, work: Path) -> dict[str, Path]:
    """{label: model-config file}: the default file with each delay, and the low-latency profile as it is.
    A delay of 0 is packed as the default file's own delay and served through a snapshot (`snapshot_property`)."""
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    configs = {}
    for delay in delays:
        path = work / f"model-config-delay{delay}.yaml"
        path.write_text(yaml.safe_dump({**base, "maxBatchDelay": delay or base["maxBatchDelay"]}))
        how = " (startup snapshot)" if delay == 0 else ""
        configs[f"{base['minWorkers']} workers, batch {base['batchSize']}, delay {delay} ms{how}"] = path
    if low_latency:
        configs["low-latency profile (1 worker, batch 1)"] = LOW_LATENCY
    return configs


def snapshot_property(mar: Path, delay: int) -> dict[str, str]:
    """config.properties' `model_snapshot` serving `mar` with the default settings and `delay` ms."""
    return {"model_snapshot": json.dumps(model_snapshot(mar, max_batch_delay=delay), separators=(",", ":"))}


def table(rows: list[dict]) -> str:
    lines = ["| setting | served: batch, delay ms | round | conc. | req/s | p50 ms | p99 ms | errors | wrong answers |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setup']} | {r['served']} | {r['round']} | {r['concurrency']} | {r['rps']:,.0f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx'] + r['socket_errors']} | {r['wrong']}/{r['checked']} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_settings", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="artifacts/model.pt", type=Path)
    parser.add_argument("--delays", default="0,1,5",
                        help="maxBatchDelay values (ms) of the default config; 0 is served through a startup snapshot")
    parser.add_argument("--no-low-latency", action="store_true", help="leave the low-latency profile out")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--seconds", type=int, default=8, help="per concurrency point")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", default=ARCHIVE_DEFAULT_VARIANT)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: no checkpoint at {args.checkpoint}: run `make train` first", file=sys.stderr)
        return 1
    print(machine_line(), flush=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-settings-") as tmp:
        work = Path(tmp)
        digits, images, _ = write_digits(work / "digits", 200, None)
        with torch.inference_mode():
            expected = model_from_checkpoint(load_checkpoint(args.checkpoint))(normalize(images)).argmax(1).tolist()
        delays = [int(d) for d in args.delays.split(",")]
        configs = setting_configs(delays, not args.no_low_latency, work)
        # The delays' labels come first (then the low-latency profile's): a delay of 0 is served by snapshot.
        by_snapshot = {label for label, delay in zip(configs, delays, strict=False) if delay == 0}
        stores, extra = {}, {}
        for i, (label, config) in enumerate(configs.items()):
            stores[label] = work / f"store{i}"
            built = build_archive(args.checkpoint, stores[label], "mnist", "1.0", args.variant, model_config=config)
            if label in by_snapshot:
                extra[label] = snapshot_property(built.path, 0)
        served: dict[Path, str] = {}  # run directory: the batch size and delay its server reported

        def describe(server: TorchServe) -> None:
            info = server.describe()
            served[server.run_dir] = f"{info['batchSize']}, {info['maxBatchDelay']}"

        for round_ in range(1, args.rounds + 1):
            for i, (label, store) in enumerate(stores.items()):
                server = TorchServe.on_free_ports(work / f"run-{round_}-{i}", store,
                                                  extra_properties=extra.get(label, {}))
                found = bench_setup(label, server, work / "settings.lua", digits, expected,
                                    lambda body: json.loads(body)["digit"], concurrencies, args.seconds,
                                    then=describe)
                rows += [{**row, "served": served[server.run_dir], "round": round_} for row in found]
    text = table(rows)
    print(f"\n{machine_line()}\nat the end: load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(text)
    record = write_record("serve-settings", {"tables": {"settings": markdown_tables(text)[0]}, "rows": rows,
                                                   "variant": args.variant, "seconds_per_point": args.seconds},
                          baseline={"setting": "each row's round: the settings ran one after the other in it"})
    print(f"\nwrote {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
