"""Run by tests/test_lifecycle.py under torchrun: every process has a sweep trial's `TrialReporter`,
rank 0 alone talks to the study, and all of them must stop at the epoch its pruner says; each rank
writes what it saw as JSON.

    torchrun --standalone --nproc_per_node=2 tests/ddp_trial_worker.py STORAGE_URL OUT_PREFIX
"""

import json
import sys
from pathlib import Path

from finetune import distributed
from finetune.errors import RunPruned
from finetune.optuna_trial import TrialReporter
from finetune.trainer import TrainState


class Scalars:
    def __init__(self, acc1: float):
        self.acc1 = acc1

    def scalars(self) -> dict[str, float]:
        return {"val/acc1": self.acc1}


def main(storage: str, out: str) -> None:
    world = distributed.init()
    reporter = TrialReporter(study="s", storage=storage, trial=0, monitor="val/acc1", world=world)
    # Each rank sees a different value: only rank 0's reaches the study, and its verdict everyone's.
    values = [0.9, 0.2, 0.2] if world.main else [0.0, 0.9, 0.9]
    pruned_at = None
    for epoch, value in enumerate(values, start=1):
        try:
            reporter.on_epoch_end(TrainState(epoch=epoch, global_step=epoch * 10), {}, Scalars(value), False)
        except RunPruned:
            pruned_at = epoch
            break
    reporter.close()
    Path(f"{out}{world.rank}.json").write_text(json.dumps({"pruned_at": pruned_at, "talks": reporter.storage is not None}))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
