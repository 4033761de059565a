"""Run by tests/test_ddp.py under torchrun: the trainer, with rank 1 failing in its first epoch."""

import os
import sys

import training.train as train

if __name__ == "__main__":
    real_epoch = train.train_epoch

    def failing_epoch(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("injected failure on rank 1")
        return real_epoch(*args, **kwargs)

    train.train_epoch = failing_epoch
    sys.exit(train.main())
