"""``python -m finetune.lr_find [overrides]``: only the search of ``optim.lr=auto`` (the range test, then the
trials), printed and drawn.

Takes the same overrides as ``python -m finetune``; writes ``lr_find.json`` and ``lr_find.png``
into its run dir (``hydra.run.dir``) and trains nothing.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from finetune.cli import exit_on_user_error
from finetune.config import CONFIG_PACKAGE, register_schema

register_schema()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def find(cfg: DictConfig) -> None:
    from finetune.run import find_lr

    record = exit_on_user_error(lambda: find_lr(cfg))
    verdict = "found no trustworthy rate, would fall back to" if record["selected_by"] == "fallback" else "chose"
    print(f"lr_find: {verdict} {record['lr']:.4g} ({record['choice']}); "
          f"train with optim.lr={record['lr']!r} or optim.lr=auto")


if __name__ == "__main__":
    find()
