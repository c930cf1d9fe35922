"""``python -m finetune [overrides]``: the Hydra application."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune.config import register_schema
from finetune.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_schema()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def train(cfg: DictConfig) -> float | None:
    """Run one fine-tune; returns the best monitored value (what a Hydra sweeper optimises)."""
    from finetune.run import run

    try:
        final = run(cfg)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("finetune").debug("stopped by a user error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return final.get("best/value")


def main() -> None:
    train()


if __name__ == "__main__":
    main()
