"""How to batch an ensemble's members: grouped convolutions vs torch.func vmap vs a Python loop.

`python -m bench.ensemble`: the served architecture (configs/train.yaml's model), N members with
the fused serving variant, one intra-op thread as a TorchServe worker runs, channels_last inputs;
milliseconds per batch (best of the repeats, warm-up excluded) at the batch sizes a worker sees.
The weights are random: speed does not depend on their values. All methods run in the same
process, interleaved, so the ratios hold even on a busy machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from serving.worker.variants import serving_model
from training import config as cfglib
from training.core.ensemble import METHODS, build_ensemble
from training.core.model import Net
from training.train_config import DEFAULT_CONFIG, TrainConfig


def timed(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` ms per forward for each model, the models interleaved call by call.

    Interleaving and the minimum: on a shared machine a neighbour's burst then hits one sample of
    every method rather than all samples of one, and the least disturbed run is what the code costs.
    """
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1000 for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    architecture = cfglib.apply(TrainConfig(), cfglib.load_yaml(DEFAULT_CONFIG)).model
    print(f"| members | batch | single model ms | {' | '.join(f'{m} ms' for m in METHODS)} | fastest |")
    print("|---:|---:|---:|" + "---:|" * len(METHODS) + "---|")
    for n in args.members:
        members = []
        for seed in range(n):
            torch.manual_seed(seed)
            members.append(serving_model(Net(architecture), "fused"))
        models = {m: build_ensemble(members, None, m) for m in METHODS}
        for batch in args.batch_sizes:
            x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            ms = timed({"single": members[0], **models}, x, args.repeats)
            single = ms.pop("single")
            best = min(ms, key=ms.__getitem__)
            print(f"| {n} | {batch} | {single:.2f} | " + " | ".join(f"{ms[m]:.2f}" for m in METHODS) + f" | {best} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
