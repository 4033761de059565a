"""Run by tests/test_ddp.py under torchrun: the trainer, with some ranks failing at the start of an epoch.

DDP_FAIL_RANKS (default "1"), DDP_FAIL_EPOCH (default 1) and DDP_FAIL_WITH ("error", or "interrupt"
for a Ctrl-C) choose which ranks stop, when, and how.
"""

import os
import sys
from pathlib import Path

# Run as a script, its own folder comes first on sys.path: put the repository it belongs to before
# any installed copy, so the code tested is the code beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import training.loop as loop
import training.train as train

if __name__ == "__main__":
    real_epoch = loop.train_epoch
    ranks = os.environ.get("DDP_FAIL_RANKS", "1").split(",")
    epoch = int(os.environ.get("DDP_FAIL_EPOCH", "1"))
    interrupt = os.environ.get("DDP_FAIL_WITH", "error") == "interrupt"

    def failing_epoch(*args, **kwargs):
        if os.environ.get("RANK") in ranks and args[6] == epoch:  # train_epoch(model, opt, sched, data, cfg, dd, epoch…
            if interrupt:
                raise KeyboardInterrupt
            raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
        return real_epoch(*args, **kwargs)

    loop.train_epoch = failing_epoch
    sys.exit(train.main())
