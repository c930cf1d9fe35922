"""``checkpoint.mirror``: the run's checkpoints copied to object storage as they are saved, and fetched back
on a fresh node (``resume=URL``).

The mirror of a run at ``URL`` holds ``URL/checkpoints/``: the files of the local checkpoint directory and
its ``manifest.json``, uploaded last, so the manifest there only ever names files already uploaded. A
file replaced in the mirror before its new manifest arrives (``last.ckpt``, a kill mid-upload) no longer
matches the digest the old manifest records: fetching verifies every file, so such a file is never taken.

Uploads run on one thread (``finetune-mirror``), never on the training step's time. Each save point hands
over a *set*: the manifest as it is then, and a hard link of every file it names (checkpoint files are
never written in place, so a link keeps the bytes the manifest describes while training replaces the
name); each file is checked against its entry before it is uploaded, so bytes changed under a link never
reach the mirror as that entry. At most one set waits: a newer one replaces it, since each set is complete
on its own. A set that fails is tried again a few times, then reported in one warning; the local files are
never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.checkpoint.manifest import Manifest, verify_file
from finetune.data.shards import join_url, open_fs, read_bounded, storage_error
from finetune.errors import UserError, describe_error
from finetune.files import DIGESTS, staged_path

log = logging.getLogger("finetune")

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
ATTEMPTS = 3  # per set; botocore retries each request on its own too (`STORAGE_DEFAULTS`)
BACKOFF_S = 2.0  # before the second attempt; doubled before each next one


def is_url(value: Any) -> bool:
    """Whether ``value`` is a storage URL (``s3://...``, ``file:///...``) rather than a local path.

    >>> is_url("s3://b/runs/a"), is_url("outputs/run"), is_url(None)
    (True, False, False)
    """
    return isinstance(value, str) and "://" in value


def checkpoints_url(url: str) -> str:
    """Where a run mirrored at ``url`` keeps its checkpoints."""
    return join_url(url, "checkpoints")


@dataclass
class UploadSet:
    """One save point: the manifest then, and a link to each file it names (name -> link)."""

    manifest: bytes
    files: dict[str, Path]
    entries: dict[str, dict[str, Any]]
    step: int

    def discard(self) -> None:
        for link in self.files.values():
            link.unlink(missing_ok=True)


class Mirror:
    """Uploads each save point's files to ``URL/checkpoints/`` (``manifest.json`` last), off the training thread."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None, flush_timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.target = checkpoints_url(self.url)
        self.fs, self.root = open_fs(self.target, storage_options)
        self.flush_timeout = flush_timeout
        self.remote: dict[str, str] = {}  # name -> digest this process knows the mirror holds
        self.uploaded_step: int | None = None
        self._last_manifest: dict[str, Any] | None = None
        self._waiting: UploadSet | None = None
        self._current: UploadSet | None = None  # the set being uploaded
        self._closed = False
        self._sequence = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ before training
    def check_writable(self) -> None:
        """Write and delete a small object, so a wrong URL or key fails now, not after the first epoch."""
        probe = f"{self.root}/.finetune-write-check-{os.getpid()}"
        try:
            self.fs.pipe_file(probe, b"finetune checks that the mirror is writable\n")
            self.fs.rm_file(probe)
        except FileNotFoundError as err:
            raise UserError(f"checkpoint.mirror '{self.url}' cannot be written: its bucket does not exist "
                            f"({describe_error(err)}): create it, or check the URL") from None
        except Exception as err:  # the storage's own errors (botocore, aiohttp, OSError)
            raise UserError(f"checkpoint.mirror '{self.url}' cannot be written ({describe_error(err)}): check the URL, "
                            "the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws/ or "
                            "checkpoint.storage_options) and the endpoint (AWS_ENDPOINT_URL)") from None

    def know(self, manifest: dict[str, Any]) -> None:
        """The files of ``manifest`` are in the mirror already (fetched from it and verified)."""
        self.remote |= {name: _digest(entry) for name, entry in manifest["files"].items()}
        self._last_manifest = manifest

    # ------------------------------------------------------------ the saving thread
    def push(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Hand over the save point ``manifest`` describes (files in ``directory``); returns at once.

        Called by the thread that just saved, before any other save can replace a file: the links made
        here hold exactly the bytes the manifest records.
        """
        if manifest == self._last_manifest:
            return
        self._last_manifest = json.loads(json.dumps(manifest))
        self._sequence += 1
        links = {}
        for name in manifest["files"]:
            link = directory / f".{name}.{self._sequence}.mirror.tmp"  # a leftover goes with the next FileWriter
            link.unlink(missing_ok=True)  # never written through: a name planted here is removed first
            try:
                os.link(directory / name, link)  # no fsync: a staging name, never needed after a crash
            except OSError:  # a file system without hard links
                shutil.copyfile(directory / name, link)
            links[name] = link
        steps = [e["step"] for e in manifest["files"].values()]
        upload = UploadSet(json.dumps(manifest, indent=2).encode() + b"\n", links, dict(manifest["files"]),
                           max(steps, default=0))
        with self._changed:
            if self._waiting is not None:
                self._waiting.discard()  # superseded: the newer set holds every file the mirror needs
            self._waiting = upload
            self._changed.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="finetune-mirror", daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every set handed over is uploaded (or given up on); False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._waiting is not None or self._current is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self) -> None:
        """Flush: let the pending uploads finish, at most ``flush_timeout`` seconds; say how it ended."""
        if self._thread is None:
            return
        done = self.wait_idle(self.flush_timeout)
        with self._changed:
            self._closed = True
            for left in (self._waiting, self._current):  # given up: an upload in flight fails, or ends unseen
                if left is not None:
                    left.discard()
            self._waiting = None
            self._changed.notify_all()
        held = f"step {self.uploaded_step}" if self.uploaded_step is not None else "no complete set"
        if done and self.uploaded_step is not None:
            log.info(f"checkpoint mirror: '{self.target}' holds the checkpoints of {held}")
        elif not done:
            log.warning(f"checkpoint mirror: uploads to '{self.target}' not finished within "
                        f"checkpoint.mirror_flush_timeout={self.flush_timeout:g} s; the mirror holds {held}, "
                        "the local checkpoints are complete")

    # ------------------------------------------------------------ the upload thread
    def _run(self) -> None:
        while True:
            with self._changed:
                while self._waiting is None and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                upload = self._current = self._waiting
                self._waiting = None
            try:
                self._upload_with_retries(upload)
            finally:
                upload.discard()
                with self._changed:
                    self._current = None
                    self._changed.notify_all()

    def _upload_with_retries(self, upload: UploadSet) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._upload(upload)
                self.uploaded_step = upload.step
                return
            except ChangedAfterSave as err:  # trying again uploads the same wrong bytes
                log.warning(f"checkpoint mirror: {err}; the checkpoints of step {upload.step} are not uploaded, "
                            "the mirror keeps its last complete set and the next save tries again")
                return
            except Exception as err:  # noqa: BLE001 - the storage's own errors; the run goes on
                if self._closed:
                    return  # given up on at the end of the run: `close` said so
                if attempt == ATTEMPTS:
                    log.warning(f"checkpoint mirror: could not upload the checkpoints of step {upload.step} to "
                                f"'{self.target}' after {attempt} attempt(s) ({describe_error(err)}); the local "
                                "files are intact, the next save tries again")
                    return
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))

    def _upload(self, upload: UploadSet) -> None:
        """The files the mirror lacks, then ``manifest.json``, then the files it no longer names.

        Each file is checked against its manifest entry before it goes (on this thread, never the training
        step's time): only bytes the manifest describes are ever recorded as held by the mirror.
        """
        for name, link in upload.files.items():
            digest = _digest(upload.entries[name])
            if self.remote.get(name) != digest:
                try:
                    verify_file(link, upload.entries[name])
                except UserError:
                    raise ChangedAfterSave(f"'{name}' changed after it was saved (written in place?)") from None
                self.remote.pop(name, None)  # replaced in the mirror from here on, until it is complete
                self.fs.put_file(str(link), f"{self.root}/{name}")
                self.remote[name] = digest
        self.fs.pipe_file(f"{self.root}/{MANIFEST}", upload.manifest)
        for name in sorted(set(self.remote) - set(upload.files)):
            self.fs.rm_file(f"{self.root}/{name}")
            del self.remote[name]


class ChangedAfterSave(Exception):
    """A staged file no longer holds the bytes its manifest entry records."""


def _digest(entry: dict[str, Any]) -> str:
    return next((f"{a}:{entry[a]}" for a in DIGESTS if a in entry), "")


# ------------------------------------------------------------------ fetching
def fetch_checkpoints(url: str, checkpoint_dir: Path, *, storage_options: dict[str, Any] | None = None,
                      required: bool) -> dict[str, Any] | None:
    """Copy the mirror of the run at ``url`` into ``checkpoint_dir``: ``manifest.json`` first (read, checked),
    then every file it names, each verified against its entry; the local manifest is written last and names
    only the files that verified. Returns that manifest; None when the mirror holds none and not ``required``.

    Raises:
        UserError: The mirror cannot be read, holds no manifest (``required``), or a bad one.
    """
    remote = checkpoints_url(url.rstrip("/"))
    fs, root = open_fs(remote, storage_options)
    manifest_url = join_url(remote, MANIFEST)
    try:
        raw = read_bounded(fs, f"{root}/{MANIFEST}", max_bytes=MAX_MANIFEST_BYTES, what="checkpoint manifest",
                           url=manifest_url)
    except UserError as err:
        if "does not exist" not in str(err):
            raise
        if required:
            raise UserError(f"resume '{url}' holds no checkpoints: '{manifest_url}' does not exist (a mirror gets "
                            "it after its first complete upload): check the URL, or start the run afresh") from None
        log.info(f"checkpoint mirror: '{url}' holds no checkpoints yet, starting fresh")
        return None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(checkpoint_dir / MANIFEST, fresh=True)
    manifest.parse(raw, source=manifest_url)
    for name, entry in list(manifest.files.items()):
        try:
            _fetch_file(fs, f"{root}/{name}", checkpoint_dir / name, entry, url=join_url(remote, name))
        except UserError as err:
            log.warning(f"checkpoint mirror: {err}: not taken (a set cut short while uploading)")
            del manifest.files[name]
            if manifest.data.get("best") == name:
                manifest.set_best(None)
    manifest.save()
    log.info(f"checkpoint mirror: fetched {len(manifest.files)} checkpoint file(s) from '{remote}' into "
             f"'{checkpoint_dir}'")
    return manifest.data


def _fetch_file(fs: Any, path: str, target: Path, entry: dict[str, Any], *, url: str) -> None:
    """Download ``url`` to ``target`` (at most the size its entry says), verified before it takes the name."""
    with staged_path(target) as tmp:
        try:
            with fs.open(path, "rb") as source, open(tmp, "wb") as sink:  # safe-write: a fresh name of ours
                left = entry["bytes"] + 1  # one byte more shows a longer file
                while left > 0 and (block := source.read(min(left, 8 << 20))):
                    sink.write(block)
                    left -= len(block)
        except FileNotFoundError:
            raise UserError(f"'{url}' is listed in its manifest but missing") from None
        except Exception as err:  # the storage's own errors
            raise UserError(storage_error(url, err)) from None
        try:
            verify_file(tmp, entry)
        except UserError as err:
            raise UserError(f"'{url}' does not match its manifest entry "
                            f"({str(err).split(': ', 1)[-1]})") from None
