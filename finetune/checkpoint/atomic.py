"""Atomic, verified file writes: a temporary file beside the target, hashed as it is written,
fsynced, size-checked, moved into place with ``os.replace``, then the directory fsynced.

A kill at any moment leaves the previous file intact; see the package docstring for which
thread reads what.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import blake3

# mkstemp creates files 0600; written files get the usual 0666 & ~umask. Reading the umask means
# setting it, so it is read once, at import, before any thread of ours could create a file.
_UMASK = os.umask(0)
os.umask(_UMASK)

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

    def __init__(self, fd: int, algorithm: str | None = None):
        """``fd``: the open temporary file (read and write); ``algorithm``: a key of ``DIGESTS``."""
        super().__init__()
        self.fd, self.count = fd, 0
        self.error: OSError | None = None
        self.algorithm = algorithm or DIGEST  # read at call time: a benchmark may switch it
        self._digest = DIGESTS[self.algorithm]()
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
        return FileFacts(self._digest.hexdigest(), self.count, self.algorithm)

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
