"""Checkpoint files: deployable weights, training state, the manifest, and the saving policy.

Every file is written atomically and verified: a temporary file in the same directory,
hashed (BLAKE3) as it is written, flushed and fsynced, its size checked, moved into
place with ``os.replace``, then the directory fsynced. A kill at any moment leaves the
previous file intact. ``manifest.json`` is updated only after the file it describes is
in place, so a manifest entry always describes a complete file.

* ``*.safetensors`` (or ``*.pt`` with ``checkpoint.weights_format=torch``): the model's own
  ``state_dict()`` keys plus string metadata (architecture, classes, head,
  preprocessing), enough to rebuild it alone.
* ``last.ckpt``: the training state for resume; only tensors, dicts, lists and plain
  values, so it loads with ``torch.load(weights_only=True)``. Earlier states are kept as
  ``epochEEE-stepSSSSSS.ckpt`` (hard links of what ``last.ckpt`` was), ``keep_last_k`` of them.

Threads, what each reads, and why it cannot change underneath:

* ``finetune-hash`` (``HashingSink``, one per file written) reads the temporary file itself,
  from the page cache, only up to the bytes that ``write`` calls have already put there. No
  one else writes that file: ``mkstemp`` made it, and it gets its real name only after
  ``finish``. The caller's buffers are never kept past ``write`` (``torch.save`` frees or
  reuses them at once; hashing them later recorded wrong digests under load).
* ``finetune-checkpoint`` (``CheckpointManager``, a mid-epoch save) writes a snapshot that
  ``detached_copy`` made at the update boundary: every tensor cloned to the CPU, every dict
  and list rebuilt, so training goes on against other memory. It also updates the manifest
  and the policy's file lists; the training thread touches those only after ``wait()``,
  which every other save, ``on_epoch_end`` and ``close`` call first.
* ``finetune-unlink`` removes the second name of a replaced large file; nothing opens that
  name, and it was made only for a file with no other link.
* Hard links (``atomic_link``: periodic states, carried-over best files) share an inode with
  another name, so no file is ever written in place: every write goes to a new temporary
  file that ``os.replace`` then moves over the old name, leaving linked inodes untouched.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import queue
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import blake3
import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from finetune.errors import UserError
from finetune.metrics import EvalResult
from finetune.models import BackboneSpec, build_model
from finetune.trainer import TrainerHook, TrainState, infer_mode

log = logging.getLogger("finetune")

WEIGHTS_FORMAT = "finetune.weights/1"
STATE_FORMAT = "finetune.train_state/1"
WEIGHTS_EXTENSIONS = {"safetensors": ".safetensors", "torch": ".pt"}
STATE_FILE = re.compile(r"^epoch\d{3,}-step\d{6,}\.ckpt$")  # periodic training states
_UMASK = os.umask(0)
os.umask(_UMASK)


# ------------------------------------------------------------------ atomic I/O
# Digests a manifest entry may name, by key. New files get ``DIGEST``: BLAKE3 hashes ~3.5x
# faster than sha256 here (5.8 vs 1.6 GB/s on one core), which keeps a save near the disk's own
# speed; entries of older manifests carry "sha256" and still verify.
DIGESTS: dict[str, Callable[[], Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
DIGEST = "blake3"


@dataclass(frozen=True)
class FileFacts:
    """What was written: the digest and size of the bytes in the file."""

    digest: str
    bytes: int
    algorithm: str = DIGEST

    def entry(self) -> dict[str, Any]:
        """The manifest fields: ``{algorithm: digest, "bytes": size}``."""
        return {self.algorithm: self.digest, "bytes": self.bytes}


class HashingSink(io.RawIOBase):
    """A write-only stream into the open file ``fd`` that hashes the file's own bytes as they land.

    ``write`` puts the caller's bytes into the file with ``os.write`` (no Python-side buffer)
    and returns; a second thread then reads those bytes back from the page cache with
    ``os.preadv`` into a buffer of its own and hashes them. The caller's buffers are never
    read after ``write`` returns: ``torch.save`` hands out views of memory it frees or reuses
    at once, and hashing such views later recorded digests of whatever memory held then.
    So the digest is the digest of the file's bytes, and hashing still overlaps writing and
    the ``fsync`` that follows (``finish`` is called after it).

    Large writes go to the file in slices, so the hashing thread can follow a single
    multi-gigabyte ``write`` (safetensors hands over the whole file at once). ``error``
    keeps the first ``OSError`` of a write: ``torch.save`` replaces it by a ``RuntimeError``
    of its own, and the caller wants the original (a full disk).
    """

    SLICE = 8 << 20  # bytes per os.write; the hashing thread follows slice by slice
    READ = 1 << 20  # bytes per read-back; one buffer, reused (no page faults per chunk)

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.count = fd, 0
        self.error: OSError | None = None
        self._digest = DIGESTS[DIGEST]()
        self._hashed = 0
        self._hash_error: BaseException | None = None
        self._done = False
        self._landed = threading.Condition()
        self._thread = threading.Thread(target=self._hash_behind, name="finetune-hash", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            for start in range(0, view.nbytes, self.SLICE):
                part = view[start:start + self.SLICE]
                while part.nbytes:  # a regular file may take fewer bytes than asked
                    part = part[os.write(self.fd, part):]
                with self._landed:
                    self.count += min(self.SLICE, view.nbytes - start)
                    self._landed.notify()
        except OSError as err:
            self.error = self.error or err
            raise
        return view.nbytes

    def _hash_behind(self) -> None:
        buffer = memoryview(bytearray(self.READ))
        try:
            while True:
                with self._landed:
                    self._landed.wait_for(lambda: self.count > self._hashed or self._done)
                    end = self.count
                if end == self._hashed:
                    return
                while self._hashed < end:
                    n = os.preadv(self.fd, [buffer[:min(self.READ, end - self._hashed)]], self._hashed)
                    if n == 0:
                        raise OSError(errno.EIO, f"the file ends at {self._hashed} of {end} written bytes")
                    self._digest.update(buffer[:n])
                    self._hashed += n
        except BaseException as err:  # noqa: BLE001 - handed to the writer by finish()
            self._hash_error = err

    def finish(self) -> FileFacts:
        """Wait for the hashing thread to reach the end of the file; the digest and size written."""
        self._stop()
        if self._hash_error is not None:
            raise self._hash_error
        return FileFacts(self._digest.hexdigest(), self.count)

    def _stop(self) -> None:
        with self._landed:
            self._done = True
            self._landed.notify()
        self._thread.join()

    def close(self) -> None:  # the file descriptor is closed by its owner
        if self._thread.is_alive():
            self._stop()
        super().close()


def fsync_dir(directory: str | Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_stream(path: str | Path, write: Callable[[IO[bytes]], None]) -> FileFacts:
    """Call ``write(stream)`` into a temporary file beside ``path``, verify it, move it into place.

    Returns the digest and size of what was written. On any error (a full disk included) the
    temporary file is removed and whatever was at ``path`` before is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    sink = HashingSink(fd)
    try:
        try:
            try:
                write(sink)
            except Exception as err:
                if sink.error is not None and err is not sink.error:  # torch.save turns ENOSPC into RuntimeError
                    raise sink.error from None
                raise
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
            os.fsync(fd)  # while the hashing thread catches up
            facts = sink.finish()
        finally:
            sink.close()  # after an error: stops the hashing thread
            os.close(fd)
        if tmp.stat().st_size != facts.bytes:
            raise OSError(errno.EIO, f"short write: {tmp.stat().st_size} of {facts.bytes} bytes reached the disk")
        old = _set_aside(path)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                old.unlink(missing_ok=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    if old is not None:  # freeing a large file's pages takes a while: not on the caller's time
        threading.Thread(target=old.unlink, kwargs={"missing_ok": True}, name="finetune-unlink", daemon=True).start()
    return facts


def _set_aside(path: Path, large: int = 16 << 20) -> Path | None:
    """A second name for a large file about to be replaced, so ``os.replace`` doesn't free its data.

    A leftover (``.*.tmp``, after a kill) is removed by the next ``CheckpointManager``.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if info.st_nlink > 1 or info.st_size < large:  # another name keeps the data anyway, or it is small
        return None
    aside = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.old.tmp")
    try:
        os.link(path, aside)
    except OSError:
        return None
    return aside


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place durably."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_stream(path, lambda f: f.write(text.encode()))


def atomic_link(source: Path, target: Path) -> None:
    """Make ``target`` name the same bytes as ``source`` (a hard link; a copy where links fail)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def file_digest(path: str | Path, algorithm: str = DIGEST, chunk: int = 1 << 20) -> str:
    """The hex digest of the file's bytes (``algorithm``: a key of ``DIGESTS``)."""
    digest = DIGESTS[algorithm]()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------- weights
def weights_metadata(spec: BackboneSpec, *, class_names: list[str], versions: dict[str, str],
                     monitor: str | None = None, value: float | None = None,
                     epoch: int | None = None) -> dict[str, str]:
    """String metadata stored in every weights file: enough to rebuild model and preprocessing."""
    return {
        "format": WEIGHTS_FORMAT, "model_name": spec.name, "model_source": spec.source,
        "num_classes": str(spec.num_classes), "in_chans": str(spec.in_chans),
        "class_names": json.dumps(class_names), "head": json.dumps(spec.head),
        "classifier": spec.classifier, "first_conv": spec.first_conv,
        "data_config": json.dumps(spec.data_config), "monitor": json.dumps(monitor),
        "value": json.dumps(value), "epoch": json.dumps(epoch), "versions": json.dumps(versions),
    }


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of the model's own state_dict (what safetensors needs)."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str],
                 weights_format: str = "safetensors") -> FileFacts:
    """Write the model's weights with ``metadata``: safetensors, or a ``torch.save`` dict (``.pt``)."""
    tensors = portable_state_dict(model)
    if weights_format == "torch":
        payload = {"format": WEIGHTS_FORMAT, "model": tensors, "weights_metadata": metadata}
        return atomic_write_stream(path, lambda f: torch.save(payload, f))
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write_stream(path, lambda f: f.write(data))


@dataclass
class ModelMeta:
    """What a weights file says about its model, parsed."""

    name: str
    source: str
    num_classes: int
    in_chans: int
    class_names: list[str]
    head: dict[str, Any]
    data_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # monitor, value, epoch, versions

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> ModelMeta:
        if meta.get("format") != WEIGHTS_FORMAT:
            raise UserError(f"'{path}' is not a finetune weights file (no '{WEIGHTS_FORMAT}' metadata): "
                            "to start from other weights use model.weights=PATH")
        data_config = json.loads(meta["data_config"])
        data_config["input_size"] = tuple(data_config["input_size"])
        return cls(name=meta["model_name"], source=meta["model_source"], num_classes=int(meta["num_classes"]),
                   in_chans=int(meta["in_chans"]), class_names=json.loads(meta["class_names"]),
                   head=json.loads(meta["head"]), data_config=data_config,
                   extra={k: json.loads(meta[k]) for k in ("monitor", "value", "epoch", "versions") if k in meta})


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a fine-tuned model from a ``.safetensors`` weights file or a ``last.ckpt``.

    Returns the model in eval mode and its metadata (class names, data config for preprocessing).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = ModelMeta.from_metadata(f.metadata() or {}, path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = ModelMeta.from_metadata(state.get("weights_metadata", {}), path)
        tensors = state["model"]
    input_size = meta.data_config["input_size"][-1]
    model, _ = build_model(name=meta.name, source=meta.source, num_classes=meta.num_classes,
                           in_chans=meta.in_chans, input_size=input_size, **meta.head)
    model.load_state_dict(tensors)  # strict: the file holds exactly this model's keys
    return model.to(device).eval(), meta


# -------------------------------------------------------------- training state
def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as plain values and tensors (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # saved on CPU, or resumed on fewer GPUs: as many as fit
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_training_state(path: str | Path, state: dict[str, Any]) -> FileFacts:
    """``torch.save`` the state atomically. The zip's own CRC32 is skipped: the manifest's digest,
    computed while writing, already covers every byte (and ``torch.load`` reads such files)."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        return atomic_write_stream(path, lambda f: torch.save(state, f))
    finally:
        torch.serialization.set_crc32_options(crc)


def load_training_state(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``last.ckpt`` safely; a corrupt or foreign file is a one-line error naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UserError(f"training state '{path}' cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"'{path}' is not a finetune training state (last.ckpt)")
    return state


def verify_file(path: str | Path, entry: dict[str, Any] | None) -> None:
    """Check ``path`` against its manifest ``entry`` (size, then digest); raise naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' is listed in manifest.json but missing")
    if entry is None:
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(f"checkpoint '{path}' is truncated or changed: {size} bytes, "
                        f"manifest.json says {entry['bytes']}")
    algorithm = next((a for a in DIGESTS if a in entry), None)
    if algorithm is None:
        raise UserError(f"manifest.json names no digest for '{path}' (expected one of {', '.join(DIGESTS)})")
    if file_digest(path, algorithm) != entry[algorithm]:
        raise UserError(f"checkpoint '{path}' is corrupt: its {algorithm} does not match manifest.json")


# -------------------------------------------------------------------- manifest
class Manifest:
    """``manifest.json``: digest (blake3), size, kind, epoch, step, metric of every checkpoint file; which is best.

    ``fresh=True`` starts an empty manifest (a new run) without reading or touching the file
    until the first ``save``.
    """

    def __init__(self, path: str | Path, *, fresh: bool = False):
        self.path = Path(path)
        self.data: dict[str, Any] = {"files": {}, "best": None}
        if not fresh and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"'{self.path}' cannot be read ({err}): it lists the run's checkpoints; "
                                "resume from a file with resume=FILE.ckpt instead") from None

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    def record(self, name: str, facts: FileFacts | None = None, *, kind: str, epoch: int, step: int,
               metric: str, value: float | None) -> None:
        """Describe ``name`` (already in place); ``facts`` from the write, else hashed from disk."""
        file = self.path.parent / name
        facts = facts or FileFacts(file_digest(file), file.stat().st_size)
        self.files[name] = {**facts.entry(), "kind": kind, "epoch": epoch,
                            "step": step, "metric": metric, "value": value,
                            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def set_best(self, name: str) -> None:
        self.data["best"] = name

    def states(self) -> list[str]:
        """Training-state files, newest first (``last.ckpt`` before its equal-step twin)."""
        names = [n for n in self.files if n.endswith(".ckpt")]
        return sorted(names, key=lambda n: (self.files[n]["step"], self.files[n]["epoch"], n == "last.ckpt"),
                      reverse=True)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


# ---------------------------------------------------------- checkpoint policy
@dataclass(frozen=True)
class CheckpointPolicy:
    """What to save and when (``conf/checkpoint/``); see ``CheckpointManager``."""

    monitor: str = "val/acc1"
    mode: str | None = None  # max | min; inferred from ``monitor`` when None
    save_best: bool = True
    save_last: bool = True
    save_top_k: int = 0
    every_n_epochs: int = 1
    every_n_steps: int | None = None
    keep_last_k: int | None = 1
    weights_format: str = "safetensors"

    @property
    def resolved_mode(self) -> str:
        return self.mode or infer_mode(self.monitor)

    @property
    def ext(self) -> str:
        return WEIGHTS_EXTENSIONS[self.weights_format]

    def better(self, value: float, than: float) -> bool:
        return value > than if self.resolved_mode == "max" else value < than


def state_file_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:03d}-step{step:06d}.ckpt"


def top_k_file_name(epoch: int, metric: str, value: float, ext: str) -> str:
    return f"epoch{epoch:03d}-{re.sub(r'[^A-Za-z0-9_.]+', '_', metric)}-{value:.4f}{ext}"


# ---------------------------------------------------------- checkpoint manager
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
    """

    def __init__(self, directory: str | Path, *, policy: CheckpointPolicy,
                 metadata: Callable[..., dict[str, str]], weights_model: Callable[[], nn.Module],
                 training_state: Callable[[TrainState], dict], fresh: bool = True):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.monitor = policy, policy.monitor
        self.metadata, self.weights_model, self.training_state = metadata, weights_model, training_state
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

    def resume_from(self, policy_state: dict[str, Any] | None, *, state: TrainState, resumed: str | None,
                    invalid: tuple[str, ...] = (), source: Path | None = None, rehash: bool = False) -> None:
        """Continue after ``state``; ``resumed`` names the file in this directory it came from.

        Files newer than ``state`` that its policy does not know (top-k files of epochs that
        will be re-run) and files found ``invalid`` are dropped from the manifest. ``source``:
        the checkpoint directory of another run the state came from; its best and top-k files
        of that moment are carried over. ``rehash``: ``resumed`` was accepted although it did not
        match its manifest entry (``resume_allow_unverified``); the entry is rewritten from the file.
        """
        if source is not None:
            self._carry_over(source, policy_state or {}, state)
        known = {e["name"] for e in (policy_state or {}).get("top_k", [])}
        self.top_k = [e for e in (policy_state or {}).get("top_k", []) if (self.dir / e["name"]).is_file()]
        for name, entry in list(self.manifest.files.items()):
            abandoned = entry.get("kind") == "top_k" and entry["step"] > state.global_step and name not in known
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
            self.last_saved = (state.epoch, state.global_step, state.batches_seen)
        self.manifest.save()

    def _carry_over(self, source: Path, policy_state: dict[str, Any], state: TrainState) -> None:
        """Copy (verified) the best and top-k weights the state knows of from ``source`` into this run."""
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
                            f"on {self.monitor} {state.best_value if kind == 'best' else ''}".rstrip())
                continue
            self._guarded(name, lambda p: atomic_link(source / name, p))
            self.manifest.files[name] = dict(entry)
            if kind == "best":
                self.manifest.set_best(name)
            log.info(f"carried over {kind} weights of epoch {epoch} from '{source / name}'")

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
            self._write_weights(f"best{self.policy.ext}", "best", state, value)
            self.manifest.set_best(f"best{self.policy.ext}")
            self.manifest.save()
        if self.policy.save_top_k and value is not None:
            self._update_top_k(state, value)
        if self.policy.save_last and state.epoch % self.policy.every_n_epochs == 0:
            self.save_last(state, value)

    def on_interrupt(self, state: TrainState) -> None:
        if self.policy.save_last:
            self.save_state(state)
        self.wait()

    def on_fit_end(self, state: TrainState) -> None:
        self.wait()
        if self.policy.save_last and self.last_saved != (state.epoch, state.global_step, state.batches_seen):
            self.save_last(state, self.last_value)

    # ------------------------------------------------------------ saving
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
        if not background:
            self._write_state(self.training_state(state), replace(state))
            return
        snapshot = detached_copy(self.training_state(state))
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
        meta = self.metadata(monitor=self.monitor, value=value, epoch=state.epoch)
        facts = self._guarded(name, lambda p: save_weights(p, self.weights_model(), meta,
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
        return {name: str(self.dir / name) for name in self.manifest.files}


def detached_copy(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned to the CPU (a snapshot)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, detached_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's per-module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions); earlier files are intact."""
