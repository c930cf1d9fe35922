"""Every file the project writes goes through here: atomic, verified, and never through a planted link.

Run dirs, sweep dirs and export dirs are often handed to a user by someone else ("resume my run"),
so a name in one may be a symbolic link someone planted to make us overwrite a file elsewhere
(``~/.bashrc``). Three rules, one function each:

* whole files (`atomic_write_stream`, `atomic_write_text`): a temporary file beside the target,
  hashed as it is written, fsynced, size-checked, moved into place with ``os.replace``, then the
  directory fsynced. ``os.replace`` swaps the directory entry, so a link at the target is replaced,
  never written through, and a kill at any moment leaves the previous file intact;
* appends and locks (`open_append`, `open_lock`): ``O_NOFOLLOW``: a link is refused, a FIFO or other
  special file too, and a file with a second name (a hard link) is first copied to a name of its own;
* directories: with ``root=`` (the run or sweep dir), the file's directory must resolve inside the
  root (`check_inside`), so a planted ``checkpoints -> /elsewhere`` link is refused. A root the user
  named on the command line may itself be a link: it is resolved first.

Files read from such a directory are bounded: `read_yaml_data` refuses YAML aliases (a 500-byte
"billion laughs" file expands to gigabytes once copied into a config) and caps the size, and neither
it nor `read_json_data` resolves anything (``${oc.env:...}`` stays text).

Also here: file digests (BLAKE3, sha256) and `csv_cell`, which keeps text read from others from
starting a spreadsheet formula. Torch-free: the ONNX predictor imports it too.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import blake3
import yaml
from omegaconf._utils import get_yaml_loader

from finetune.errors import UserError

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
    dir_fd = os.open(directory, os.O_RDONLY)  # safe-write: read-only, to fsync the directory
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_stream(path: str | Path, write: Callable[[IO[bytes]], None], *,
                        root: str | Path | None = None) -> FileFacts:
    """Call ``write(stream)`` into a temporary file beside ``path``, verify it, move it into place.

    Returns the digest and size of what was written. On any error (a full disk included) the
    temporary file is removed and whatever was at ``path`` before is untouched. A link at ``path``
    is replaced, not followed; ``root``: the directory ``path`` must stay inside (`check_inside`).
    """
    path = Path(path)
    if root is not None:
        check_inside(root, path)
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


def atomic_write_text(path: str | Path, text: str, *, root: str | Path | None = None) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, written as `atomic_write_stream` writes."""
    atomic_write_stream(path, lambda f: f.write(text.encode()), root=root)


def atomic_write_bytes(path: str | Path, data: bytes, *, root: str | Path | None = None) -> None:
    atomic_write_stream(path, lambda f: f.write(data), root=root)


@contextlib.contextmanager
def staged_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target`` (same suffix: writers that go by it work) for a writer that
    takes a path (ONNX, ``torch.export``, safetensors' ``save_file``); moved onto ``target`` (fsynced,
    then the directory) only if the block succeeds, and removed in any case. A link at ``target`` is
    replaced, as `atomic_write_stream` does."""
    target = Path(target)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{target.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_path(beside: str | Path, tag: str) -> Iterator[Path]:
    """A temporary file name beside ``beside`` for an intermediate a writer needs (e.g. the fp32 model an
    int8 one is quantized from); removed however the block ends, never moved anywhere."""
    beside = Path(beside)
    tmp = beside.with_name(f".{beside.stem}.{os.getpid()}-{secrets.token_hex(4)}.{tag}{beside.suffix}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


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


# ------------------------------------------------------------ links planted by others
class PlantedLink(UserError):
    """A path the project was about to write through is a link (or special file) someone else may have planted."""


def check_inside(root: str | Path, path: str | Path) -> None:
    """Refuse ``path`` when its directory, links resolved, is not ``root`` or inside it.

    >>> check_inside("/tmp", "/tmp/run/summary.json")
    """
    base, parent = os.path.realpath(root), os.path.realpath(Path(path).parent)
    if parent != base and not parent.startswith(base.rstrip(os.sep) + os.sep):
        raise PlantedLink(f"'{Path(path).parent}' leads to '{parent}', outside '{root}' (a link): refused to write "
                          f"'{Path(path).name}' there (a directory from someone else may plant such links); remove "
                          "the link, or link the whole directory instead")


def check_no_links_out(root: str | Path, names: list[str]) -> None:
    """Refuse when any of ``names`` (paths relative to ``root``, directories or files the project or
    Hydra will write) is a link: a directory may link inside ``root``, a file never (Hydra and
    TensorBoard open files by name, which follows a link)."""
    root = Path(root)
    for name in names:
        path = root / name
        if not path.is_symlink():
            continue
        target = os.readlink(path)
        if path.is_dir():
            inside = os.path.realpath(path)
            base = os.path.realpath(root).rstrip(os.sep) + os.sep
            if (inside + os.sep).startswith(base):
                continue
        raise PlantedLink(f"'{path}' is a link to '{target}': refused to write through it (a directory from "
                          "someone else may plant such links); remove the link")


def _open_nofollow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a link and anything but a regular file (a FIFO would block)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PlantedLink(f"'{path}' is a link to '{os.readlink(path)}': refused to write through it (a "
                              "directory from someone else may plant such links); remove the link") from None
        if err.errno == errno.ENXIO:  # a FIFO without a reader
            raise PlantedLink(f"'{path}' is not a regular file: refused to write to it; remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PlantedLink(f"'{path}' is not a regular file: refused to write to it; remove it")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _open_own(path: Path, flags: int) -> int:
    """`_open_nofollow`, after giving the file a name of its own: a file that has another name (a hard
    link planted to a file elsewhere) is first copied, and the copy replaces this name; the other name
    keeps its content untouched."""
    fd = _open_nofollow(path, flags)
    if os.fstat(fd).st_nlink <= 1:
        return fd
    os.close(fd)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.unlink.tmp")
    shutil.copyfile(path, tmp, follow_symlinks=False)
    os.replace(tmp, path)
    return _open_nofollow(path, flags)


def open_append(path: str | Path, *, root: str | Path | None = None, encoding: str = "utf-8") -> IO[str]:
    """``path`` opened to append text (created when missing), never through a link (`PlantedLink`)."""
    path = Path(path)
    if root is not None:
        check_inside(root, path)
    return os.fdopen(_open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding=encoding)


def open_lock(path: str | Path, *, root: str | Path | None = None) -> int:
    """A file descriptor of ``path`` (read/write, created when missing) to hold an ``flock`` on,
    never through a link (`PlantedLink`)."""
    path = Path(path)
    if root is not None:
        check_inside(root, path)
    return _open_own(path, os.O_RDWR | os.O_CREAT)


# ------------------------------------------------------------ CSV cells from others
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` safe for a spreadsheet: text that starts like a formula (``= + - @``, tab, CR) gets a
    leading ``'``, as OWASP's CSV-injection advice says; numbers, and text that is a number, stay as they are.

    >>> [csv_cell(v) for v in ("=HYPERLINK(1)", "-0.5", "+cmd|x", "cat", 3, None)]
    ["'=HYPERLINK(1)", '-0.5', "'+cmd|x", 'cat', 3, None]
    """
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_text(rows: Iterable[Iterable[Any]]) -> str:
    """``rows`` as CSV text (RFC 4180: CRLF line ends, so a cell holding a CR or LF is quoted), every
    cell through `csv_cell`: what the project's CSV files (predictions, misclassified images, a sweep's
    summary) are written with.

    >>> csv_text([["path", "prob"], ["=x.png", 0.5]])
    "path,prob\\r\\n'=x.png,0.5\\r\\n"
    """
    out = io.StringIO()
    csv.writer(out).writerows([csv_cell(cell) for cell in row] for row in rows)
    return out.getvalue()


# ------------------------------------------------------------ finding files in a folder from others
GLOB_CHARS = frozenset("*?[")


def walk_files(folder: str | Path) -> Iterator[str]:
    """Every regular file under ``folder``, hidden ones (``.name``) and hidden folders skipped; links to
    folders and files are followed, but each real folder is listed once.

    A link back up the tree (a loop) or a second link to a folder already listed is not entered,
    so the walk ends, its work bounded by the folders on disk, and no file is listed twice. A FIFO,
    a device or a link to one is not a file here: opening it would block or never end.
    """
    seen, pending = set(), [str(folder)]
    while pending:
        directory = pending.pop()
        try:
            real = os.stat(directory)
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)  # sorted: which alias of a folder is kept is stable
        except OSError:  # unreadable, or gone: as os.walk, skipped
            continue
        if (real.st_dev, real.st_ino) in seen:
            continue
        seen.add((real.st_dev, real.st_ino))
        visible = [e for e in entries if not e.name.startswith(".")]
        yield from (e.path for e in visible if _is_file(e))
        pending += [e.path for e in reversed(visible) if _is_dir(e)]


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def glob_files(pattern: str) -> list[Path]:
    """The files a glob names (``*``, ``?``, ``[...]`` within a name, ``**`` across folders), and every
    file under a folder it names; sorted.

    Matched by walking the pattern's fixed leading folder once (`walk_files`) rather than with
    `glob.glob`, which follows links to folders into every path they make: two ``x -> .`` links
    turn ``photos/**/*.png`` into some 2^40 matches. Written by hand because Python 3.11 has no
    ``glob.translate``.
    """
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    rest = [_segment_regex(part) for part in parts[fixed:]]
    last = len(rest) - 1  # a final ``**`` is everything below
    regex = re.compile("".join((".*" if i == last else r) if r == _ANY_DIRS else r + ("" if i == last else "/")
                               for i, r in enumerate(rest)))
    if not base.is_dir():
        return []
    matched = []
    for file in walk_files(base):
        relative = Path(os.path.relpath(file, base)).as_posix().split("/")
        if any(regex.fullmatch("/".join(relative[:n])) for n in range(1, len(relative) + 1)):
            matched.append(Path(file))
    return sorted(matched)


_ANY_DIRS = "(?:[^/]+/)*"  # ``**``: no folder, or any number of them


def _segment_regex(part: str) -> str:
    """One path segment of a glob as a regex that never crosses ``/``.

    >>> _segment_regex("*.p?g"), _segment_regex("[!a]x"), _segment_regex("**")
    ('[^/]*\\\\.p[^/]g', '[^a]x', '(?:[^/]+/)*')
    """
    if part == "**":
        return _ANY_DIRS
    out, i = [], 0
    while i < len(part):
        char = part[i]
        end = part.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif end != -1:
            body = part[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


# ------------------------------------------------------------ reading files from others
MAX_CONFIG_BYTES = 4 << 20  # a composed config is a few KB, Hydra's hydra.yaml some 10 KB


class _NoAliasLoader(get_yaml_loader()):
    """OmegaConf's YAML loader (PyYAML's safe loader that reads ``1e-5`` as a float, as the config was
    written: omegaconf<2.4's ``get_yaml_loader``), refusing aliases (``*name``): the files read with it
    never need them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias '*{event.anchor}', which is refused "
                                              "(aliases can expand a small file into gigabytes)", event.start_mark)
        return super().compose_node(parent, index)


def read_text_bounded(path: str | Path, *, max_bytes: int, what: str = "file") -> str:
    """The text of ``path``, refused (one line) when it is larger than ``max_bytes`` or not a regular file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{what} '{path}' is not a regular file: refused")
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise UserError(f"{what} '{path}' cannot be read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} '{path}' is larger than {max_bytes} bytes: refused (it is not a file finetune wrote)")
    return data.decode("utf-8", errors="replace")


def load_yaml_data(text: str, *, source: str) -> Any:
    """YAML text from someone else as plain data: no aliases, nothing resolved; one line when it is broken.

    >>> load_yaml_data("a: [1, 2]", source="x.yaml")
    {'a': [1, 2]}
    >>> load_yaml_data("a: &x [1]\\nb: *x", source="x.yaml")
    Traceback (most recent call last):
    finetune.errors.UserError: 'x.yaml' cannot be read (an alias '*x', which is refused (aliases can expand a small file into gigabytes), line 2): refused
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f"'{source}' holds more than {MAX_CONFIG_BYTES} characters of YAML: refused")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"'{source}' cannot be read ({problem}{where}): refused") from None


def read_yaml_data(path: str | Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A YAML file from someone else (``.hydra/*.yaml`` of a run or sweep dir) as plain data (`load_yaml_data`)."""
    return load_yaml_data(read_text_bounded(path, max_bytes=max_bytes, what="YAML file"), source=str(path))


def read_json_data(path: str | Path, *, max_bytes: int = 64 << 20) -> Any:
    """A JSON file from someone else as plain data; too large, too deep or broken is one line."""
    text = read_text_bounded(path, max_bytes=max_bytes, what="JSON file")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UserError(f"'{path}' is not valid JSON ({str(err).splitlines()[0] if str(err) else 'too deep'})") from None
