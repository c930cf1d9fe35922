"""One Optuna trial seen from inside its run: report the monitored value each epoch, stop when pruned.

The project's sweeper (``hydra_plugins/finetune_optuna_sweeper``) launches each job with
``sweep.study``, ``sweep.storage`` and ``sweep.trial``; ``build_run`` then adds a
``TrialReporter`` to the trainer's hooks. The job and the sweeper share nothing but the
study's storage (the pruner spec included, as a study attribute), so this works the same when
a launcher runs the job in another process or on another machine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from finetune.distributed import SINGLE, World
from finetune.errors import RunPruned, UserError, describe_error
from finetune.metrics import EvalResult
from finetune.trainer import TrainerHook, TrainState

log = logging.getLogger("finetune")

# ``pruner: NAME`` in the sweeper config -> the optuna.pruners class (its default settings).
PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
PRUNER_ATTR = "finetune.pruner"  # the study's user attribute that holds the pruner spec


def build_pruner(spec: str | Mapping | None) -> Any:
    """``median`` | ``hyperband`` | ``none``, or ``{_target_: optuna.pruners.NAME, **kwargs}``.

    The spec is also read back from a study's storage, which may be someone else's file: only
    classes of ``optuna.pruners`` are built from it, never an arbitrary ``_target_``, with
    keyword arguments of plain values; any other spec is a `UserError`, never a traceback.

    >>> type(build_pruner({"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5})).__name__
    'ThresholdPruner'
    """
    import optuna

    if spec is None or isinstance(spec, str):
        name = spec or "none"
        if name not in PRUNERS:
            raise UserError(f"hydra.sweeper.pruner {name!r:.80} is unknown: use one of {', '.join(PRUNERS)} "
                            "or {_target_: optuna.pruners.NAME, ...}")
        return getattr(optuna.pruners, PRUNERS[name])()
    if not isinstance(spec, Mapping):
        raise UserError(f"hydra.sweeper.pruner {spec!r:.80} is neither a name nor a mapping: use one of "
                        f"{', '.join(PRUNERS)} or {{_target_: optuna.pruners.NAME, ...}}")
    kwargs = dict(spec)
    target = kwargs.pop("_target_", "")
    module, _, name = str(target).rpartition(".")
    cls = getattr(optuna.pruners, name, None) if isinstance(target, str) and module == "optuna.pruners" else None
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        raise UserError(f"hydra.sweeper.pruner._target_ {target!r:.80} is not a pruner: use optuna.pruners.NAME "
                        f"(e.g. optuna.pruners.MedianPruner) or one of {', '.join(PRUNERS)}")
    plain = (str, int, float, bool, type(None))
    if not all(isinstance(key, str) and isinstance(value, plain) for key, value in kwargs.items()):
        raise UserError(f"hydra.sweeper.pruner {spec!r:.120} has an argument that is not a name with a plain "
                        f"value (a number, a string, true/false or null): give {name} its arguments as such")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"hydra.sweeper.pruner {spec!r:.120} cannot be built ({describe_error(err)}): "
                        f"give {name} the arguments optuna documents for it") from None


def open_trial(study_name: str, rdb: Any, number: int) -> Any | None:
    """The running trial ``number`` of that study in ``rdb`` (an optuna storage: the sweeper's guarded one), with
    the study's pruner; ``None`` if it has finished (a job dir resumed by hand after its sweep: it
    replays ``sweep.trial``, but that trial is over)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study_id = rdb.get_study_id_from_name(study_name)
        trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:
        raise UserError(f"sweep.trial {number} of study '{study_name}' is not in '{getattr(rdb, 'where', None) or rdb.url}': the sweep.* keys "
                        "are set by the Optuna sweeper, not by hand") from None
    state = rdb.get_trial(trial_id).state
    if state != TrialState.RUNNING:
        log.warning(f"trial {number} of study '{study_name}' has already finished ({state.name}): "
                    "this run reports to no trial")
        return None
    pruner = build_pruner(rdb.get_study_user_attrs(study_id).get(PRUNER_ATTR))
    study = optuna.load_study(study_name=study_name, storage=rdb, pruner=pruner)
    return optuna.trial.Trial(study, trial_id)


class TrialReporter(TrainerHook):
    """Reports the monitored metric to the sweep's trial after every epoch; raises ``RunPruned``
    when the study's pruner says the trial is hopeless (the run is then recorded as ``pruned``).

    Every process of a DDP run has one: rank 0 alone talks to the study, and its verdict reaches
    every process (`World.agree`), so all of them stop at the same epoch. Optuna never sees a NaN or
    infinite value: such an epoch is not reported.
    """

    def __init__(self, *, study: str, storage: str, trial: int, monitor: str, logger: Any = None,
                 world: World = SINGLE):
        """``logger``: a `finetune.loggers.Logger` that also records the pruning (optional)."""
        self.monitor, self.logger, self.world = monitor, logger, world
        self.storage = self.trial = None
        if world.main:
            # The storage a sweep's job reports to may be someone else's (a job dir resumed by hand replays
            # its sweep.storage): the sweeper's guard, so no pickle is read and no request hangs.
            from hydra_plugins.finetune_optuna_sweeper._guard import open_storage

            self.storage = open_storage(storage)
            self.trial = open_trial(study, self.storage, trial)

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        value = (result.scalars() | logs)[self.monitor]
        if not self.world.agree(self._report(value, epoch=state.epoch)):
            return
        message = f"pruned by the sweep's pruner at epoch {state.epoch} ({self.monitor} {value:.4f})"
        if self.logger is not None:
            self.logger.log_text("sweep/pruned", message, step=state.global_step)
        raise RunPruned(message)

    def _report(self, value: float, *, epoch: int) -> bool:
        """Report ``value`` (rank 0); whether the pruner says to stop."""
        from optuna.exceptions import UpdateFinishedTrialError

        if self.trial is None or not math.isfinite(value):
            return False
        try:
            self.trial.report(value, step=epoch)
        except UpdateFinishedTrialError:  # a shared study: its sweeper's heartbeat came late, another failed it
            log.warning(f"trial {self.trial.number} was failed by another sweeper, which took it for dead "
                        "(hydra.sweeper.heartbeat_s): this run goes on, reporting to no trial")
            self.trial = None
            return False
        return self.trial.should_prune()

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()  # the run is over: its database connections too
