"""The sweeper's config, registered as ``hydra/sweeper: finetune_optuna``.

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module before it is
in ``sys.modules``, where ``dataclass`` would look to resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # OmegaConf's schema types, as in finetune/config.py

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.finetune_optuna_sweeper.sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler itself (grid search space, seed on continue)
    direction: Optional[str] = None  # maximize | minimize; null: checkpoint.mode, else from checkpoint.monitor's name
    n_trials: int = 20  # null storage: the study's total (a re-run runs the missing ones); else this process's trials
    n_jobs: int = 1  # trials asked at once and launched together (one launcher batch)
    study_name: str = "finetune"
    # null: sqlite:///SWEEP_DIR/optuna.db; shared by sweepers: an SQLAlchemy URL (postgresql+psycopg2://USER@HOST/DB)
    # or journal:PATH (a file on a filesystem every sweeper sees)
    storage: Optional[str] = None
    heartbeat_s: int = 60  # shared storage: a trial whose sweeper is silent this long is failed and queued again
    sampler: Any = "tpe"  # tpe | random | grid | cmaes | nsgaii | qmc | gp (seeded) | {_target_: optuna.samplers.X}
    pruner: Any = "median"  # median | hyperband | none | {_target_: optuna.pruners.NAME, ...kwargs}
    params: Dict[str, str] = field(default_factory=dict)  # key: interval(a,b) | range(a,b[,step]) | choice(...) | value


ConfigStore.instance().store(group="hydra/sweeper", name="finetune_optuna", node=OptunaSweeperConf,
                             provider="finetune")
