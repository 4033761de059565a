"""The plain recipe, the baseline row of `make bench-train`: what a first MNIST tutorial trains, timed per epoch.

The mission's CNN without the project's additions: conv 32 → conv 64 (3×3, padding 1, ReLU, 2×2
max-pool each), fc 128, fc 10; no batch norm, no dropout, no augmentation; plain SGD at lr 0.01 without
momentum; batch 64 from a torchvision DataLoader with ToTensor + Normalize, fp32, the default thread
count. Its seconds per epoch on this machine, measured in the same run, are the unit bench/train.py
divides every config's time-to-accuracy by, so the ratio means the same on a fast and a slow machine.
`python -m bench.plain --epochs 1` prints one JSON line per epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from training.core.inputs.preprocess import MNIST_MEAN, MNIST_STD
from training.data import ensure_mnist


def plain_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def loaders(root: str | None, batch_size: int = 64, limit: int = 0):
    from torchvision import datasets, transforms

    raw = ensure_mnist(root, log=lambda msg: print(msg, file=sys.stderr))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    train = datasets.MNIST(str(raw.parent.parent), train=True, download=False, transform=transform)
    test = datasets.MNIST(str(raw.parent.parent), train=False, download=False, transform=transform)
    if limit:
        train = torch.utils.data.Subset(train, range(limit))
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(test, batch_size=1000))


def test_accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def run(epochs: int = 1, seed: int = 0, root: str | None = None, limit: int = 0) -> list[dict]:
    """Train the plain recipe; per epoch: wall seconds of the epoch (data loading included, as the
    tutorial pays it; evaluation excluded) and the test accuracy after it."""
    torch.manual_seed(seed)
    train, test = loaders(root, limit=limit)
    model = plain_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "seconds": seconds, "test_accuracy": test_accuracy(model, test),
                        "images": len(train.dataset), "threads": torch.get_num_threads()})
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-limit", type=int, default=0, help="first N training images only (tests)")
    args = parser.parse_args(argv)
    for row in run(args.epochs, args.seed, args.data_dir, args.train_limit):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
