"""The storage the sweeper hands optuna: someone else's ``optuna.db`` is read as data, never run as code.

A sweep dir, ``optuna.db`` included, is often someone else's, and continuing a study reads all of it.
Optuna's ``CmaEsSampler`` keeps its state as a hex pickle in trial system attributes and unpickles it
when asked for a trial: a planted pickle would run code as the user. So `GuardedStorage`, the only
storage optuna gets from the sweeper:

* keeps the pickle-looking system attributes this process's sampler writes in memory, never in the
  database (a later continuation recomputes the sampler's state from the trials), and serves them
  back to this process;
* checks every system attribute it reads from the database (`find_pickled`) and refuses the study,
  in one line, on a value that decodes (hex, base64 or as it is, whole or as ``key:0``, ``key:1``, ...
  chunks, inside lists and dicts) to a pickle stream that would import or call anything;
* gives every storage operation `OPERATION_LIMIT_S` seconds: SQLite's progress handler interrupts a
  statement past it (`Deadline`), whatever made it slow;
* refuses, in one line, what optuna cannot parse (bad JSON, an unknown state) and trials whose
  values or params are not numbers, instead of a traceback wherever optuna or a sampler meets them.

An SQLite file is also looked at before SQLAlchemy opens it (`check_sqlite_file`): a link, a
non-SQLite file, or a trigger, view or virtual table (optuna's schema has none) is refused.
A journal file (``journal:PATH``, optuna's `JournalStorage`) is guarded the same way: its trials are
checked as they are replayed, and a link or a file that is not a regular one is refused.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import os
import pickletools
import re
import sqlite3
import stat
import threading
import time
import warnings
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy
from optuna.distributions import CategoricalDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from finetune.errors import UserError

# Opcodes by which ``pickle.loads`` imports a name, or calls or builds an object: how a pickle runs code.
# (EXT1/2/4 and PERSID/BINPERSID fail in a plain ``pickle.loads``: no extension codes are registered,
# and there is no ``persistent_load``.)
CALLS = frozenset({"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})
IMPORTS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})  # the only ways to a callable: imports run code too
CALL_BYTES = re.compile(b"[" + re.escape(bytes(ord(op.code) for op in pickletools.opcodes if op.name in CALLS))
                        + b"]")
MAX_DECODED = 64 << 10  # bytes of one value parsed as a pickle: longer ones that parse that far are refused
MAX_NODES = 100_000  # strings, lists and dicts walked in one attribute value: more is refused
OPERATION_LIMIT_S = 30.0  # what one storage operation may take (optuna's own take milliseconds)
PROGRESS_STEPS = 10_000  # SQLite VM steps between two looks at the clock
HEX = re.compile(r"[0-9a-fA-F\s]+")  # bytes.fromhex skips whitespace
BASE64 = re.compile(r"[A-Za-z0-9+/\s]+=*|[A-Za-z0-9_\s-]+=*")
CHUNK = re.compile(r"(.*):(\d{1,6})", re.DOTALL)  # a long value split as optuna's samplers split it
SQLITE_HEADER = b"SQLite format 3\x00"
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
NEW_STUDY = "start a new study: hydra.sweeper.study_name=NEW or hydra.sweep.dir=NEW_DIR"
NEW_FILE = "start a new study: hydra.sweep.dir=NEW_DIR (or hydra.sweeper.storage=sqlite:///NEW_FILE)"
JOURNAL = "journal:"  # hydra.sweeper.storage=journal:PATH
HEARTBEAT_ATTR = "finetune:heartbeat"  # a journal trial's last beat (time.time() of its sweeper's machine)


class RefusedStudy(UserError):
    """A study, or its storage, that the sweeper will not open or go on with."""


def shown(value: object, limit: int = 80) -> str:
    """A value from someone else's file, quoted for a message (``repr``: control characters escaped).

    >>> shown("cma:optimizer:0"), shown("a\\x1b[2Kb")
    ("'cma:optimizer:0'", "'a\\\\x1b[2Kb'")
    """
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def escaped(text: str, limit: int | None = 500) -> str:
    """Text from someone else's file, to print as it is but with control characters escaped (a
    terminal would act on them), cut at ``limit`` characters.

    >>> escaped("ok\\x1b[2K")
    'ok\\\\x1b[2K'
    """
    cut = text if limit is None else text[:limit]
    return CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode(), cut) + ("..." if len(cut) < len(text) else "")


# ------------------------------------------------------------------ pickles
class _Reader(io.BytesIO):
    """The bytes ``pickletools.genops`` parses, noting whether it ever asked past their end."""

    hit_end = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.hit_end |= size is None or size < 0 or len(data) < size
        return data

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        self.hit_end |= not line.endswith(b"\n")
        return line


def _calls_objects(data: bytes, *, truncated: bool, deadline: Deadline | None) -> bool:
    """Whether ``data`` is a pickle that builds or calls objects (an opcode of `CALLS`), or whose
    ``pickle.loads`` would import a name (`IMPORTS`) before it fails. Each opcode is parsed and its
    effect on the stack followed as ``pickle.loads`` keeps it (only the items above the last mark
    may be popped), so that random text rarely passes for a pickle. ``truncated``: ``data`` is the
    start of a longer value; a parse that runs out of it may go on to call something, and counts so."""
    if not data or not truncated and not CALL_BYTES.search(data):
        return False
    reader, height, marks, calls = _Reader(data), 0, [], False  # items on the stack; the height at each mark
    try:
        for count, (op, _, _) in enumerate(pickletools.genops(reader)):
            if deadline is not None and count % 4096 == 4095:
                deadline.check()
            if op.name == "POP" and marks and height == marks[-1]:  # POP of a mark
                marks.pop()
                continue
            if pickletools.markobject in op.stack_before:
                if not marks:
                    return False  # pickle.loads fails here too
                height, needed = marks.pop(), op.stack_before.index(pickletools.markobject)
            else:
                needed = len(op.stack_before)
            if height - (marks[-1] if marks else 0) < needed:
                return False
            if op.name in IMPORTS:
                return True
            calls |= op.name in CALLS
            height -= needed
            if op.stack_after == [pickletools.markobject]:
                marks.append(height)
            else:
                height += len(op.stack_after)
    except ValueError:  # an unknown opcode, a bad argument, or the end of the data
        return truncated and reader.hit_end
    return calls  # it reached STOP: a whole pickle


def _decodings(text: str, *, prefix: bool) -> Iterator[tuple[bytes, bool]]:
    """``text`` as the bytes a sampler could unpickle, each with whether they are only the start of
    the value (cut at about `MAX_DECODED` bytes, or ``prefix``: ``text`` is a first chunk): as it is
    (protocol 0 is text), hex-decoded, base64-decoded."""
    raw = text[:MAX_DECODED]
    yield raw.encode("utf-8", "surrogatepass"), prefix or len(text) > len(raw)
    if not raw.isascii() and all(ord(c) < 256 for c in raw):
        yield raw.encode("latin-1"), prefix or len(text) > len(raw)
    window = text[:2 * MAX_DECODED]
    truncated = prefix or len(text) > len(window)
    if HEX.fullmatch(window):
        digits = re.sub(r"\s", "", window)
        if truncated or len(digits) % 2 == 0:  # else bytes.fromhex fails
            yield bytes.fromhex(digits[:len(digits) - len(digits) % 2]), truncated
    if BASE64.fullmatch(window):
        letters = re.sub(r"\s", "", window).rstrip("=").translate(str.maketrans("-_", "+/"))
        letters = letters[:len(letters) - (len(letters) % 4 == 1)]
        try:
            yield base64.b64decode(letters + "=" * (-len(letters) % 4)), truncated
        except binascii.Error:
            pass


def _strings(value: Any, budget: list[int], depth: int = 0) -> Iterator[str]:
    """The strings in a JSON value (keys too), and each list's strings joined (chunks kept in a list);
    more than `MAX_NODES` nodes, or nesting deeper than 32, raises ``OverflowError``."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 32:
        raise OverflowError
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key, budget, depth + 1)
            yield from _strings(item, budget, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item, budget, depth + 1)
        if sum(isinstance(item, str) for item in value) > 1:
            yield "".join(item for item in value if isinstance(item, str))


def pickle_looking(value: Any, deadline: Deadline | None = None, *, prefix: bool = False) -> bool:
    """Whether ``value`` (a JSON value) holds a string that a sampler could unpickle into running code;
    ``prefix``: the strings are first chunks of longer values (a parse that reaches their end counts).

    >>> import pickle
    >>> pickle_looking(pickle.dumps(print, protocol=0).hex()), pickle_looking('{"x": 0.5}')
    (True, False)
    """
    try:
        return any(_calls_objects(data, truncated=cut, deadline=deadline)
                   for text in _strings(value, [MAX_NODES]) for data, cut in _decodings(text, prefix=prefix))
    except OverflowError:  # too large to check: refused like a pickle
        return True


def _chunk_groups(attrs: Mapping[str, Any]) -> dict[str, list[str]]:
    """Keys split as ``NAME:0``, ``NAME:1``, ... by name, in order (string values only)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for key in attrs:
        if isinstance(key, str) and (match := CHUNK.fullmatch(key)) and isinstance(attrs[key], str):
            groups.setdefault(match[1], []).append((int(match[2]), key))
    return {name: [key for _, key in sorted(keys)] for name, keys in groups.items() if len(keys) > 1}


def find_pickled(attrs: Mapping[str, Any], deadline: Deadline | None = None) -> str | None:
    """The first key of ``attrs`` whose value, or whose chunks joined, look like a pickle (`pickle_looking`)."""
    for key, value in attrs.items():
        if pickle_looking(value, deadline):
            return key
    for keys in _chunk_groups(attrs).values():
        if pickle_looking("".join(attrs[key] for key in keys), deadline):
            return keys[0]
    return None


# ------------------------------------------------------------------ time limits
class Deadline:
    """The time limit of the storage operation under way, per thread: SQLite's progress handler polls
    it (a statement past it is interrupted) and so does the pickle check."""

    def __init__(self, limit_s: float, where: str):
        self.limit_s, self.where, self._local = limit_s, where, threading.local()

    @contextmanager
    def running(self) -> Iterator[None]:
        """One storage operation; a nested one runs under the outer one's limit."""
        if getattr(self._local, "end", None) is not None:
            yield
            return
        self._local.end, self._local.passed = time.monotonic() + self.limit_s, False
        try:
            yield
        except Exception as err:
            if self._local.passed and not isinstance(err, RefusedStudy):
                raise self.refusal() from None
            raise
        finally:
            self._local.end = None

    def passed(self) -> bool:
        """True once the operation under way has run out of time (SQLite's progress handler: stop)."""
        end = getattr(self._local, "end", None)
        if end is not None and not self._local.passed and time.monotonic() > end:
            self._local.passed = True
        return end is not None and self._local.passed

    def check(self) -> None:
        if self.passed():
            raise self.refusal()

    def refusal(self) -> RefusedStudy:
        return RefusedStudy(f"'{self.where}' took more than {self.limit_s:g} s to answer one request: refused to "
                            f"wait (a file someone else made can make every statement slow); {NEW_FILE}")


def _timeboxed_connection(deadline: Deadline) -> type[sqlite3.Connection]:
    """``sqlite3.connect``'s ``factory``: a connection whose statements stop when ``deadline`` passes,
    and whose schema may not call functions that are unsafe there (``trusted_schema=OFF``)."""

    class TimeBoxedConnection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.set_progress_handler(deadline.passed, PROGRESS_STEPS)
            self.execute("PRAGMA trusted_schema=OFF")

    return TimeBoxedConnection


# ------------------------------------------------------------------ the SQLite file
def journal_path(url: str) -> Path | None:
    """The file of a ``journal:PATH`` storage; None for a database URL."""
    return Path(url.removeprefix(JOURNAL)).absolute() if url.startswith(JOURNAL) else None


def sqlite_path(url: str) -> Path | None:
    """The file of an ``sqlite:///PATH`` URL; None for another database or an in-memory one."""
    if journal_path(url) is not None:
        return None
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") \
            or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database).absolute()


def check_plain_file(name: Path) -> None:
    """Refuse a link (writes would land where it leads: the sweep dir may be someone else's) or a
    file that is not a regular one; nothing to do for one that does not exist yet."""
    try:
        mode = os.lstat(name).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise RefusedStudy(f"'{name}' is a symbolic link (to {shown(os.readlink(name))}): refused to open a "
                           f"study through it (optuna would write where it leads); {NEW_FILE}")
    if not stat.S_ISREG(mode):
        raise RefusedStudy(f"'{name}' is not a regular file: refused to open a study there; {NEW_FILE}")


def check_sqlite_file(path: Path, deadline: Deadline) -> None:
    """Refuse an SQLite file that optuna should not open: a link (the sweep dir may be someone
    else's: writes would land where the link leads), not a regular file, not SQLite, or holding a
    trigger, view or virtual table (SQL that runs on optuna's reads and writes; optuna makes none).
    Nothing to do for a file that does not exist yet."""
    for name in (path, *(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        check_plain_file(name)
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        start = shown(header.decode("latin-1"))
        raise RefusedStudy(f"'{path}' is not an SQLite file (it starts with {start}): refused to open it as a study; "
                           f"{NEW_FILE}")
    with deadline.running():
        extra = _schema_extras(path, deadline)
    if extra:
        kind, name = extra
        raise RefusedStudy(f"'{path}' holds a {kind} {shown(name)}, which optuna's schema does not have: refused "
                           f"(it would run its own SQL on the study's reads or writes); {NEW_FILE}")


def _schema_extras(path: Path, deadline: Deadline) -> tuple[str, str] | None:
    """The first trigger, view or virtual table of the SQLite file, read read-only."""
    try:
        connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                                     factory=_timeboxed_connection(deadline))
        try:
            return connection.execute(
                "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view') "
                "OR (type = 'table' AND sql LIKE 'CREATE VIRTUAL TABLE%') ORDER BY rowid LIMIT 1").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as err:
        if deadline.passed():
            raise deadline.refusal() from None
        raise RefusedStudy(f"'{path}' cannot be read as an SQLite database ({err}): refused to open it as a "
                           f"study (if it is yours and a sweep was killed while writing, open it once with the "
                           f"sqlite3 shell to recover it); {NEW_FILE}") from None


# ------------------------------------------------------------------ the storage
def open_storage(url: str, *, limit_s: float = OPERATION_LIMIT_S, heartbeat_s: int | None = None) -> GuardedStorage:
    """The guarded storage at ``url``; an SQLite or journal file is checked first (`check_sqlite_file`,
    `check_plain_file`). ``heartbeat_s``: see `GuardedStorage`."""
    path = sqlite_path(url)
    if path is not None:
        check_sqlite_file(path, Deadline(limit_s, str(path)))
    if (journal := journal_path(url)) is not None:
        check_plain_file(journal)
    return GuardedStorage(url, limit_s=limit_s, heartbeat_s=heartbeat_s)


def heartbeat_settings(heartbeat_s: int | None) -> dict[str, int]:
    """`RDBStorage`'s heartbeat for "a trial silent for ``heartbeat_s`` seconds is stale": a beat every
    quarter of it, so that a few late beats (a busy machine) never make a live trial look dead.

    >>> heartbeat_settings(60), heartbeat_settings(None)
    ({'heartbeat_interval': 15, 'grace_period': 60}, {})
    """
    if heartbeat_s is None:
        return {}
    return {"heartbeat_interval": max(1, heartbeat_s // 4), "grace_period": heartbeat_s}


def server_time_limits(url: str, limit_s: float) -> dict[str, Any]:
    """A database server's own limits for ``limit_s``: to connect, and per statement (PostgreSQL's
    ``statement_timeout``; MySQL's read timeout), so that no request waits longer on a server.

    >>> server_time_limits("postgresql://u@db/optuna", 30)
    {'connect_args': {'connect_timeout': 30, 'options': '-c statement_timeout=30000'}}
    """
    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    seconds = max(1, int(limit_s))
    if backend == "postgresql":
        return {"connect_args": {"connect_timeout": seconds, "options": f"-c statement_timeout={seconds * 1000}"}}
    if backend in ("mysql", "mariadb"):
        return {"connect_args": {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}}
    return {}


def connect(url: str, engine_kwargs: dict[str, Any], *, where: str, heartbeat: dict[str, int]) -> RDBStorage:
    """Optuna's `RDBStorage` at ``url`` (with ``heartbeat``: `heartbeat_settings`); a server that refuses
    (bad credentials, no such database, not reachable) or a missing driver is one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval: experimental since 2.9
            return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except ImportError as err:  # optuna's own ImportError says only "Failed to import DB access module"
        missing = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "its driver"
        raise UserError(f"hydra.sweeper.storage '{where}' needs the database driver '{missing}', which is not "
                        "installed: pip install it, or name an installed one in the URL "
                        "(postgresql+psycopg2://..., mysql+pymysql://...)") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()
        raise RefusedStudy(f"hydra.sweeper.storage '{where}' cannot be opened "
                           f"({escaped(reason[0] if reason else type(err).__name__, 200)}): check the URL, the "
                           "server and the credentials (a password belongs in PGPASSWORD or ~/.pgpass, not the "
                           "URL)") from None


def storage_name(url: str) -> str:
    """``url`` for a message: an SQLite or journal file's path, else the URL without its password."""
    path = sqlite_path(url) or journal_path(url)
    return str(path) if path is not None else sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


# Errors optuna raises while reading a value it cannot parse (bad JSON, a malformed distribution, an
# unknown state; a journal's unknown operation is an AssertionError); a KeyError is also how it says
# that a study or trial does not exist.
UNREADABLE = (ValueError, TypeError, RecursionError, AttributeError, OverflowError, LookupError, AssertionError)


def _not_numbers(trial: FrozenTrial) -> str | None:
    """What of ``trial`` should be numbers and is not (optuna reads SQLite's values as they are)."""
    numbers = (int, float)
    if not all(isinstance(value, numbers) for value in trial.values or ()):
        return "values"
    if not all(isinstance(value, numbers) for value in trial.intermediate_values.values()):
        return "intermediate values"
    if not all(isinstance(value, numbers) or isinstance(trial.distributions[name], CategoricalDistribution)
               for name, value in trial.params.items()):
        return "params"
    return None


class GuardedStorage(BaseStorage, BaseHeartbeat):
    """Optuna's storage at ``url`` (``_CachedStorage(RDBStorage(url))``, as ``optuna.create_study``
    would make), where no sampler reads a pickle from the database and no request runs for more
    than ``limit_s`` seconds (see the module's docstring).

    With ``heartbeat_s``, optuna's heartbeat is on (`heartbeat_settings`): ``optuna.storages.fail_stale_trials``
    fails the running trials of a sweeper silent for that long and hands each to ``stale_trial_callback``.

    ``journal:PATH``: optuna's `JournalStorage` on that file, locked by optuna's `JournalFileOpenLock` (a
    lock file made with ``O_EXCL``, which NFS v3+ honours). Optuna gives a journal no heartbeat: here the
    beat is a trial system attribute, `HEARTBEAT_ATTR`, compared with this machine's clock (the
    machines' clocks must agree, as NTP keeps them, to well within ``heartbeat_s``)."""

    def __init__(self, url: str, *, limit_s: float = OPERATION_LIMIT_S, heartbeat_s: int | None = None):
        self.where = storage_name(url)
        self.deadline = Deadline(limit_s, self.where)
        self.heartbeat = heartbeat_settings(heartbeat_s)
        self.rdb: RDBStorage | None = None
        if (journal := journal_path(url)) is not None:
            if not journal.parent.is_dir():
                raise UserError(f"hydra.sweeper.storage '{JOURNAL}{journal}': the directory '{journal.parent}' does "
                                "not exist: make it, or give a path in a directory that exists (on a filesystem "
                                "every sweeper's machine shares)")
            backend = JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal)))
            self.inner: BaseStorage = self._call(JournalStorage, backend, read=True, found=True)  # replays the file
        else:
            engine_kwargs = {"connect_args": {"factory": _timeboxed_connection(self.deadline)}} \
                if sqlite_path(url) is not None else server_time_limits(url, limit_s)
            with self.deadline.running():
                self.rdb = connect(url, engine_kwargs, where=self.where, heartbeat=self.heartbeat)
            self.inner = _CachedStorage(self.rdb)
        self.stale_trial_callback: Callable[[Any, FrozenTrial], None] | None = None
        self.held_trial_attrs: dict[int, dict[str, Any]] = {}  # this process's pickles, never stored
        self.held_study_attrs: dict[int, dict[str, Any]] = {}
        self.verified: dict[int, FrozenTrial] = {}  # trial id -> the finished trial last checked

    def check_study(self, name: str) -> None:
        """Read the study ``name`` (if there is one) as optuna will, before optuna does: its attributes
        and trials are checked, so a hostile one is refused before any sampler sees it."""
        try:
            study_id = self.get_study_id_from_name(name)
        except KeyError:
            return
        self.get_all_trials(study_id, deepcopy=False)
        self.get_study_system_attrs(study_id)
        self.get_study_user_attrs(study_id)

    # -------------------------------------------------------------- the checks
    def _call(self, method: Any, *args: Any, read: bool = False, found: bool = False, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` of the inner storage, within the time limit; for a ``read``,
        a value optuna cannot parse is refused in one line (a KeyError too when what is read is
        ``found`` already: it then means a malformed value)."""
        with self.deadline.running():
            try:
                return method(*args, **kwargs)
            except UNREADABLE as err:
                if not read or isinstance(err, UserError) or (isinstance(err, KeyError) and not found):
                    raise
                raise RefusedStudy(f"'{self.where}' holds data optuna cannot read ({type(err).__name__}: "
                                   f"{shown(str(err).splitlines()[0] if str(err) else '', 120)}): refused; "
                                   f"{NEW_STUDY}") from None

    def _checked_trial(self, trial: FrozenTrial) -> FrozenTrial:
        """``trial`` with its system attributes from the database checked (a finished trial, cached
        by ``_CachedStorage``, once) and this process's held ones added."""
        held = self.held_trial_attrs.get(trial._trial_id, {})
        if self.verified.get(trial._trial_id) is not trial:
            if malformed := _not_numbers(trial):
                raise RefusedStudy(f"'{self.where}' holds trial {trial.number} with {malformed} that are not numbers: "
                                   f"refused to continue the study; {NEW_STUDY}")
            stored = {key: value for key, value in trial.system_attrs.items()
                      if key not in held or held[key] != value}
            with self.deadline.running():
                key = find_pickled(stored, self.deadline)
            if key is not None:
                raise RefusedStudy(f"'{self.where}' holds a pickled object in system attribute {shown(key)} of "
                                   f"trial {trial.number} (a sampler would unpickle it, which can run any code): "
                                   f"refused to continue the study; {NEW_STUDY}")
            if trial.state.is_finished():
                self.verified[trial._trial_id] = trial
        if held:
            trial.system_attrs.update(held)
        return trial

    def _checked_study_attrs(self, attrs: dict[str, Any], study_id: int) -> dict[str, Any]:
        held = self.held_study_attrs.get(study_id, {})
        with self.deadline.running():
            key = find_pickled(attrs, self.deadline)
        if key is not None:
            raise RefusedStudy(f"'{self.where}' holds a pickled object in study system attribute {shown(key)} "
                               f"(a sampler would unpickle it, which can run any code): refused to continue the "
                               f"study; {NEW_STUDY}")
        return {**attrs, **held}

    def _holds(self, held: dict[str, Any], key: str, value: Any) -> bool:
        """Whether ``key`` goes to memory: a pickle-looking value, or a chunk of one (a sampler splits
        a long pickle into ``NAME:0``, ``NAME:1``, ...: the first chunk counts if it starts like a
        pickle, the others go where the first went)."""
        chunk = CHUNK.fullmatch(key)
        if chunk is None:
            return pickle_looking(value)
        if any((other := CHUNK.fullmatch(k)) and other[1] == chunk[1] for k in held):
            return True
        return pickle_looking(value, prefix=chunk[2] == "0")

    # -------------------------------------------------------------- writes
    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        held = self.held_trial_attrs.setdefault(trial_id, {})
        if self._holds(held, key, value):
            held[key] = value
            return
        self._call(self.inner.set_trial_system_attr, trial_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        held = self.held_study_attrs.setdefault(study_id, {})
        if self._holds(held, key, value):
            held[key] = value
            return
        self._call(self.inner.set_study_system_attr, study_id, key, value)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        held = {}
        if template_trial is not None:  # a copied trial: its pickles stay in memory too
            held = {key: value for key, value in template_trial.system_attrs.items() if pickle_looking(value)}
            if held:
                template_trial = copy.copy(template_trial)
                template_trial.system_attrs = {k: v for k, v in template_trial.system_attrs.items() if k not in held}
        trial_id = self._call(self.inner.create_new_trial, study_id, template_trial)
        if held:
            self.held_trial_attrs[trial_id] = held
        return trial_id

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._call(self.inner.create_new_study, directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._call(self.inner.delete_study, study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call(self.inner.set_study_user_attr, study_id, key, value)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: Any) -> None:
        self._call(self.inner.set_trial_param, trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self._call(self.inner.set_trial_state_values, trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._call(self.inner.set_trial_intermediate_value, trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call(self.inner.set_trial_user_attr, trial_id, key, value)

    # -------------------------------------------------------------- reads
    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call(self.inner.get_study_id_from_name, study_name, read=True)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call(self.inner.get_study_name_from_id, study_id, read=True)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._call(self.inner.get_study_directions, study_id, read=True)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call(self.inner.get_study_user_attrs, study_id, read=True)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        attrs = self._call(self.inner.get_study_system_attrs, study_id, read=True)
        return self._checked_study_attrs(attrs, study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        studies = self._call(self.inner.get_all_studies, read=True)
        for study in studies:
            study.system_attrs = self._checked_study_attrs(study.system_attrs, study._study_id)
        return studies

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call(self.inner.get_trial_id_from_study_id_trial_number, study_id, trial_number, read=True)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._checked_trial(self._call(self.inner.get_trial, trial_id, read=True))

    def get_best_trial(self, study_id: int) -> FrozenTrial:  # its ValueError (no trial completed) is optuna's
        return self._checked_trial(self._call(self.inner.get_best_trial, study_id))

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._call(self.inner.get_all_trials, study_id, deepcopy=deepcopy, states=states, read=True,
                            found=True)
        return [self._checked_trial(trial) for trial in trials]

    def remove_session(self) -> None:
        self.inner.remove_session()

    def close(self) -> None:
        """Let go of the database connections (a journal holds none open)."""
        if self.rdb is not None:
            self.rdb.engine.dispose()

    # -------------------------------------------------------------- optuna's heartbeat
    def record_heartbeat(self, trial_id: int) -> None:
        if self.rdb is not None:
            self._call(self.inner.record_heartbeat, trial_id)
            return
        try:
            self._call(self.inner.set_trial_system_attr, trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # taken for dead and failed by another sweeper: nothing to beat for
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self.rdb is not None:
            return self._call(self.inner._get_stale_trial_ids, study_id, read=True)
        now = time.time()  # a journal: as RDBStorage does it, a trial that never beat is never stale
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if type(beat := t.system_attrs.get(HEARTBEAT_ATTR)) is float
                and now - beat > self.heartbeat["grace_period"]]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat.get("heartbeat_interval")

    def get_heartbeat_stale_trial_callback(self) -> Callable[[Any, FrozenTrial], None] | None:
        return self.stale_trial_callback

    def get_failed_trial_callback(self) -> Callable[[Any, FrozenTrial], None] | None:  # its name in optuna < 4.9
        return self.stale_trial_callback
