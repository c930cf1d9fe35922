"""Read any checkpoint file into a flat ``{name: Tensor}`` dict, safely, on CPU.

The format is detected from the file's first bytes, never from its name:

- zip archives: ``torch.save`` (loaded with ``weights_only=True, mmap=True``) or a
  TorchScript archive (its ``state_dict()``, read as data without loading the program; see
  `finetune.weights.torchscript`);
- legacy (non-zip) ``torch.save`` pickles (``weights_only=True``, no mmap possible);
- safetensors files (memory-mapped);
- a shard index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) or
  a directory holding one, or holding a single weights file.

Nothing executes code from a file unless ``trust_pickle=True``, which warns loudly: pickles
are read weights-only, and a TorchScript program is never loaded (``torch.jit.load``) unless
trusted. Every file name a shard index holds is confined to the index's directory.
Containers (``state_dict``, ``model``, ...) are unwrapped here; key prefixes are not
touched (that is the remapper's job, so that it can report what it stripped).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import pickletools
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from finetune._torch_compat import blocked_global, is_weights_only_refusal, reports_damaged_file
from finetune.confine import confined
from finetune.errors import UnexpectedReadError, UserError, describe_error
from finetune.weights.limits import MAX_DEPTH, TooLarge, measure_tree
from finetune.weights.torchscript import DamagedArchive, NotPlainData, read_script_tensors

log = logging.getLogger(__name__)

# Container keys, in the order they are tried. EMA variants only when asked for.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
EMA_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema", "module_ema")

# Index file names, in the order a directory is searched; then single-file names.
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")

# What a non-checkpoint file is, by its leading bytes (for the error message only).
FOREIGN_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive (unpack it first)",
    b"\x93NUMPY": "a NumPy .npy array (not a state dict)",
    b"\x89HDF": "an HDF5 file (Keras/TensorFlow weights are not supported)",
    b"\x08": "possibly a protobuf/ONNX/TensorFlow file (not a PyTorch checkpoint)",
}
MAX_INFLATED_BYTES = 64 * 2**20  # a compressed entry (TorchScript code/ text) may inflate to this much
# Tensors may claim at most this many times the bytes of the storages they view (tied weights share
# one storage), plus VIEW_SLACK for small expanded buffers such as ``arange(n).expand(1, -1)``.
VIEW_FACTOR, VIEW_SLACK = 2, 2**20
MAX_METADATA_CHARS = 1000  # a container's scalar entry, as `Checkpoint.metadata` keeps it (for display)
TRUST_HINT = "set model.trust_pickle=true (CLI: --trust-pickle) only if you trust the file"
# Errors that, raised while reading a file, show the file is damaged: zipfile's checks, a deflated entry that does
# not inflate, a pickle or a binary field cut short, names or text that are not UTF-8, safetensors' header and size
# checks, a TorchScript archive that contradicts itself. Any other error is unexpected: a bug, or a torch release
# that reads differently (`explain_read_error`).
DAMAGE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, struct.error, UnicodeDecodeError,
                 SafetensorError, DamagedArchive)
ZIP_FLAGS_NEVER_WRITTEN = 0x1 | 0x20 | 0x40  # encrypted, patched, strongly encrypted: zipfile cannot read them
CHECKSUM_CHUNK = 2**20  # bytes read at a time when a zip's checksums are checked
LEGACY_PICKLES = 5  # a legacy torch.save file: magic number, protocol, system info, the object, its storage keys


@dataclass
class Checkpoint:
    """Tensors read from one file plus what the reader learned about it.

    Attributes:
        path: The file (or index) that was read.
        format: ``safetensors``, ``torch-zip``, ``torch-legacy``, ``torchscript``,
            ``sharded-safetensors`` or ``sharded-torch``.
        tensors: Flat ``{name: Tensor}`` on CPU, names as stored (prefixes kept).
        container: Keys walked to reach the state dict, e.g. ``["state_dict"]``.
        metadata: safetensors ``__metadata__`` or the container's scalar entries.
        skipped: Non-tensor leaves found inside the state dict (names).
    """

    path: str
    format: str
    tensors: dict[str, torch.Tensor]
    container: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def read_state_dict(
    path: str | Path, *, trust_pickle: bool = False, ema: bool = False
) -> dict[str, torch.Tensor]:
    """Read a checkpoint of any supported format into ``{name: Tensor}`` on CPU.

    Args:
        path: A checkpoint file, a shard index file, a directory holding one, or
            ``builtin:NAME`` (see ``finetune.weights.sources.BUILTIN_SOURCES``).
        trust_pickle: Allow arbitrary pickled objects (runs code from the file!).
        ema: Prefer the EMA weights of a training checkpoint when it has them.

    Returns:
        The state dict, names as stored in the file (wrapper prefixes kept).

    Raises:
        UserError: Missing, empty, truncated, foreign or unsafe file.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"state_dict": {"fc.weight": torch.ones(2, 3)}}, p)
    >>> list(read_state_dict(p))
    ['fc.weight']
    """
    return read_checkpoint(path, trust_pickle=trust_pickle, ema=ema).tensors


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False, ema: bool = False) -> Checkpoint:
    """Like `read_state_dict`, but also returns format, container and metadata."""
    from finetune.weights.sources import resolve_path  # local: sources imports nothing heavy

    file = resolve_path(path)
    if file.is_dir():
        file = _find_in_directory(file)
    if not file.exists():
        raise UserError(f"checkpoint '{file}' does not exist: check the path (model.weights)")
    if file.stat().st_size == 0:
        raise UserError(f"checkpoint '{file}' is empty (0 bytes): the download or save was interrupted; "
                        "get the file again")
    kind = detect_format(file)
    if kind in ("index-safetensors", "index-torch"):
        return _read_sharded(file, kind, trust_pickle=trust_pickle, ema=ema)
    return _read_single(file, kind, trust_pickle=trust_pickle, ema=ema)


def detect_format(file: Path) -> str:
    """Name the format of ``file`` from its leading bytes.

    Returns:
        One of ``safetensors``, ``torch-zip``, ``torchscript``, ``torch-legacy``,
        ``index-safetensors``, ``index-torch``.

    Raises:
        UserError: The file is something else (the message says what it looks like).
    """
    with open(file, "rb") as f:
        head = f.read(16)
    size = file.stat().st_size
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(file)
    # safetensors: a little-endian u64 header length, then the JSON header itself.
    if len(head) >= 9 and head[8:9] == b"{":
        claimed = struct.unpack("<Q", head[:8])[0]
        if claimed > size - 8:
            raise UserError(f"checkpoint '{file}' is a truncated or corrupt safetensors file (its header claims "
                            f"{claimed} bytes, the whole file has {size}): save or download it again")
        return "safetensors"
    if head.startswith(b"\x80") and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"  # torch.save legacy format, or a bare pickle: both go through torch.load
    if head.lstrip()[:1] == b"{":
        return _index_kind(file)
    raise UserError(f"'{file}' is not a checkpoint: it looks like {_describe_foreign(head)}; "
                    "expected a .pt/.pth/.bin/.ckpt (torch.save), .safetensors or a shard index")


def _describe_foreign(head: bytes) -> str:
    """Say what a non-checkpoint file looks like, from its first bytes."""
    for magic, what in FOREIGN_MAGIC.items():
        if head.startswith(magic):
            return what
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file starting {head[:12].decode(errors='replace')!r}"
    return f"unknown binary data starting {head[:8].hex()!r}"


def _zip_kind(file: Path) -> str:
    """Tell a TorchScript archive from a ``torch.save`` zip, checking the archive is whole."""
    with _open_zip(file) as zf:
        names = zf.namelist()
    if any(n.rpartition("/")[2] == "constants.pkl" or "/code/" in f"/{n}" for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch-zip"
    raise UserError(f"'{file}' is a zip archive but not a torch.save checkpoint (no data.pkl inside): "
                    "expected a .pt/.pth/.safetensors file")


def check_zip_archive(file: Path) -> None:
    """For a zip file (``torch.save``), the checks of `_open_zip`, before ``torch.load`` inflates anything."""
    if _is_zip(file):
        _open_zip(file).close()


def _open_zip(file: Path) -> zipfile.ZipFile:
    """Open a zip checkpoint, refusing entries torch never writes before anything reads them.

    ``torch.save`` stores every entry uncompressed, ``torch.jit.save`` all but its ``code/``
    text. Any other compressed entry (a repacked file, or a zip bomb: a few bytes that inflate
    to gigabytes), a ``code/`` entry inflating past `MAX_INFLATED_BYTES`, and an entry that
    claims more bytes than the file holds are refused before anything is read.
    """
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as err:  # the last: a version zipfile lacks
        raise UserError(f"checkpoint '{file}' is a truncated or corrupt zip archive ({describe_error(err)}): "
                        "save or download it again") from err
    try:
        _check_zip_entries(file, archive.infolist())
    except UserError:
        archive.close()
        raise
    return archive


def _check_zip_entries(file: Path, entries: list[zipfile.ZipInfo]) -> None:
    """Each entry stored (or small deflated ``code/`` text), unencrypted and inside the file, and all of them no
    larger than the file (entries that overlap would let storages claim the same bytes many times)."""
    size = file.stat().st_size
    for info in entries:
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.flag_bits & ZIP_FLAGS_NEVER_WRITTEN:
            raise UserError(f"checkpoint '{file}' has an encrypted or patched entry '{info.filename}', which torch "
                            "never writes: refused (a forged or corrupt archive); save or download it again")
        if not stored and ("/code/" not in f"/{info.filename}" or info.compress_type != zipfile.ZIP_DEFLATED
                           or info.file_size > MAX_INFLATED_BYTES):
            raise UserError(f"checkpoint '{file}' has a compressed entry '{info.filename}' ({info.compress_size} "
                            f"bytes inflating to {info.file_size}), which torch never writes: refused (a repacked "
                            "or forged archive); re-save the weights with torch.save")
        if (stored and info.file_size != info.compress_size) or info.header_offset + info.compress_size > size:
            raise UserError(f"checkpoint '{file}' is a truncated or corrupt zip archive (entry '{info.filename}' "
                            f"claims {info.file_size} bytes, the whole file has {size}): save or download it again")
    total = sum(info.compress_size for info in entries)
    if total > size:
        raise UserError(f"checkpoint '{file}' is a forged or corrupt zip archive (its {len(entries)} entries claim "
                        f"{total} bytes in all, the whole file has {size}: they overlap): save or download it again")


def _index_kind(file: Path) -> str:
    """Tell which shard index a JSON file is, or say why it is not one."""
    try:
        index = json.loads(file.read_text())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise UserError(f"'{file}' is not a checkpoint: it looks like broken JSON ({describe_error(err)}); "
                        "expected a checkpoint or a shard index") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise UserError(f"'{file}' is a JSON file without a 'weight_map': not a shard index; "
                        "point model.weights at the checkpoint itself")
    shards = index["weight_map"].values()
    return "index-safetensors" if all(str(s).endswith(".safetensors") for s in shards) else "index-torch"


def _find_in_directory(directory: Path) -> Path:
    """Pick the index or the single weights file inside a directory."""
    for name in INDEX_NAMES + SINGLE_NAMES:
        if (directory / name).exists():
            return directory / name
    candidates = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.index.json"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates[:5]) or "no weights files"
    raise UserError(f"directory '{directory}' has {found}: expected one of "
                    f"{', '.join(INDEX_NAMES + SINGLE_NAMES)}; point model.weights at the file")


def _read_single(file: Path, kind: str, *, trust_pickle: bool, ema: bool) -> Checkpoint:
    """Read one non-sharded file of a known kind."""
    if kind == "safetensors":
        return Checkpoint(str(file), kind, *_read_safetensors(file))
    if kind == "torchscript":
        tensors = _read_torchscript(file, trust_pickle=trust_pickle)
        check_tensor_bytes(tensors, file)
        return Checkpoint(str(file), kind, tensors)
    obj = _torch_load(file, mmap=kind == "torch-zip", trust_pickle=trust_pickle)
    tensors, container, metadata, skipped = unwrap_container(obj, file, ema=ema)
    check_tensor_bytes(tensors, file)
    return Checkpoint(str(file), kind, tensors, container, metadata, skipped)


def _read_torchscript(file: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """A TorchScript archive's ``state_dict()``: read as data; its program is loaded only when trusted.

    ``torch.jit.load`` compiles the archive's code and runs parts of it (``__setstate__``)
    while loading, so it is code from the file, like an unpickled object.
    """
    try:
        with _open_zip(file) as archive:
            return read_script_tensors(file, archive)
    except NotPlainData as err:
        if not trust_pickle:
            raise UserError(f"checkpoint '{file}' is a TorchScript program whose weights cannot be read without "
                            f"running its code ({err}): re-save model.state_dict() with torch.save or safetensors, "
                            f"or {TRUST_HINT}") from None
        reason = str(err)
    except UserError:
        raise
    except Exception as err:  # zip, pickle and storage errors have no common base class: sorted by _load_error
        raise _load_error(file, err) from err
    _warn_trusted(file, f"loading the TorchScript program in '{file}' with torch.jit.load ({reason})")
    try:
        module = torch.jit.load(str(file), map_location="cpu")
    except Exception as err:  # the TorchScript compiler and unpickler raise RuntimeError and others
        raise _load_error(file, err) from err
    return {k: v.detach() for k, v in module.state_dict().items()}


def _warn_trusted(file: Path, what: str) -> None:
    """The loud warning for ``trust_pickle=True``: code from ``file`` may run."""
    warnings.warn(f"trust_pickle=true: {what} can run arbitrary code from the file", stacklevel=4)
    log.warning("TRUST_PICKLE: %s; this can run code from '%s'", what, file)


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Read a safetensors file through its memory map (pages are read on first touch)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError and OSError; anything else is a bug
        raise _load_error(file, err, what="as safetensors") from err
    return tensors, [], metadata


def _torch_load(file: Path, *, mmap: bool, trust_pickle: bool) -> object:
    """``torch.load`` on CPU, weights-only unless trusted, with one-line errors."""
    if trust_pickle:
        _warn_trusted(file, f"unpickling '{file}' with weights_only=False")
    try:
        if file.name.endswith(".safetensors"):  # torch.load would treat the path as safetensors
            with open(file, "rb") as f:  # a file object: no mmap, but read by content
                return torch.load(f, map_location="cpu", weights_only=not trust_pickle)
        return torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except Exception as err:  # pickle, zip and storage errors have no common base class: sorted by _load_error
        raise _load_error(file, err) from err


def _load_error(file: Path, err: Exception, *, what: str = "") -> UserError:
    """Turn a reader's failure into one line naming the cause and the fix (raise it ``from err``).

    ``what``: how the file was read, e.g. ``as safetensors``.
    """
    failure = explain_read_error(file, err)
    read = f"checkpoint '{file}' could not be read{' ' + what if what else ''}"
    if failure.kind == "blocked":
        needs = f"the pickled object '{failure.blocked}'" if failure.blocked else "pickled objects"
        return UserError(f"checkpoint '{file}' needs {needs}, which safe loading blocks: re-save it as plain tensors "
                         f"(python -m finetune.ckpt convert), or {TRUST_HINT}")
    if failure.kind == "damaged":
        return UserError(f"{read} ({failure.detail}): it is truncated or corrupt; save or download it again")
    if failure.kind == "os":
        return UserError(f"{read} ({failure.detail}): check the file and its permissions")
    return unexpected_read_error(read, failure)


@dataclass(frozen=True)
class ReadFailure:
    """What a reader's failure says about the file it read; see `explain_read_error`."""

    kind: str  # damaged (truncated, corrupt, forged or another kind of file), blocked, os, or unexpected
    detail: str  # one line naming the error that shows it, e.g. "BadZipFile: Bad CRC-32 for file 'archive/data.pkl'"
    blocked: str | None = None  # blocked: the global safe loading refused ('posix.system'), when torch names it
    intact: bool = False  # the file's checksums (a zip's CRCs) were all checked and match


def explain_read_error(file: Path, err: BaseException) -> ReadFailure:
    """Sort a reader's failure on ``file``: damage, objects safe loading blocks, the disk, or unexpected.

    A zip's checksums are checked first, since a flipped bit in a pickle can make torch raise
    anything. Then ``err`` itself: a weights-only refusal (of an object, or of a TorchScript archive),
    an error whose type or torch's words say the file is malformed, an `OSError`; for a file without
    checksums, a flaw in its pickles. Anything else is unexpected (a bug, or a torch release that reads
    differently): its caller keeps it as the cause.
    """
    damage, intact = zip_checksums(file)
    if damage:
        return ReadFailure("damaged", damage)
    if is_weights_only_refusal(err):
        return ReadFailure("blocked", describe_error(err), blocked_global(err))
    if isinstance(err, DAMAGE_ERRORS) or reports_damaged_file(err):
        return ReadFailure("damaged", describe_error(err))
    if isinstance(err, OSError):
        return ReadFailure("os", describe_error(err))
    flaw = None if intact else pickle_flaw(file)  # files without checksums: a garbled pickle raises anything
    if flaw:
        return ReadFailure("damaged", f"{describe_error(err)}; pickletools: {flaw}")
    return ReadFailure("unexpected", describe_error(err), intact=intact)


def unexpected_read_error(read: str, failure: ReadFailure) -> UnexpectedReadError:
    """The one line for an unexpected failure; ``read`` says what could not be read (``checkpoint 'x' could not
    be read``). Raise it ``from`` the error, whose traceback ``HYDRA_FULL_ERROR=1`` shows."""
    if failure.intact:
        return UnexpectedReadError(f"{read}: an unexpected error ({failure.detail}) although its checksums match: "
                                   "please report it with the traceback HYDRA_FULL_ERROR=1 shows")
    return UnexpectedReadError(f"{read}: an unexpected error reading it ({failure.detail}): if a fresh copy fails "
                               "the same way, please report it with the traceback HYDRA_FULL_ERROR=1 shows")


def zip_checksums(file: Path) -> tuple[str | None, bool]:
    """``(damage, intact)`` of a zip file: the first damage zipfile finds reading each entry that has a CRC
    (one line; None if none), and whether every entry had one and matched. ``(None, False)`` for anything else.

    ``torch.save`` writes CRCs unless ``torch.serialization.set_crc32_options(False)`` (then each is 0:
    such entries are skipped). Entries torch never writes are damage, found before any is read.
    """
    try:
        if not _is_zip(file):
            return None, False
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
            _check_zip_entries(file, entries)  # bounds what reading them costs
            checked = [info for info in entries if info.CRC or not info.file_size]
            for info in checked:
                with archive.open(info) as record:  # zipfile compares the CRC once the record is read
                    while record.read(CHECKSUM_CHUNK):
                        pass
        return None, len(checked) == len(entries)
    except UserError as err:  # _check_zip_entries' refusal, a whole sentence
        return str(err), False
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as err:  # as in _open_zip
        return describe_error(err), False
    except OSError:
        return None, False  # no verdict: the error being explained says more


def pickle_flaw(file: Path) -> str | None:
    """The first flaw stdlib's ``pickletools`` finds in the pickles torch reads from ``file`` (a zip's ``data.pkl``,
    a legacy file's `LEGACY_PICKLES`), one line; None when they parse or ``file`` holds none.

    Nothing is unpickled: ``pickletools.dis`` only checks the opcodes, the stack and the memo, which
    a pickle cut short or with a flipped bit fails where torch's unpickler raises IndexError, KeyError...
    """
    try:
        kind = detect_format(file)
        if kind == "torch-zip":
            with zipfile.ZipFile(file) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                with archive.open(name) as stream:
                    pickletools.dis(stream, out=_Discard())
        elif kind == "torch-legacy":
            with open(file, "rb") as stream:
                for _ in range(LEGACY_PICKLES):
                    pickletools.dis(stream, out=_Discard())
    except (ValueError, IndexError) as err:  # pickletools' complaints; IndexError: its own, on some garbage
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    except (UserError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError):
        return None  # no verdict on the pickles: the file is no torch.save file, or its zip is what is damaged
    return None


class _Discard(io.TextIOBase):
    """A text stream that keeps nothing: ``pickletools.dis`` writes its listing while it checks."""

    def write(self, text: str) -> int:
        return len(text)


def _is_zip(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def unwrap_container(
    obj: object, file: Path, *, ema: bool = False
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str], list[str]]:
    """Find the state dict inside a loaded object and flatten nested dicts.

    Returns:
        ``(tensors, container_keys_walked, scalar_metadata, skipped_non_tensor_names)``.

    Raises:
        UserError: No state dict; or containers nested past `MAX_DEPTH` (one that holds itself), or
            nested dicts that expand past the limits of `finetune.weights.limits`.
    """
    container: list[str] = []
    metadata: dict[str, str] = {}
    keys = (EMA_CONTAINER_KEYS + CONTAINER_KEYS) if ema else CONTAINER_KEYS
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        metadata.update({_shortened(k): _shortened(v) for k, v in obj.items() if isinstance(v, (int, float, str, bool))})
        inner = next((k for k in keys if isinstance(obj.get(k), (Mapping, torch.nn.Module))), None)
        if inner is None:
            break
        if len(container) == MAX_DEPTH:  # a dict that holds itself as its own 'state_dict' would loop for ever
            raise UserError(f"checkpoint '{file}' is refused: its containers ('{'.'.join(container[:3])}...') nest "
                            f"more than {MAX_DEPTH} levels deep, which no real checkpoint does: it is forged or "
                            "damaged; re-save the weights as a flat state dict (torch.save or safetensors)")
        container.append(inner)
        obj = obj[inner]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint '{file}' holds a {type(obj).__name__}, not a state dict: "
                        "expected a dict of tensors")
    try:
        tensors, skipped = flatten_tensors(obj)
    except TooLarge as err:
        raise UserError(f"checkpoint '{file}' is refused: {err}; no real state dict does that, so the file is forged "
                        "or damaged: re-save the weights as a flat state dict (torch.save or safetensors)") from err
    if not tensors:
        tops = ", ".join(_shortened(k) for k in list(obj)[:8])
        raise UserError(f"checkpoint '{file}' has no tensors (top-level keys: {tops}): expected a state dict")
    return tensors, container, metadata, skipped


def _shortened(value: object) -> str:
    """``str(value)``, at most `MAX_METADATA_CHARS` characters (one string may be the value of many keys)."""
    text = str(value)
    return text if len(text) <= MAX_METADATA_CHARS else f"{text[:MAX_METADATA_CHARS]}..."


def _is_state_dict(obj: Mapping) -> bool:
    """A mapping is a state dict when most of its values are tensors."""
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, torch.Tensor) for v in values) * 2 > len(values)


def flatten_tensors(obj: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flatten nested mappings of tensors into dotted names; collect non-tensor leaves.

    The names are counted first, each distinct mapping once (`measure_tree`): nested dicts that
    share children cost no more than their size in the file to refuse.

    Raises:
        TooLarge: The names would pass the limits of `finetune.weights.limits`, or a dict holds itself.

    >>> inner = {"w": torch.zeros(1)}
    >>> list(flatten_tensors({"a": inner, "b": inner, "n": 3})[0])
    ['a.w', 'b.w']
    """
    measure_tree(obj, _mapping_items)
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    _flatten(obj, "", tensors, skipped)
    return tensors, skipped


def _mapping_items(node: object) -> list[tuple[str, object]] | None:
    """A mapping's ``(name, value)`` entries as `flatten_tensors` names them; None for a leaf."""
    return [(str(k), v) for k, v in node.items()] if isinstance(node, Mapping) else None


def _flatten(obj: Mapping, prefix: str, tensors: dict[str, torch.Tensor], skipped: list[str]) -> None:
    """`flatten_tensors` of a measured mapping (its depth is bounded, so the recursion is too)."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, f"{name}.", tensors, skipped)
        else:
            skipped.append(name)


def check_tensor_bytes(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """Refuse tensors that claim far more bytes than the storages they view hold.

    ``torch.save`` (and TorchScript) keep each tensor's shape and strides beside its storage, so a
    few stored bytes can claim terabytes (stride 0) and cost that much once anything copies them
    (``ckpt convert``, a model built to their shapes). Together they may claim `VIEW_FACTOR` times
    their distinct storages plus `VIEW_SLACK`; the storages themselves are no larger than the file.

    Raises:
        UserError: Naming the tensor that claims the most.
    """
    stored: dict[int, int] = {}  # storage address -> bytes: a storage viewed by many tensors counts once
    claimed, worst = 0, None  # worst: (name, bytes claimed, bytes stored) of the tensor that claims the most extra
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        ptr, nbytes, need = storage.data_ptr(), storage.nbytes(), tensor.numel() * tensor.element_size()
        stored[ptr] = max(stored.get(ptr, 0), nbytes)
        claimed += need
        if worst is None or need - nbytes > worst[1] - worst[2]:
            worst = (name, need, nbytes)
    held = sum(stored.values())
    if claimed > VIEW_FACTOR * held + VIEW_SLACK:
        name, need, nbytes = worst
        raise UserError(f"checkpoint '{file}' is refused: its tensors claim {claimed} bytes over {held} stored bytes "
                        f"(stride-0 views, or one storage under many names: '{name}' claims {need} over a storage of "
                        f"{nbytes}), which no real checkpoint does: re-save the weights as plain tensors (torch.save "
                        "or safetensors)")


def _read_sharded(index_file: Path, kind: str, *, trust_pickle: bool, ema: bool) -> Checkpoint:
    """Read every shard named by an index, after checking they are all inside its directory and present."""
    weight_map: dict[str, object] = json.loads(index_file.read_text())["weight_map"]
    files = _shard_files(index_file, weight_map)
    missing = [s for s, file in files.items() if not file.is_file()]
    if missing:
        raise UserError(f"shard index '{index_file}' names {len(missing)} missing shard(s), first '{missing[0]}': "
                        "download every shard next to the index")
    tensors: dict[str, torch.Tensor] = {}
    for shard, file in files.items():
        shard_kind = detect_format(file)
        if shard_kind.startswith("index-"):
            raise UserError(f"shard index '{index_file}' names '{shard}', which is itself a shard index: "
                            "the index must name weights files")
        tensors.update(_read_single(file, shard_kind, trust_pickle=trust_pickle, ema=ema).tensors)
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise UserError(f"shard index '{index_file}' lists tensor '{absent[0]}' (and {len(absent) - 1} more) "
                        "that no shard holds: the shards do not belong to this index")
    fmt = "sharded-safetensors" if kind == "index-safetensors" else "sharded-torch"
    return Checkpoint(str(index_file), fmt, tensors)


def _shard_files(index_file: Path, weight_map: Mapping[str, object]) -> dict[str, Path]:
    """``{shard name: path}``, each name confined to the index's directory (no absolute, ``..`` or link out).

    Each file once, however many spellings name it (``a.bin``, ``./a.bin``, ``.//a.bin``, ...): an
    index of a million spellings of one large shard would otherwise read it a million times.
    """
    files: dict[str, Path] = {}
    spellings: set[str] = set()
    real_files: set[Path] = set()
    for key, shard in weight_map.items():
        if isinstance(shard, str) and shard in spellings:
            continue
        try:
            path = confined(index_file.parent, shard, named_in=index_file)
        except UserError as err:
            raise UserError(f"shard index entry '{key}': {err}") from None
        spellings.add(shard)
        if path.resolve() not in real_files:
            real_files.add(path.resolve())
            files[shard] = path
    return files
