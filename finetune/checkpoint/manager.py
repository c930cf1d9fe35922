"""``CheckpointManager``: the ``TrainerHook`` that writes checkpoints as the policy says."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from finetune.files import FileFacts, atomic_link
from finetune.checkpoint.manifest import Manifest
from finetune.checkpoint.policy import STATE_FILE, CheckpointPolicy, state_file_name, top_k_file_name
from finetune.checkpoint.training_state import (RunFacts, TrainingParts, detached_copy, rng_state,
                                                save_training_state, training_state)
from finetune.checkpoint.weights_file import ModelDescription, save_weights
from finetune.distributed import SINGLE, World
from finetune.errors import UserError
from finetune.metrics import EvalResult
from finetune.trainer import TrainerHook, TrainState

log = logging.getLogger("finetune")


class CheckpointManager(TrainerHook):
    """A ``TrainerHook`` that saves as ``policy`` says.

    Each epoch: ``best`` when the monitored metric improved, a top-k file when it ranks
    among the ``save_top_k`` best, and every ``every_n_epochs`` epochs ``last`` weights and
    ``last.ckpt``. Every ``every_n_steps`` optimizer updates, and when a stop is requested,
    ``last.ckpt`` alone (mid-epoch). Within a save point the training state is written
    last, so it never claims a best or top-k file that is not on disk yet. Mid-epoch
    ``every_n_steps`` saves run in the background: the state is copied at the update
    boundary (so the file is exactly what a synchronous save would write) and written on
    a thread while training goes on; every other save, and ``close``, waits for it first,
    and a failure there (a full disk) stops the run at the next save. Before
    ``last.ckpt`` is replaced, its previous content is kept under ``epochEEE-stepSSSSSS.ckpt``
    (``keep_last_k`` of those). Files are replaced, never deleted first; the state this
    run resumed from is never pruned, nor is ``best``.

    Under DDP this is rank 0's hook and every other process runs a `CheckpointFollower`: the same
    decisions at the same steps, no files. Saving the training state is collective (every
    process's RNG state goes into it); a synchronous save ends with a barrier.
    """

    def __init__(self, directory: str | Path, *, policy: CheckpointPolicy, parts: TrainingParts,
                 model: ModelDescription, run: RunFacts, fresh: bool = True, world: World = SINGLE):
        """``parts``: what is saved; ``model``: what weights files say about it; ``run``: what the
        training state records about this run; ``fresh``: a new run (start an empty manifest)."""
        self.world = world
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.monitor = policy, policy.monitor
        self.parts, self.model, self.run = parts, model, run
        self.manifest = Manifest(self.dir / "manifest.json", fresh=fresh)
        self.top_k: list[dict[str, Any]] = []  # best first: {name, value, epoch, step}
        self.protected: set[str] = set()  # never pruned: the state this run resumed from
        self.last_trusted = False  # last.ckpt on disk is the one its manifest entry describes
        self.last_saved: tuple[int, int, int] | None = None  # (epoch, step, batches) of last.ckpt
        self.last_value: float | None = None  # the monitored metric of the latest epoch
        self._pending: threading.Thread | None = None  # a background save in flight
        self._failure: BaseException | None = None  # what that save raised
        for stale in self.dir.glob(".*.tmp"):  # left by a kill during a save
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"top_k": [dict(e) for e in self.top_k], "best": self.manifest.data.get("best")}

    def restore(self, policy_state: dict[str, Any] | None, *, progress: TrainState, resumed: str | None,
                invalid: tuple[str, ...] = (), rehash: bool = False) -> None:
        """Continue after ``progress`` with the policy's saved state (its top-k list).

        ``resumed`` names the file in this directory the run continues from (it is never pruned);
        files newer than ``progress`` that the policy does not know (top-k files of epochs that
        will run again) and files found ``invalid`` leave the manifest. ``rehash``: ``resumed``
        was accepted although it did not match its entry (``resume_allow_unverified``); the entry
        is rewritten from the file.
        """
        known = {e["name"] for e in (policy_state or {}).get("top_k", [])}
        self.top_k = [e for e in (policy_state or {}).get("top_k", []) if (self.dir / e["name"]).is_file()]
        for name, entry in list(self.manifest.files.items()):
            abandoned = entry.get("kind") == "top_k" and entry["step"] > progress.global_step and name not in known
            if name in invalid or abandoned:
                del self.manifest.files[name]
                if abandoned:
                    (self.dir / name).unlink(missing_ok=True)
        if resumed is not None and rehash:
            entry = self.manifest.files[resumed]
            self.manifest.record(resumed, kind=entry["kind"], epoch=entry["epoch"], step=entry["step"],
                                 metric=entry["metric"], value=entry["value"])
        if resumed is not None:
            self.protected.add(resumed)
            self.last_trusted = resumed == "last.ckpt"
            self.last_saved = (progress.epoch, progress.global_step, progress.batches_seen)
        self.manifest.save()

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None:
        """Link the verified file ``source`` (another run's best or top-k) into this directory."""
        name = source.name
        self._guarded(name, lambda p: atomic_link(source, p))
        self.manifest.files[name] = dict(entry)
        if kind == "best":
            self.manifest.set_best(name)

    # ------------------------------------------------------------ hooks
    def on_step(self, state: TrainState, logs: dict[str, float]) -> None:
        n = self.policy.every_n_steps
        if not n or state.global_step % n:
            return
        epoch_end_saves = self.policy.every_n_epochs == 1 and state.batches_seen == state.epoch_batches
        if self.policy.save_last and not epoch_end_saves:
            self.save_state(state, background=True)

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        self.wait()
        value = self.last_value = (result.scalars() | logs).get(self.monitor)
        if self.policy.save_best and improved:
            self._save_best(state, value)
        if self.policy.save_top_k and value is not None:
            self._update_top_k(state, value)
        if self.policy.save_last and state.epoch % self.policy.every_n_epochs == 0:
            self.save_last(state, value)

    def on_interrupt(self, state: TrainState) -> None:
        if self.policy.save_last:
            self.save_state(state)
        self.wait()
        # Under DDP no process may exit before rank 0 has written: torchrun stops the others as soon
        # as one exits with an error status (143 after SIGTERM), which would abort a save in flight.
        self.world.barrier()

    def on_fit_end(self, state: TrainState) -> None:
        self.wait()
        if self.policy.save_last and self.last_saved != (state.epoch, state.global_step, state.batches_seen):
            self.save_last(state, self.last_value)
        self.world.barrier()  # every process ends with the files rank 0 wrote in place

    # ------------------------------------------------------------ saving
    def _save_best(self, state: TrainState, value: float | None) -> None:
        self._write_weights(f"best{self.policy.ext}", "best", state, value)
        self.manifest.set_best(f"best{self.policy.ext}")
        self.manifest.save()

    def save_last(self, state: TrainState, value: float | None) -> None:
        self._write_weights(f"last{self.policy.ext}", "last", state, value)
        self.save_state(state)

    def save_state(self, state: TrainState, *, background: bool = False) -> None:
        """Write ``last.ckpt`` (keeping the previous one as a periodic file), then prune.

        ``background``: copy the state now, write it on a thread (see the class docstring).
        """
        key = (state.epoch, state.global_step, state.batches_seen)
        if key == self.last_saved:
            return
        self.wait()
        self.last_saved = key
        rngs = self.world.gather(rng_state())  # every process reaches every save: collective under DDP
        if not background or not self.world.main:
            self._write_state(self._training_state(state, rngs), replace(state))
            if not background:
                self.world.barrier()  # rank 0 has written: all go on together
            return
        snapshot = detached_copy(self._training_state(state, rngs))
        self._pending = threading.Thread(target=self._write_in_background, args=(snapshot, replace(state)),
                                         name="finetune-checkpoint")
        self._pending.start()

    def wait(self) -> None:
        """Let a background save finish; re-raise what it raised."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def close(self) -> None:
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001 - the run is ending anyway; say what was lost
            log.error(f"the last background checkpoint was not written: {err}")

    def _training_state(self, progress: TrainState, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return training_state(self.parts, progress, run=self.run, policy=self.state_dict(),
                              weights_metadata=self.model.metadata(epoch=progress.epoch), rngs=rngs)

    def _write_in_background(self, snapshot: dict[str, Any], state: TrainState) -> None:
        try:
            self._write_state(snapshot, state)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
            self._failure = err

    def _write_state(self, snapshot: dict[str, Any], state: TrainState) -> None:
        self._keep_previous_state()
        facts = self._guarded("last.ckpt", lambda p: save_training_state(p, snapshot))
        self._record("last.ckpt", facts, "state", state, None)
        self.last_trusted = True
        self._prune_states()

    def _keep_previous_state(self) -> None:
        entry = self.manifest.files.get("last.ckpt")
        k = self.policy.keep_last_k
        if entry is None or not self.last_trusted or k == 0:
            return
        name = state_file_name(entry["epoch"], entry["step"])
        self._guarded(name, lambda p: atomic_link(self.dir / "last.ckpt", p))
        self.manifest.files[name] = {**entry, "kind": "periodic"}
        self.manifest.save()
        if "last.ckpt" in self.protected:  # the state this run resumed from lives on under its periodic name
            self.protected.discard("last.ckpt")
            self.protected.add(name)

    def _prune_states(self) -> None:
        """Keep the ``keep_last_k`` newest periodic states (and protected ones); delete the rest."""
        k = self.policy.keep_last_k
        periodic = [n for n in self.manifest.states() if self.manifest.files[n].get("kind") == "periodic"]
        doomed = [n for n in periodic[k:] if n not in self.protected] if k is not None else []
        for name in doomed:
            del self.manifest.files[name]
        if doomed:
            self.manifest.save()  # the manifest stops naming a file before the file goes
        orphans = [p.name for p in self.dir.iterdir() if STATE_FILE.match(p.name)
                   and p.name not in self.manifest.files and p.name not in self.protected]
        for name in doomed + orphans:
            (self.dir / name).unlink(missing_ok=True)

    def _update_top_k(self, state: TrainState, value: float) -> None:
        k, entries = self.policy.save_top_k, self.top_k
        if len(entries) >= k and not self.policy.better(value, entries[-1]["value"]):
            return
        name = top_k_file_name(state.epoch, self.monitor, value, self.policy.ext)
        self._write_weights(name, "top_k", state, value)
        entries.append({"name": name, "value": value, "epoch": state.epoch, "step": state.global_step})
        sign = -1.0 if self.policy.resolved_mode == "max" else 1.0
        entries.sort(key=lambda e: (sign * e["value"], e["epoch"]))
        while len(entries) > k:  # the new file is in place before the one it displaces goes
            dropped = entries.pop()
            self.manifest.files.pop(dropped["name"], None)
            self.manifest.save()
            (self.dir / dropped["name"]).unlink(missing_ok=True)

    def _write_weights(self, name: str, kind: str, state: TrainState, value: float | None) -> None:
        meta = self.model.metadata(monitor=self.monitor, value=value, epoch=state.epoch)
        facts = self._guarded(name, lambda p: save_weights(p, self.parts.deploy_model(), meta,
                                                           self.policy.weights_format))
        self._record(name, facts, kind, state, value)

    def _record(self, name: str, facts: FileFacts, kind: str, state: TrainState, value: float | None) -> None:
        self.manifest.record(name, facts, kind=kind, epoch=state.epoch, step=state.global_step,
                             metric=self.monitor, value=value)
        self._guarded("manifest.json", lambda _: self.manifest.save())

    def _guarded(self, name: str, write: Callable[[Path], Any]) -> Any:
        """Run ``write(path)``; an OS error (a full disk) becomes one clear line naming the file."""
        path = self.dir / name
        try:
            return write(path)
        except OSError as err:
            code = errno.errorcode.get(err.errno, "") if err.errno else ""
            raise CheckpointWriteError(
                f"could not write checkpoint '{path}': {err.strerror or err}{f' ({code})' if code else ''}; "
                "the previous checkpoint files are intact: free space, then continue with resume=auto") from err

    def paths(self) -> dict[str, str]:
        """Every file of the manifest by name: its path."""
        return {name: str(self.dir / name) for name in self.manifest.files}

    def best(self) -> dict[str, Any]:
        """The manifest entry of the best weights (``value``, ``epoch``, ...); empty when none was saved."""
        name = self.manifest.data.get("best")
        return dict(self.manifest.files.get(name, {})) if name else {}


class CheckpointFollower(CheckpointManager):
    """A DDP process other than rank 0: takes part in every save rank 0's `CheckpointManager` makes
    (the same policy on the same reduced metrics decides the same saves) and writes nothing."""

    def __init__(self, *, policy: CheckpointPolicy, parts: TrainingParts, run: RunFacts, world: World):
        self.world, self.policy, self.monitor, self.parts, self.run = world, policy, policy.monitor, parts, run
        self.top_k, self.protected, self.last_trusted = [], set(), False
        self.last_saved, self.last_value = None, None
        self._pending, self._failure = None, None

    def restore(self, policy_state: dict[str, Any] | None, *, progress: TrainState, resumed: str | None,
                invalid: tuple[str, ...] = (), rehash: bool = False) -> None:
        if resumed is not None:
            self.last_saved = (progress.epoch, progress.global_step, progress.batches_seen)

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None:
        pass

    def _save_best(self, state: TrainState, value: float | None) -> None:
        pass

    def _update_top_k(self, state: TrainState, value: float) -> None:
        pass

    def _write_weights(self, name: str, kind: str, state: TrainState, value: float | None) -> None:
        pass

    def _training_state(self, progress: TrainState, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def _write_state(self, snapshot: dict[str, Any], state: TrainState) -> None:
        pass

    def paths(self) -> dict[str, str]:
        return {}

    def best(self) -> dict[str, Any]:
        return {}


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions); earlier files are intact."""
