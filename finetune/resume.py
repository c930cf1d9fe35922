"""Resuming a run: find a valid training state, refuse experiment changes, restore everything.

``resume`` (top-level config key) is one of

* ``auto``: the newest valid state in this run's ``checkpoints/manifest.json``; a fresh
  start (with a notice) when there is none yet;
* ``RUN_DIR``: the newest valid state of that run (``python -m finetune resume=RUN_DIR``
  also reuses its saved overrides and directory, see ``finetune.__main__``);
* ``FILE.ckpt``: that training-state file.

Candidates are checked against the manifest (size, sha256) and loaded with
``weights_only=True``; with ``auto`` or ``RUN_DIR`` a bad one is skipped with a warning
naming it, and the previous valid one is used. Restoring happens last, right before
training: model, optimizer, scheduler, grad scaler, EMA, freezing schedule, checkpoint
policy, the loop's counters, and finally every RNG.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.checkpoint import CheckpointManager, Manifest, load_training_state, set_rng_state, verify_file
from finetune.errors import UserError
from finetune.trainer import Trainer, TrainState

log = logging.getLogger("finetune")

# Keys that may differ from the saved run: they change how it runs, not what it computes
# (checkpoint cadence included). ``trainer.max_epochs`` may change too: the learning-rate
# schedule is then rebuilt for the new length (see ``restore_training``).
ALLOWED_CHANGES = ("trainer.max_epochs", "data.num_workers", "trainer.device", "logger.", "resume",
                   "resume_allow_config_change", "resume_allow_unverified", "checkpoint.every_n_steps", "checkpoint.every_n_epochs",
                   "checkpoint.keep_last_k")


@dataclass
class ResumePoint:
    """A verified training state to continue from."""

    path: Path
    state: dict[str, Any]
    in_place: bool  # the file lives in this run's checkpoint directory
    invalid: tuple[str, ...] = field(default=())  # newer files of that directory that failed verification
    unverified: bool = False  # it loads but did not match its manifest entry (resume_allow_unverified)

    @property
    def step(self) -> int:
        return int(self.state["train_state"]["global_step"])


def locate_resume(resume: str | None, *, checkpoint_dir: Path, allow_unverified: bool = False) -> ResumePoint | None:
    """The training state ``resume`` points at, verified; None for a fresh start.

    ``allow_unverified``: accept a state that fails its manifest check but loads as a valid
    training state (a manifest written wrong, e.g. by an older version); refused by default.
    """
    if resume is None:
        if refusal := occupied_run_dir(checkpoint_dir.parent):
            raise UserError(refusal)
        return None
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


def occupied_run_dir(run_dir: Path) -> str | None:
    """Why a fresh run may not start in ``run_dir`` (it holds a run's checkpoints), else None."""
    if (run_dir / "checkpoints" / "manifest.json").exists():
        return (f"'{run_dir}' already holds the checkpoints of a run and a fresh run never replaces them: "
                f"continue it with resume=auto, or choose another hydra.run.dir")
    return None


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
def check_config_change(saved_yaml: str, cfg: DictConfig, *, allow: bool, source: Path) -> None:
    """Refuse settings that change the experiment saved in ``source``, unless ``allow``."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
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
def restore_training(trainer: Trainer, point: ResumePoint, *, run_dir: Path) -> TrainState:
    """Load every part of ``point`` into the built trainer; RNG last. Returns the loop's state."""
    s = point.state
    state = TrainState(**s["train_state"])
    saved_epochs = saved_max_epochs(s)
    if trainer.max_epochs < state.epoch:
        raise UserError(f"trainer.max_epochs={trainer.max_epochs} but '{point.path}' has already trained "
                        f"{state.epoch} epochs: resume with trainer.max_epochs>={state.epoch}")
    if trainer.max_epochs == state.epoch and not state.batches_seen:
        log.info(f"'{point.path}' has already trained all {state.epoch} epochs: nothing left to train "
                 "(raise trainer.max_epochs to train longer)")
    trainer.model.load_state_dict(s["model"])
    configured = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    load_optimizer(trainer.optimizer, s["optimizer"], source=point.path)
    owned = {"lr"} if trainer.scheduler is not None else set()  # the current rate: the scheduler's
    changes = [f"{g.get('name', i)}.{k}: {g.get(k)!r} -> {v!r}" for i, (g, c) in
               enumerate(zip(trainer.optimizer.param_groups, configured)) for k, v in c.items()
               if k not in owned and g.get(k) != v]
    if saved_epochs not in (None, trainer.max_epochs):
        changes.insert(0, f"trainer.max_epochs: {saved_epochs} -> {trainer.max_epochs}")
    if changes:  # allowed changes of the experiment: they take effect from here on
        restart_schedule(trainer, state, configured, changes)
    else:
        _load_optional(trainer.scheduler, s.get("scheduler"), "scheduler")
    _load_optional(trainer.grad_scaler, s.get("grad_scaler"), "grad scaler")
    _load_optional(trainer.ema, s.get("ema"), "EMA")
    _load_optional(trainer.freeze_schedule, s.get("freeze"), "freezing schedule")
    manager = next((h for h in trainer.hooks if isinstance(h, CheckpointManager)), None)
    if manager is not None:
        manager.resume_from(s.get("checkpoint_policy"), state=state,
                            resumed=point.path.name if point.in_place else None, invalid=point.invalid,
                            rehash=point.unverified,
                            source=None if point.in_place else point.path.parent)
    if point.in_place:
        rewind_metrics(run_dir / "metrics.jsonl", epochs_done=state.epoch)
    set_rng_state(s["rng"])  # last: nothing may draw from the RNGs between here and training
    return state


def saved_max_epochs(state: dict[str, Any]) -> int | None:
    """``trainer.max_epochs`` of the run that wrote ``state`` (from its saved config)."""
    saved = OmegaConf.create(state.get("config_yaml") or "{}")
    return OmegaConf.select(saved, "trainer.max_epochs", default=None)


def load_optimizer(optimizer: Any, saved: dict[str, Any], *, source: Path) -> None:
    """The saved optimizer state (moved to the parameters' device); a different grouping is one clear line."""
    try:
        optimizer.load_state_dict(saved)
    except ValueError as err:  # torch: "loaded state dict has a different number of parameter groups", ...
        raise UserError(f"the optimizer state in '{source}' does not fit this run's parameter groups ({err}); "
                        "resume with the settings it was saved with (freeze, head, optim)") from None


def restart_schedule(trainer: Trainer, state: TrainState, configured: list[dict[str, Any]],
                     changes: list[str]) -> None:
    """Settings of the optimizer or the run's length changed on resume: they apply from this step.

    The groups take their configured settings, and the saved scheduler state is not loaded
    (it holds the old rates and length): the schedule built from this config is evaluated at
    the resumed step, as timm's own training script does on resume. Moments and step counts
    stay as saved.
    """
    before = trainer.optimizer.param_groups[0]["lr"]
    for group, settings in zip(trainer.optimizer.param_groups, configured):
        group.update(settings)
    if trainer.scheduler is not None:
        trainer.scheduler.step_update(num_updates=state.global_step)
    after = trainer.optimizer.param_groups[0]["lr"]
    log.warning(f"resumed with changed settings ({'; '.join(changes)}): they apply from step {state.global_step}, "
                f"on the learning-rate schedule of this config; the rate of "
                f"'{trainer.optimizer.param_groups[0].get('name', 0)}' moves from {before:.4g} to {after:.4g}")


def _load_optional(part: Any, saved: dict | None, what: str) -> None:
    if part is None and saved is None:
        return
    if part is None or saved is None:
        raise UserError(f"the training state {'has' if saved is not None else 'lacks'} a {what} state but this "
                        f"run {'has none' if part is None else 'has one'}: resume with the saved settings")
    part.load_state_dict(saved)


def rewind_metrics(path: Path, *, epochs_done: int) -> None:
    """Drop ``metrics.jsonl`` records of epochs after ``epochs_done``: those epochs will run again.

    Keyed on the epoch, not the step: a step checkpoint taken on an epoch's last update has that
    epoch's final step but not its evaluation, so its record is written again on resume.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
