"""Train the MNIST CNN: `make train`, `python -m training.train`, or `torchrun ... -m training.train`.

The script: flags and configs/train.yaml → TrainConfig → `fit` (training/loop.py), errors as one line.
"""

from __future__ import annotations

import sys

from training import config as cfglib
from training.checkpoint import CheckpointError
from training.cli import ArgumentParser
from training.data import DataError
from training.loop import fit
from training.run_files import RESUME_MAY_CHANGE
from training.run_options import RunOptions
from training.train_config import DEFAULT_CONFIG, TrainConfig, from_command_line


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file (default: configs/train.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in <out_dir>/last.pt with its saved config (flags may change "
                             "only " + ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_MAY_CHANGE) + ")")
    parser.add_argument("--dry-run", action="store_true",
                        help="3 batches per epoch, scored on slices: a quick check of the whole path")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--force", action="store_true",
                        help="replace model.pt even if the new model is worse or not comparable")
    parser.add_argument("--test-every-epoch", action="store_true", help="score the test set after every epoch")
    cfglib.add_flags(parser, TrainConfig())
    args = parser.parse_args(argv)
    try:
        cfg = from_command_line(args, args.config)
        flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
        fit(cfg, RunOptions(resume=args.resume, dry_run=args.dry_run, quiet=args.quiet, force=args.force,
                            test_every_epoch=args.test_every_epoch, flags=flags))
    except (ValueError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is in {cfg.out_dir}/last.pt; "
              "continue with `make train ARGS=--resume`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
