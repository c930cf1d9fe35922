"""Resuming a run: find a valid training state, refuse experiment changes, restore everything.

A run's resume is one `ResumePlan`: located once from the config and the run dir (before anything
is built or written), placed at this run's world size once the loaders exist, and applied once,
right before training. What the rest of a run needs to know of it (start from pretrained weights
or not, the rate ``optim.lr=auto`` chose before, how TensorBoard and the manifest continue) are
the plan's properties.

``resume`` (top-level config key) is one of

* ``auto``: the newest valid state in this run's ``checkpoints/manifest.json``; a fresh
  start (with a notice) when there is none yet;
* ``RUN_DIR``: the newest valid state of that run (``python -m finetune resume=RUN_DIR``
  also reuses its saved overrides and directory, see ``finetune.__main__``);
* ``FILE.ckpt``: that training-state file;
* ``URL`` (``s3://bucket/runs/NAME``): the run mirrored there (``checkpoint.mirror``), fetched into this
  run's empty checkpoint directory first (`fetch_from_mirror`), then continued as ``auto`` would.
  ``auto`` with ``checkpoint.mirror`` set fetches the mirror too when nothing is saved here yet.

Candidates are checked against the manifest (size, sha256) and loaded with
``weights_only=True``; with ``auto`` or ``RUN_DIR`` a bad one is skipped with a warning
naming it, and the previous valid one is used. Restoring happens last, right before
training: model, optimizer, scheduler, grad scaler, EMA, freezing schedule, checkpoint
policy, the loop's counters, and finally every RNG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.checkpoint import (Checkpointer, Manifest, TrainingParts, check_policy_state, load_training_state,
                                 set_rng_state, verify_file)
from finetune.checkpoint.mirror import Mirror, fetch_checkpoints, is_url
from finetune.distributed import SINGLE, World
from finetune.errors import UnexpectedReadError, UserError
from finetune.files import load_yaml_data
from finetune.loggers import MetricsJsonl
from finetune.rundir import occupied_run_dir
from finetune.trainer import TrainState

log = logging.getLogger("finetune")

# Keys that may differ from the saved run: they change how it runs, not what it computes
# (checkpoint cadence included). ``trainer.max_epochs`` may change too: the learning-rate
# schedule is then rebuilt for the new length (see ``restore_training``).
ALLOWED_CHANGES = ("trainer.max_epochs", "data.num_workers", "trainer.device", "logger.", "resume",
                   "resume_allow_config_change", "resume_allow_unverified", "checkpoint.every_n_steps",
                   "checkpoint.every_n_epochs", "checkpoint.keep_last_k", "checkpoint.mirror",
                   "checkpoint.storage_options.", "checkpoint.mirror_flush_timeout", "data.storage_options.",
                   "sweep.")
# Keys a later version moved: a state saved before reads as if saved with the new name.
RENAMED = {"trainer.early_stopping.min_delta": "checkpoint.min_delta"}


@dataclass
class ResumePoint:
    """A verified training state to continue from."""

    path: Path
    state: dict[str, Any]
    in_place: bool  # the file lives in this run's checkpoint directory
    invalid: tuple[str, ...] = field(default=())  # newer files of that directory that failed verification
    unverified: bool = False  # it loads but did not match its manifest entry (resume_allow_unverified)
    rescaled: str | None = None  # saved at another world size: what changed (``at_world_size``)

    @property
    def step(self) -> int:
        return int(self.state["train_state"]["global_step"])


@dataclass
class ResumePlan:
    """Where a run starts: a fresh start (``point`` None) or a verified training state.

    ``resuming``: ``cfg.resume`` was set (``resume=auto`` with nothing saved yet is a fresh start
    that drops an earlier attempt's metrics).
    """

    point: ResumePoint | None
    resuming: bool
    placed: bool = False

    @classmethod
    def locate(cls, cfg: DictConfig, *, run_dir: Path, world: World = SINGLE,
               mirror: Mirror | None = None) -> ResumePlan:
        """What this run continues from (``cfg.resume``), verified, with the config change checked
        (refused, in one line, when the change is not allowed); a fresh start is refused in a
        directory that holds a run's checkpoints. From a mirror, rank 0 fetches it first (``mirror``:
        this run's own, told what the mirror holds)."""
        if is_url(cfg.resume) or (cfg.resume == "auto" and cfg.checkpoint.mirror):  # alike on every rank
            if world.main:
                fetch_from_mirror(cfg.resume, mirror_url=cfg.checkpoint.mirror, checkpoint_dir=run_dir / "checkpoints",
                                  storage_options=OmegaConf.to_container(cfg.checkpoint.storage_options, resolve=True),
                                  mirror=mirror)
            world.barrier()
        point = locate_resume(cfg.resume, checkpoint_dir=run_dir / "checkpoints",
                              allow_unverified=cfg.resume_allow_unverified)
        if point is not None:
            check_config_change(point.state["config_yaml"], cfg, source=point.path,
                                allow=cfg.resume_allow_config_change)
        return cls(point, resuming=cfg.resume is not None)

    @property
    def fresh(self) -> bool:
        """Nothing to continue: the model starts from its pretrained weights."""
        return self.point is None

    @property
    def lr_record(self) -> dict[str, Any] | None:
        """How ``optim.lr=auto`` chose the rate in the saved run (a resume never searches again)."""
        return dict(self.point.state["lr_find"]) if self.point is not None and self.point.state.get("lr_find") else None

    @property
    def source(self) -> Path | None:
        return self.point.path if self.point is not None else None

    @property
    def new_manifest(self) -> bool:
        """The run's checkpoints start an empty manifest (a fresh start, or a state from another dir)."""
        return self.point is None or not self.point.in_place

    def tensorboard(self) -> dict[str, Any]:
        """How TensorBoard continues (`tensorboard_continuation`): ``purge_step`` and ``replay``."""
        return tensorboard_continuation(self.point, resuming=self.resuming)

    def tracker_ids(self) -> dict[str, str]:
        """The trackers' run ids a resume in the same run dir continues (MLflow, W&B); none otherwise."""
        if self.point is None or not self.point.in_place:
            return {}
        saved = self.point.state.get("trackers")
        return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}

    def place(self, *, loaders: Any, world: World, accumulate: int) -> None:
        """Fit the saved position to this run's world size (`at_world_size`), once the loaders exist."""
        if self.placed:
            raise RuntimeError("a resume plan is placed once")
        if self.point is not None:  # a fresh start has nothing saved to compare the streams with
            check_same_streams(self.point, loaders.train_sampler)
        self.point, self.placed = at_world_size(self.point, world, loaders=loaders, accumulate=accumulate), True

    def apply(self, *, training: TrainingParts, checkpointer: Checkpointer, metrics: MetricsJsonl, max_epochs: int,
              world: World = SINGLE) -> TrainState | None:
        """Put the built run where the plan starts (the loop's state to continue from; None: fresh).
        RNG last: nothing may draw from them between here and training."""
        if self.point is None:
            if self.resuming:  # resume=auto with nothing saved yet
                metrics.rewind(epochs_done=0)
            return None
        return restore_training(self.point, training=training, checkpointer=checkpointer, metrics=metrics,
                                max_epochs=max_epochs, world=world)


def locate_resume(resume: str | None, *, checkpoint_dir: Path, allow_unverified: bool = False) -> ResumePoint | None:
    """The training state ``resume`` points at, verified; None for a fresh start.

    ``allow_unverified``: accept a state that fails its manifest check but loads as a valid
    training state (a manifest written wrong, e.g. by an older version); refused by default.
    """
    if resume is None:
        if refusal := occupied_run_dir(checkpoint_dir.parent):
            raise UserError(refusal)
        return None
    if is_url(resume):  # fetched into this run's checkpoint directory (`fetch_from_mirror`)
        return newest_valid_state(checkpoint_dir, required=True, allow_unverified=allow_unverified)
    if resume == "auto":
        point = newest_valid_state(checkpoint_dir, required=False, allow_unverified=allow_unverified)
        if point is None:
            log.info(f"resume=auto: no checkpoint in '{checkpoint_dir}' yet, starting fresh")
        return point
    path = Path(resume).expanduser()
    if path.is_dir():
        return newest_valid_state(path / "checkpoints", required=True, home=checkpoint_dir,
                                  allow_unverified=allow_unverified)
    if path.is_file():
        manifest = Manifest(path.parent / "manifest.json") if (path.parent / "manifest.json").exists() else None
        state, unverified = load_verified_state(path, manifest.files.get(path.name) if manifest else None,
                                                allow_unverified=allow_unverified)
        return _point(path, state, checkpoint_dir, (), unverified=unverified)
    raise UserError(f"resume '{resume}' is not auto, a run directory or a training-state file (.ckpt)")


def fetch_from_mirror(resume: str, *, mirror_url: str | None, checkpoint_dir: Path,
                      storage_options: dict[str, Any], mirror: Mirror | None) -> None:
    """``resume=URL``: the checkpoints mirrored at URL into ``checkpoint_dir``, which must hold none yet;
    ``resume=auto``: those of ``checkpoint.mirror``, when ``checkpoint_dir`` holds none (a fresh node)."""
    url = resume if is_url(resume) else mirror_url
    if (checkpoint_dir / "manifest.json").exists():
        if is_url(resume):
            raise UserError(f"resume '{resume}': '{checkpoint_dir}' already holds checkpoints: continue them with "
                            f"resume=auto checkpoint.mirror={resume}, or give an empty hydra.run.dir")
        return  # resume=auto: the checkpoints here are this run's own, the newest
    manifest = fetch_checkpoints(url, checkpoint_dir, storage_options=storage_options, required=is_url(resume))
    if manifest is not None and mirror is not None and mirror.url == url.rstrip("/"):
        mirror.know(manifest)


def newest_valid_state(directory: Path, *, required: bool, home: Path | None = None,
                       allow_unverified: bool = False) -> ResumePoint | None:
    """The newest training state listed in ``directory/manifest.json`` that verifies and loads."""
    manifest_path = directory / "manifest.json"
    names = Manifest(manifest_path).states() if manifest_path.exists() else []
    if not names:
        if required:
            raise UserError(f"'{directory.parent}' has no training state to resume from "
                            f"(no '{manifest_path}' listing a .ckpt file)")
        return None
    manifest, invalid = Manifest(manifest_path), []
    for name in names:
        try:
            state, unverified = load_verified_state(directory / name, manifest.files[name],
                                                    allow_unverified=allow_unverified)
        except UnexpectedReadError:
            raise  # not damage: an older state would fail alike, and falling back would drop progress unseen
        except UserError as err:
            log.warning(f"{err}: falling back to the previous checkpoint")
            invalid.append(name)
            continue
        return _point(directory / name, state, home or directory, tuple(invalid), unverified=unverified)
    raise UserError(f"no valid training state in '{directory}': {', '.join(invalid)} failed verification "
                    "(see the warnings above); start a new run or resume=FILE.ckpt from elsewhere")


def load_verified_state(path: Path, entry: dict[str, Any] | None, *,
                        allow_unverified: bool) -> tuple[dict[str, Any], bool]:
    """Load the training state at ``path`` after checking it against its manifest ``entry``.

    A file that fails the check but loads as a valid training state is reported as such (then
    the manifest, not the file, may be wrong) and used only with ``allow_unverified``.
    Returns the state and whether it was taken unverified.
    """
    try:
        verify_file(path, entry)
    except UserError as err:
        if not path.is_file():
            raise
        try:
            state = load_training_state(path)
        except UserError:
            raise err from None
        if not allow_unverified:
            raise UserError(f"{err}, but the file loads as a valid training state: the manifest may be wrong; "
                            "to resume from it anyway pass resume_allow_unverified=true") from None
        log.warning(f"{err}, but the file loads as a valid training state: resuming from it "
                    "(resume_allow_unverified=true)")
        return state, True
    return load_training_state(path), False


def _point(path: Path, state: dict[str, Any], checkpoint_dir: Path, invalid: tuple[str, ...], *,
           unverified: bool = False) -> ResumePoint:
    in_place = path.parent.resolve() == checkpoint_dir.resolve()
    point = ResumePoint(path=path, state=state, in_place=in_place, invalid=invalid if in_place else (),
                        unverified=unverified)
    ts = state["train_state"]
    log.info(f"resuming from '{path}': epoch {ts['epoch']}, step {ts['global_step']}, "
             f"{ts['batches_seen']} batches into the next epoch")
    return point


# ------------------------------------------------------------- config check
def check_config_change(saved_yaml: Any, cfg: DictConfig, *, allow: bool, source: Path) -> None:
    """Refuse settings that change the experiment saved in ``source``, unless ``allow``.

    The saved config is someone else's data when the run dir is: it is read as plain YAML (bounded, no
    aliases) and never resolved, so an ``${oc.env:...}`` in it stays text and prints no environment.
    """
    saved = {RENAMED.get(k, k): v for k, v in _flatten(saved_config(saved_yaml, source=source)).items()}
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [key for key in sorted(saved.keys() | now.keys())
               if saved.get(key, "<unset>") != now.get(key, "<unset>")
               and not any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED_CHANGES)]
    if not changed:
        return
    diff = "; ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in changed)
    if not allow:
        raise UserError(f"resume would change the experiment saved in '{source}': {diff}. Drop those "
                        "overrides, or pass resume_allow_config_change=true to resume anyway")
    log.warning(f"resuming with a changed experiment (resume_allow_config_change=true): {diff}")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= _flatten(value, f"{prefix}{key}.")
    return out


# ------------------------------------------------------------------ restore
def check_same_streams(point: ResumePoint | None, sampler: Any) -> None:
    """Shards (`finetune.data.stream`): the epoch's order depends on the streams per process (loader
    workers), so a resume mid-epoch with another count would train on other samples; refused in one line."""
    saved = ((point.state.get("data_order") or {}).get("streams") if point is not None else None)
    now = getattr(sampler, "workers", None)
    if saved is not None and now is not None and saved != now and point.state["train_state"]["batches_seen"]:
        raise UserError(f"'{point.path}' was saved mid-epoch reading the shards in {saved} stream(s) per process "
                        f"(loader workers), this run would read {now}: resume with data.num_workers={saved}")


def at_world_size(point: ResumePoint | None, world: World, *, loaders: Any, accumulate: int) -> ResumePoint | None:
    """``point`` as this world size continues it: unchanged when it was saved at the same size.

    At another size (DDP with more or fewer processes) the run continues from the same number of
    samples seen: the epoch's position is rounded down to an update of the new global batch (the
    few images past it are trained on again), the step counter and the learning-rate schedule are
    placed by samples seen; the samples keep their order, but the updates group them differently
    from what the old size would have done (a warning says so). Weights, optimizer moments and EMA are restored as saved.
    """
    if point is None:
        return None
    order = point.state.get("data_order") or {}
    saved = int(order.get("world_size") or 1)
    if saved == world.size:
        return point
    ts, sampler = point.state["train_state"], loaders.train_sampler
    batch_size = int(order.get("batch_size") or sampler.batch_size)
    pending = 0 < ts["epoch_batches"] <= ts["batches_seen"]  # all of the epoch trained, its evaluation not done
    seen = min(ts["batches_seen"] * batch_size * saved, sampler.epoch_length())
    batches = len(loaders.train) if pending else seen // (sampler.global_batch * accumulate) * accumulate
    updates_per_epoch = -(-len(loaders.train) // accumulate)
    before = ts["global_step"]
    ts.update(batches_seen=batches, epoch_batches=len(loaders.train) if batches else 0,
              global_step=ts["epoch"] * updates_per_epoch + -(-batches // accumulate))
    again = 0 if pending else seen - batches * sampler.global_batch
    point.rescaled = f"world size {saved} -> {world.size}"
    log.warning(f"'{point.path}' was saved by {saved} process(es), this run has {world.size}: it continues from the "
                f"same samples seen (epoch {ts['epoch']}, step {before} -> {ts['global_step']} in updates of "
                f"{sampler.global_batch} images{f', {again} images of this epoch trained again' if again else ''}); the "
                f"samples keep their order but updates now take {sampler.global_batch} of them instead of "
                f"{batch_size * saved}, so the result differs from an uninterrupted run at either size")
    return point


def tensorboard_continuation(point: ResumePoint | None, *, resuming: bool) -> dict[str, Any]:
    """How TensorBoard continues a resumed run without a step logged twice.

    In this run dir, events from the resumed step on are purged. When that step ended an epoch
    whose evaluation is still to come, its ``val/*`` is logged again, so the purge starts at the
    step itself and the step's own train scalars (saved in the state) are written back.
    ``resuming`` with no point (``resume=auto`` starting fresh): everything earlier is purged.
    """
    if not resuming:
        return {}
    if point is None or not point.in_place:
        return {"purge_step": 1}
    state = TrainState(**point.state["train_state"])
    if state.evaluation_pending:
        return {"purge_step": point.step, "replay": (point.step, state.step_logs)}
    return {"purge_step": point.step + 1}


def restore_training(point: ResumePoint, *, training: TrainingParts, checkpointer: Checkpointer,
                     metrics: MetricsJsonl, max_epochs: int, world: World = SINGLE) -> TrainState:
    """Load every part of ``point`` into the built run; RNG last (this process's own under DDP).
    Returns the loop's state."""
    s = point.state
    state = TrainState(**s["train_state"])
    check_length(max_epochs, state, source=point.path)
    training.model.load_state_dict(s["model"])
    configured = [{k: v for k, v in g.items() if k != "params"} for g in training.optimizer.param_groups]
    load_optimizer(training.optimizer, s["optimizer"], source=point.path)
    changes = changed_settings(training, configured, max_epochs=max_epochs,
                               saved_epochs=saved_max_epochs(s, source=point.path))
    changes += [point.rescaled] if point.rescaled else []
    if changes:  # allowed changes of the experiment: they take effect from here on
        restart_schedule(training, state, configured, changes)
    else:
        _load_optional(training.scheduler, s.get("scheduler"), "scheduler")
    _load_optional(training.grad_scaler, s.get("grad_scaler"), "grad scaler")
    _load_optional(training.ema, s.get("ema"), "EMA")
    _load_optional(training.freeze, s.get("freeze"), "freezing schedule")
    continue_checkpoints(checkpointer, point, state)
    if point.in_place:
        metrics.rewind(epochs_done=state.epoch)
    rngs = s.get("rng_per_rank") or [s["rng"]]
    if world.rank < len(rngs):  # a process the saved run did not have keeps its own seed_ranks stream
        set_rng_state(rngs[world.rank])  # last: nothing may draw from the RNGs between here and training
    return state


def check_length(max_epochs: int, state: TrainState, *, source: Path) -> None:
    if max_epochs < state.epoch:
        raise UserError(f"trainer.max_epochs={max_epochs} but '{source}' has already trained "
                        f"{state.epoch} epochs: resume with trainer.max_epochs>={state.epoch}")
    if max_epochs == state.epoch and not state.batches_seen:
        log.info(f"'{source}' has already trained all {state.epoch} epochs: nothing left to train "
                 "(raise trainer.max_epochs to train longer)")


def changed_settings(training: TrainingParts, configured: list[dict[str, Any]], *, max_epochs: int,
                     saved_epochs: int | None) -> list[str]:
    """Optimizer settings and the run's length that this config changes against the saved state."""
    owned = {"lr"} if training.scheduler is not None else set()  # the current rate: the scheduler's
    groups = training.optimizer.param_groups
    changes = [f"{g.get('name', i)}.{k}: {g.get(k)!r} -> {v!r}" for i, (g, c) in enumerate(zip(groups, configured))
               for k, v in c.items() if k not in owned and g.get(k) != v]
    if saved_epochs not in (None, max_epochs):
        changes.insert(0, f"trainer.max_epochs: {saved_epochs} -> {max_epochs}")
    return changes


def continue_checkpoints(manager: Checkpointer, point: ResumePoint, state: TrainState) -> None:
    """The checkpoint policy goes on from ``point``: its top-k list, the file resumed from kept; from
    another run's directory, that run's best and top-k files of that moment carried over."""
    policy_state = check_policy_state(point.state.get("checkpoint_policy"), directory=point.path.parent,
                                      named_in=point.path)
    if not point.in_place:
        carry_over(manager, point.path.parent, policy_state, state)
    manager.restore(policy_state, progress=state, resumed=point.path.name if point.in_place else None,
                    invalid=point.invalid, rehash=point.unverified)


def carry_over(manager: Checkpointer, source: Path, policy_state: dict[str, Any], state: TrainState) -> None:
    """Link (verified) the best and top-k weights the state knows of from ``source`` into this run."""
    wanted = [(e["name"], "top_k", e["epoch"]) for e in policy_state.get("top_k", [])]
    if policy_state.get("best") and state.best_epoch is not None:
        wanted.insert(0, (policy_state["best"], "best", state.best_epoch))
    if not wanted:
        return
    found = Manifest(source / "manifest.json") if (source / "manifest.json").is_file() else None
    for name, kind, epoch in wanted:
        entry = found.files.get(name) if found is not None else None
        try:
            if entry is None or entry.get("epoch") != epoch:
                raise UserError(f"'{source / name}' does not hold the {kind} weights of epoch {epoch}"
                                f"{'' if entry is None else ' (a later epoch replaced them)'}")
            verify_file(source / name, entry)
        except UserError as err:
            log.warning(f"{err}: not carried over; this run writes its own {kind} file when it improves "
                        f"on {manager.monitor} {state.best_value if kind == 'best' else ''}".rstrip())
            continue
        manager.adopt(source / name, entry, kind=kind)
        log.info(f"carried over {kind} weights of epoch {epoch} from '{source / name}'")


def saved_config(saved_yaml: Any, *, source: Path) -> dict[str, Any]:
    """The config a training state recorded, as plain data (`finetune.files.load_yaml_data`)."""
    if not isinstance(saved_yaml, str):
        raise UserError(f"'{source}' records no config (config_yaml is a {type(saved_yaml).__name__}): it was not "
                        "written by finetune")
    saved = load_yaml_data(saved_yaml, source=f"{source} (config_yaml)")
    if not isinstance(saved, dict):
        raise UserError(f"'{source}' records a config that is not a table: it was not written by finetune")
    return saved


def saved_max_epochs(state: dict[str, Any], *, source: Path) -> int | None:
    """``trainer.max_epochs`` of the run that wrote ``state`` (from its saved config)."""
    trainer = saved_config(state.get("config_yaml") or "{}", source=source).get("trainer")
    epochs = trainer.get("max_epochs") if isinstance(trainer, dict) else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def load_optimizer(optimizer: Any, saved: dict[str, Any], *, source: Path) -> None:
    """The saved optimizer state (moved to the parameters' device); a different grouping is one clear line."""
    try:
        optimizer.load_state_dict(saved)
    except ValueError as err:  # torch: "loaded state dict has a different number of parameter groups", ...
        raise UserError(f"the optimizer state in '{source}' does not fit this run's parameter groups ({err}); "
                        "resume with the settings it was saved with (freeze, head, optim)") from None


def restart_schedule(training: TrainingParts, state: TrainState, configured: list[dict[str, Any]],
                     changes: list[str]) -> None:
    """Settings of the optimizer or the run's length changed on resume: they apply from this step.

    The groups take their configured settings, and the saved scheduler state is not loaded
    (it holds the old rates and length): the schedule built from this config is evaluated at
    the resumed step, as timm's own training script does on resume. Moments and step counts
    stay as saved.
    """
    optimizer, scheduler = training.optimizer, training.scheduler
    before = optimizer.param_groups[0]["lr"]
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    if scheduler is not None:
        scheduler.step_update(num_updates=state.global_step)
    after = optimizer.param_groups[0]["lr"]
    log.warning(f"resumed with changed settings ({'; '.join(changes)}): they apply from step {state.global_step}, "
                f"on the learning-rate schedule of this config; the rate of "
                f"'{optimizer.param_groups[0].get('name', 0)}' moves from {before:.4g} to {after:.4g}")


def _load_optional(part: Any, saved: dict | None, what: str) -> None:
    if part is None and saved is None:
        return
    if part is None or saved is None:
        raise UserError(f"the training state {'has' if saved is not None else 'lacks'} a {what} state but this "
                        f"run {'has none' if part is None else 'has one'}: resume with the saved settings")
    part.load_state_dict(saved)
