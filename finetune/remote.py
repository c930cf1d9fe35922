"""Files named by URL (``s3://``, ``gs://``, any fsspec URL): fetched once into a local cache, checked on every use.

``model.weights``, ``ckpt=`` of evaluate, predict and export, and the ``finetune.ckpt`` commands take a URL
where they take a path. The file is read through fsspec (credentials and endpoint from the storage's own
places: for S3 ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws/``), into
``$FINETUNE_CACHE/remote/KEY/NAME`` (``~/.cache/finetune`` by default), where ``KEY`` hashes the URL and the
version the storage reports (its ETag, else size and modification time): a file replaced in the bucket is
fetched again, an unchanged one never. Each copy keeps the size and digest it had when it arrived, and is
checked against them every time it is used (a cache damaged on disk is fetched again, never read). A run
dir's URL (``ckpt=s3://bucket/runs/NAME``) reads its ``manifest.json`` and fetches the best weights it names,
verified against the manifest's digest. A shard index by URL (``.../model.safetensors.index.json``) fetches
every shard it names beside it.

Written by hand: fsspec's caching file systems (``filecache::``) key a copy by its path and never check the
bytes they hand back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from finetune.errors import UserError

log = logging.getLogger("finetune")

CACHE_ENV = "FINETUNE_CACHE"
RECORD = "record.json"  # beside each cached file: its URL, version, size and digest
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_SHARDS = 10_000  # distinct shards of one weights index
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".json")


def is_remote(value: Any) -> bool:
    """Whether ``value`` names a file by URL (``s3://...``) rather than a local path (``file://`` is local too,
    but read through the same cache for a uniform test of this path).

    >>> is_remote("s3://bucket/w.safetensors"), is_remote("runs/a/best.safetensors"), is_remote("builtin:x")
    (True, False, False)
    """
    return isinstance(value, str) and re.match(r"^[a-z][a-z0-9+.-]*://", value) is not None


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/finetune").expanduser() / "remote"


def in_cache(path: Path) -> bool:
    """Whether ``path`` is a fetched copy: what evaluate, predict and export write goes elsewhere (the working
    directory), not into the cache."""
    return path.resolve().is_relative_to(cache_root().resolve())


def fetch(url: str, *, entry: dict[str, Any] | None = None, what: str = "file") -> Path:
    """The local copy of ``url``, fetched when the cache has none of this version (or a damaged one).

    Args:
        entry: A manifest entry (``bytes`` and a digest) the file must match; the copy is checked
            against it, and a file that does not match is refused.
        what: Names the file in errors (``checkpoint``, ``weights``).

    Raises:
        UserError: The URL cannot be read (missing, credentials, endpoint) or does not match ``entry``.
    """
    from finetune.checkpoint.manifest import verify_file
    from finetune.data.shards import open_fs, storage_error

    fs, path = open_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UserError(f"{what} '{url}' does not exist: check the URL") from None
    except Exception as err:  # the storage's own errors (botocore, aiohttp): one line
        raise UserError(storage_error(url, err)) from None
    if info.get("type") == "directory":
        raise UserError(f"{what} '{url}' is a directory: name a file in it, or a run dir holding {MANIFEST}")
    changed = info.get("mtime") or info.get("LastModified")
    version = str(info.get("ETag") or info.get("etag") or f"{info.get('size')}:{changed}")
    folder = cache_root() / hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:32]
    local = folder / _local_name(path)
    record = _read_record(folder / RECORD)
    if record is not None and local.is_file():
        try:
            verify_file(local, record)
            if entry is not None:
                verify_file(local, entry)
            return local
        except UserError as err:
            log.warning(f"cached copy of '{url}' fetched again: {str(err).split(': ', 1)[-1]}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    facts = _download(fs, path, local, url=url, size=info.get("size"), what=what)
    if entry is not None:
        try:
            verify_file(local, entry)
        except UserError as err:
            local.unlink(missing_ok=True)
            raise UserError(f"{what} '{url}' does not match its manifest entry ({str(err).split(': ', 1)[-1]}): "
                            "the run dir is being written, or damaged; try again, or name the file") from None
    from finetune.files import atomic_write_text

    atomic_write_text(folder / RECORD, json.dumps({"url": url, "version": version, "bytes": facts.bytes,
                                                   facts.algorithm: facts.digest}) + "\n")
    log.info(f"fetched '{url}' ({facts.bytes} bytes) into '{local}'")
    return local


def fetch_weights(url: str, *, what: str = "weights") -> Path:
    """The local copy of a weights file by URL; for a shard index (``model.safetensors.index.json``) the
    copy of the index with every shard it names beside it (`fetch_shards`)."""
    local = fetch(url, what=what)
    if local.name.endswith(".index.json"):
        fetch_shards(url, local)
    return local


def fetch_shards(url: str, index: Path) -> None:
    """Every shard the index at ``url`` names, fetched as its own cached and checked copy (`fetch`) and linked
    beside the index's copy, where the weights reader looks for them. Only plain file names in the index's
    folder are fetched: the index is data from others."""
    from finetune.data.shards import join_url
    from finetune.files import read_json_data

    try:
        weight_map = read_json_data(index, max_bytes=MAX_MANIFEST_BYTES).get("weight_map")
    except (OSError, UserError, ValueError, AttributeError):
        return  # not a shard index: the weights reader says what it is
    names = sorted({str(name) for name in weight_map.values()}) if isinstance(weight_map, dict) else []
    if len(names) > MAX_SHARDS:
        raise UserError(f"shard index '{url}' names {len(names)} shards, over {MAX_SHARDS}: refused")
    for name in names:
        if _local_name(name) != name:
            raise UserError(f"shard index '{url}' names the shard {name!r}: only plain file names beside the index "
                            "are fetched; fix the index")
        shard = fetch(join_url(url.rsplit("/", 1)[0], name), what="weights shard")
        target = index.parent / name
        if not (target.is_file() and os.path.samefile(target, shard)):
            _link(shard, target)


def _link(source: Path, target: Path) -> None:
    """``target`` made the same file as ``source`` (a hard link; a copy where links fail), replaced atomically."""
    import shutil

    staged = target.with_name(f".{target.name}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:
        shutil.copyfile(source, staged)
    os.replace(staged, target)


def fetch_checkpoint(url: str) -> Path:
    """The local copy of what ``ckpt=URL`` names: a weights file, or the best weights of a run dir (its
    ``checkpoints/manifest.json``'s ``best``, verified against that manifest)."""
    if posixpath.splitext(url.rstrip("/"))[1] in WEIGHT_SUFFIXES:
        return fetch_weights(url, what="checkpoint")
    from finetune.data.shards import join_url, open_fs, read_bounded

    base = url.rstrip("/")
    for directory in (join_url(base, "checkpoints"), base):
        fs, path = open_fs(join_url(directory, MANIFEST))
        try:
            raw = read_bounded(fs, path, max_bytes=MAX_MANIFEST_BYTES, what="checkpoint manifest",
                               url=join_url(directory, MANIFEST))
        except UserError as err:
            if "does not exist" in str(err):
                continue
            raise
        files, best = _parse_manifest(raw, source=join_url(directory, MANIFEST))
        entry = files.get(best)
        if entry is None:
            raise UserError(f"run dir '{url}' has no best weights in its manifest: pass ckpt=URL of a weights file")
        return fetch(join_url(directory, best), entry=entry, what="checkpoint")
    raise UserError(f"checkpoint '{url}' is neither a weights file ({', '.join(WEIGHT_SUFFIXES[:5])}) nor a run dir "
                    f"holding checkpoints/{MANIFEST}: check the URL")


def _parse_manifest(raw: bytes, *, source: str) -> tuple[dict[str, Any], str]:
    """``(files, best)`` of a manifest read from storage: its entries, and its best file's plain name."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                              for e in files.values()):
        raise UserError(f"'{source}' is not a checkpoint manifest: pass ckpt=URL of a weights file")
    best = data.get("best") or "best.safetensors"
    if not isinstance(best, str) or posixpath.basename(best) != best or best in (".", ".."):
        raise UserError(f"'{source}' names its best weights {best!r}, not a file name in that directory: refused")
    return files, best


def _local_name(path: str) -> str:
    """The file's own name where it is a plain one (``detect_format`` reads bytes, but ``.onnx`` is by name)."""
    name = posixpath.basename(path.rstrip("/"))
    return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", name) and name != RECORD else "file"


def _read_record(path: Path) -> dict[str, Any] | None:
    from finetune.files import read_json_data

    try:
        record = read_json_data(path, max_bytes=1 << 16)
    except (OSError, UserError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("bytes"), int) else None


def _download(fs: Any, path: str, local: Path, *, url: str, size: Any, what: str) -> Any:
    """``url`` into ``local``, written beside it and renamed when complete and of the size the storage said."""
    from finetune.data.shards import storage_error
    from finetune.files import atomic_write_stream

    def copy(sink: Any) -> None:
        try:
            with fs.open(path, "rb") as source:
                while block := source.read(8 << 20):
                    sink.write(block)
        except FileNotFoundError:
            raise UserError(f"{what} '{url}' does not exist: check the URL") from None
        except Exception as err:  # the storage's own errors: one line
            raise UserError(storage_error(url, err)) from None

    facts = atomic_write_stream(local, copy)
    if isinstance(size, int) and facts.bytes != size:
        local.unlink(missing_ok=True)
        raise UserError(f"{what} '{url}' arrived with {facts.bytes} bytes, the storage says {size}: "
                        "it changed while being read; try again")
    return facts
