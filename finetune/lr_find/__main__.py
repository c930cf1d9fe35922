"""``python -m finetune.lr_find [overrides]``: only the range test of ``optim.lr=auto``, printed and drawn.

Takes the same overrides as ``python -m finetune``; writes ``lr_find.json`` and ``lr_find.png``
into its run dir (``hydra.run.dir``) and trains nothing.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from finetune.__main__ import CONFIG_PACKAGE
from finetune.config import register_schema
from finetune.errors import UserError, message_of

register_schema()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def find(cfg: DictConfig) -> None:
    from finetune.run import find_lr

    try:
        record = find_lr(cfg)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message_of(err)}", file=sys.stderr)
        sys.exit(2)
    verdict = "chose" if record["chosen"] is not None else "found no trustworthy rate, would fall back to"
    print(f"lr_find: {verdict} {record['lr']:.4g} ({record['reason']}); "
          f"train with optim.lr={record['lr']!r} or optim.lr=auto")


if __name__ == "__main__":
    find()
