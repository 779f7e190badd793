"""Helper for tests/test_multiprocess.py: one `preflens.train` run, launched by torchrun.

    torchrun --nproc_per_node 2 tests/_mp_train_script.py CONFIG.json

CONFIG.json holds TrainConfig fields. Under torchrun the trainer's `Accelerator()` picks up the
process group from the environment (gloo on a CPU), so this is exactly the code path of
`accelerate launch` on GPUs, minus the launcher.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from preflens.train import TrainConfig, train

    with open(sys.argv[1]) as f:
        fields = json.load(f)
    train(TrainConfig(**fields))


if __name__ == "__main__":
    main()
