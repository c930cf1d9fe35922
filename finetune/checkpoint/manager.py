"""``CheckpointManager``: the ``TrainerHook`` that saves as the policy says, the same code on every rank.

Each save point runs the same steps in every process of a run: the decision (`plan_epoch_end`,
`CheckpointPolicy.saves_state_at`) is rank 0's (`World.agree`); the RNG states are gathered (collective);
the files are written by a `CheckpointWriter`, which is `FileWriter` on rank 0 and `NoWriter`
(does nothing) on the others; a synchronous save ends with a barrier. So a change to the saving
code runs alike on every rank, and no rank can skip a collective another waits in.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from finetune.checkpoint.manifest import Manifest
from finetune.checkpoint.mirror import Mirror
from finetune.checkpoint.policy import STATE_FILE, CheckpointPolicy, EpochSaves, plan_epoch_end, state_file_name
from finetune.checkpoint.training_state import (RunFacts, TrainingParts, detached_copy, rng_state,
                                                save_training_state, training_state)
from finetune.checkpoint.weights_file import ModelDescription, save_weights
from finetune.distributed import SINGLE, World
from finetune.errors import UserError
from finetune.files import FileFacts, atomic_link
from finetune.metrics import EvalResult
from finetune.trainer import TrainerHook, TrainState

log = logging.getLogger("finetune")


class CheckpointManager(TrainerHook):
    """A ``TrainerHook`` that saves as ``policy`` says.

    Each epoch: ``best`` when the monitored metric improved, a top-k file when it ranks among the
    ``save_top_k`` best (both by the policy's one rule for "better"), and every ``every_n_epochs``
    epochs ``last`` weights and ``last.ckpt``. Every ``every_n_steps`` optimizer updates, and when
    a stop is requested, ``last.ckpt`` alone (mid-epoch). Within a save point the training state is
    written last, so it never claims a best or top-k file that is not on disk yet. Mid-epoch
    ``every_n_steps`` saves run in the background on rank 0 (see `FileWriter`).

    What the policy remembers (the top-k list) lives here, alike on every rank and saved in every
    training state; what the files are (the manifest) lives in the writer.
    """

    def __init__(self, writer: CheckpointWriter, *, policy: CheckpointPolicy, parts: TrainingParts,
                 run: RunFacts, world: World = SINGLE):
        """``writer``: where saves land (`FileWriter` on rank 0, `NoWriter` elsewhere); ``parts``: what is
        saved; ``run``: what the training state records about this run."""
        self.writer, self.policy, self.parts, self.run, self.world = writer, policy, parts, run, world
        self.monitor = policy.monitor
        self.top_k: list[dict[str, Any]] = []  # best first: {name, value, epoch, step}
        self.last_saved: tuple[int, int, int] | None = None  # (epoch, step, batches) of last.ckpt
        self.last_value: float | None = None  # the monitored metric of the latest epoch
        self.thresholds: list[float] | None = None  # multi-label: per-class thresholds tuned on the latest epoch

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"top_k": [dict(e) for e in self.top_k], "best": self.writer.best_name()}

    def restore(self, policy_state: dict[str, Any] | None, *, progress: TrainState, resumed: str | None,
                invalid: tuple[str, ...] = (), rehash: bool = False) -> None:
        """Continue after ``progress`` with the policy's saved state (its top-k list).

        ``resumed`` names the file in this directory the run continues from (never pruned); files
        newer than ``progress`` that the policy does not know (top-k files of epochs that will run
        again) and files found ``invalid`` leave the manifest. ``rehash``: ``resumed`` was accepted
        although it did not match its entry (``resume_allow_unverified``). The top-k entries whose
        files are gone are dropped: rank 0 looks, and every rank keeps what it found.
        """
        top_k = list((policy_state or {}).get("top_k", []))
        self.top_k = self.world.agree(self.writer.restore(top_k, progress=progress, resumed=resumed,
                                                              invalid=invalid, rehash=rehash))
        if resumed is not None:
            self.last_saved = (progress.epoch, progress.global_step, progress.batches_seen)

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None:
        """Take the verified file ``source`` (another run's best or top-k) into this run's files."""
        self.writer.adopt(source, entry, kind=kind)

    # ------------------------------------------------------------ hooks
    def on_step(self, state: TrainState, logs: dict[str, float]) -> None:
        # Integers every rank holds alike: the same answer everywhere without a collective per step.
        if self.policy.saves_state_at(state.global_step, epoch_end=state.batches_seen == state.epoch_batches):
            self.save_state(state, background=True)

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        self.wait()
        value = self.last_value = (result.scalars() | logs).get(self.monitor)
        self.thresholds = getattr(result, "tuned_thresholds", None)  # multi-label: tuned on this epoch's val scores
        saves: EpochSaves = self.world.agree(plan_epoch_end(
            self.policy, epoch=state.epoch, step=state.global_step, value=value, improved=improved, top_k=self.top_k))
        if saves.best:
            self.writer.write_weights(f"best{self.policy.ext}", "best", state, value, thresholds=self.thresholds)
        if saves.top_k_name is not None:
            self.writer.write_weights(saves.top_k_name, "top_k", state, value, thresholds=self.thresholds)
            self.top_k = [dict(e) for e in saves.top_k]
            self.writer.remove(saves.displaced)  # the new file is in place before the ones it displaces go
        if saves.last:
            self.save_last(state, value)
        self.writer.publish()  # best and top-k files too, when no training state was written this epoch

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
    def save_last(self, state: TrainState, value: float | None) -> None:
        self.writer.write_weights(f"last{self.policy.ext}", "last", state, value, thresholds=self.thresholds)
        self.save_state(state)

    def save_state(self, state: TrainState, *, background: bool = False) -> None:
        """Write ``last.ckpt`` (the writer keeps the previous one as a periodic file, then prunes).

        ``background``: copy the state now, write it on a thread (rank 0; see `FileWriter`).
        """
        key = (state.epoch, state.global_step, state.batches_seen)
        if key == self.last_saved:
            return
        self.wait()
        self.last_saved = key
        rngs = self.world.gather(rng_state())  # every process reaches every save: collective under DDP
        self.writer.write_state(lambda: self._training_state(state, rngs), replace(state), background=background)
        if not background:
            self.world.barrier()  # rank 0 has written: all go on together

    def _training_state(self, progress: TrainState, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return training_state(self.parts, progress, run=self.run, policy=self.state_dict(),
                              weights_metadata=self.writer.weights_metadata(epoch=progress.epoch), rngs=rngs)

    def wait(self) -> None:
        """Let a background save finish; re-raise what it raised."""
        self.writer.wait()

    def close(self) -> None:
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001 - the run is ending anyway; say what was lost
            log.error(f"the last background checkpoint was not written: {err}")
        self.writer.close()  # the mirror's pending uploads, bounded in time

    def paths(self) -> dict[str, str]:
        """Every file of the manifest by name: its path (none off rank 0)."""
        return self.writer.paths()

    def best(self) -> dict[str, Any]:
        """The manifest entry of the best weights (``value``, ``epoch``, ...); empty when none was saved."""
        return self.writer.best()


class Checkpointer(Protocol):
    """What a run asks of its checkpointing besides the trainer's hook calls: to continue a resumed run
    (`restore`, `adopt`), and at its end which files it wrote (`paths`, `best`)."""

    monitor: str

    def restore(self, policy_state: dict[str, Any] | None, *, progress: TrainState, resumed: str | None,
                invalid: tuple[str, ...] = (), rehash: bool = False) -> None: ...

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None: ...

    def paths(self) -> dict[str, str]: ...

    def best(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class CheckpointWriter(Protocol):
    """Where a `CheckpointManager`'s saves land: files on rank 0 (`FileWriter`), nothing elsewhere (`NoWriter`)."""

    def write_weights(self, name: str, kind: str, state: TrainState, value: float | None, *,
                      thresholds: list[float] | None = None) -> None: ...

    def write_state(self, snapshot: Callable[[], dict[str, Any]], state: TrainState, *, background: bool) -> None: ...

    def remove(self, names: tuple[str, ...]) -> None: ...

    def restore(self, top_k: list[dict[str, Any]], *, progress: TrainState, resumed: str | None,
                invalid: tuple[str, ...], rehash: bool) -> list[dict[str, Any]]: ...

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None: ...

    def weights_metadata(self, *, epoch: int) -> dict[str, str]: ...

    def wait(self) -> None: ...

    def publish(self) -> None: ...

    def close(self) -> None: ...

    def best_name(self) -> str | None: ...

    def best(self) -> dict[str, Any]: ...

    def paths(self) -> dict[str, str]: ...


class NoWriter:
    """The writer of a DDP process other than rank 0: it takes part in every save (the manager's
    collectives) and writes nothing."""

    def write_weights(self, name: str, kind: str, state: TrainState, value: float | None, *,
                      thresholds: list[float] | None = None) -> None:
        pass

    def write_state(self, snapshot: Callable[[], dict[str, Any]], state: TrainState, *, background: bool) -> None:
        pass

    def remove(self, names: tuple[str, ...]) -> None:
        pass

    def restore(self, top_k: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
        return top_k  # rank 0's answer is broadcast

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None:
        pass

    def weights_metadata(self, *, epoch: int) -> dict[str, str]:
        return {}

    def wait(self) -> None:
        pass

    def publish(self) -> None:
        pass

    def close(self) -> None:
        pass

    def best_name(self) -> str | None:
        return None

    def best(self) -> dict[str, Any]:
        return {}

    def paths(self) -> dict[str, str]:
        return {}


class FileWriter:
    """Rank 0's writer: every file atomically and verified (`finetune.files`), ``manifest.json`` updated
    after the file it describes is in place.

    Before ``last.ckpt`` is replaced, its previous content is kept under ``epochEEE-stepSSSSSS.ckpt``
    (``keep_last_k`` of those). Files are replaced, never deleted first; the state a run resumed
    from is never pruned, nor is ``best``. A background state save (``every_n_steps``) writes a
    snapshot the training thread copied at the update boundary (`detached_copy`), on a thread,
    while training goes on; every other save, and ``wait``, lets it finish first, and a failure
    there (a full disk) is raised at the next save.

    With a ``mirror`` (`finetune.checkpoint.mirror.Mirror`), every save point is handed to it once its
    files and manifest are in place (`publish`), on the thread that saved.
    """

    def __init__(self, directory: str | Path, *, policy: CheckpointPolicy, parts: TrainingParts,
                 model: ModelDescription, fresh: bool = True, mirror: Mirror | None = None):
        """``model``: what weights files say about it; ``fresh``: a new run (start an empty manifest)."""
        self.dir = Path(directory)
        self.mirror = mirror
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.parts, self.model = policy, parts, model
        self.manifest = Manifest(self.dir / "manifest.json", fresh=fresh)
        self.protected: set[str] = set()  # never pruned: the state this run resumed from
        self.last_trusted = False  # last.ckpt on disk is the one its manifest entry describes
        self._pending: threading.Thread | None = None  # a background save in flight
        self._failure: BaseException | None = None  # what that save raised
        for stale in self.dir.glob(".*.tmp"):  # left by a kill during a save
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------ resume
    def restore(self, top_k: list[dict[str, Any]], *, progress: TrainState, resumed: str | None,
                invalid: tuple[str, ...] = (), rehash: bool = False) -> list[dict[str, Any]]:
        """Put the manifest where ``progress`` left off (see `CheckpointManager.restore`); returns the top-k
        entries whose files exist."""
        known = {e["name"] for e in top_k}
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
        self.manifest.save()
        return [e for e in top_k if (self.dir / e["name"]).is_file()]

    def adopt(self, source: Path, entry: dict[str, Any], *, kind: str) -> None:
        """Link the verified file ``source`` (another run's best or top-k) into this directory."""
        name = source.name
        self._guarded(name, lambda p: atomic_link(source, p))
        self.manifest.files[name] = dict(entry)
        if kind == "best":
            self.manifest.set_best(name)

    # ------------------------------------------------------------ weights
    def weights_metadata(self, *, epoch: int) -> dict[str, str]:
        return self.model.metadata(epoch=epoch)

    def write_weights(self, name: str, kind: str, state: TrainState, value: float | None, *,
                      thresholds: list[float] | None = None) -> None:
        meta = self.model.metadata(monitor=self.policy.monitor, value=value, epoch=state.epoch, thresholds=thresholds)
        facts = self._guarded(name, lambda p: save_weights(p, self.parts.deploy_model(), meta,
                                                           self.policy.weights_format))
        self._record(name, facts, kind, state, value)
        if kind == "best":
            self.manifest.set_best(name)
            self.manifest.save()

    def remove(self, names: tuple[str, ...]) -> None:
        """Displaced top-k files: the manifest stops naming each before it goes."""
        for name in names:
            self.manifest.files.pop(name, None)
            self.manifest.save()
            (self.dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------ training state
    def write_state(self, snapshot: Callable[[], dict[str, Any]], state: TrainState, *, background: bool) -> None:
        if not background:
            self._write_state(snapshot(), state)
            self.publish()
            return
        copied = detached_copy(snapshot())
        self._pending = threading.Thread(target=self._write_in_background, args=(copied, state),
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

    def publish(self) -> None:
        """Hand the files as they are now to the mirror (when there is one): called once a save point is complete."""
        if self.mirror is not None:
            self.mirror.push(self.dir, self.manifest.data)

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()

    def _write_in_background(self, snapshot: dict[str, Any], state: TrainState) -> None:
        try:
            self._write_state(snapshot, state)
            self.publish()
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

    # ------------------------------------------------------------ the manifest
    def _record(self, name: str, facts: FileFacts, kind: str, state: TrainState, value: float | None) -> None:
        self.manifest.record(name, facts, kind=kind, epoch=state.epoch, step=state.global_step,
                             metric=self.policy.monitor, value=value)
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

    def best_name(self) -> str | None:
        return self.manifest.data.get("best")

    def best(self) -> dict[str, Any]:
        name = self.best_name()
        return dict(self.manifest.files.get(name, {})) if name else {}

    def paths(self) -> dict[str, str]:
        return {name: str(self.dir / name) for name in self.manifest.files}


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions); earlier files are intact."""
