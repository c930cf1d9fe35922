"""WebDataset shards: the count index, the list of shards a URL pattern names, and reading samples.

A shard is a tar file of samples in the WebDataset convention: the members of one sample share a key
(the member name up to the first dot of its base name); the image is the ``jpg``, ``jpeg``, ``png`` or
``webp`` member, the label the ``cls`` member (an integer in text) or ``json`` (``{"label": N}``).

Beside the shards ``python -m finetune.shard`` writes ``classes.txt`` (one class name a line, index =
line) and ``index.json``, the count index: how many samples each shard holds. Exact epochs need the
counts before the first byte of a shard is read (`finetune.data.stream`); they are never guessed, and
a shard that holds another number of samples than its index says stops the run.

Shards are files from others: reading is bounded (members over `MAX_MEMBER_BYTES`, labels out of range,
an index over `MAX_INDEX_BYTES` are refused in one line), and names in the index are plain base names.
Paths and URLs go through fsspec, so ``s3://``, ``gs://``, ``file://`` and plain paths read alike.
The tar file is parsed with the standard ``tarfile`` (random access where the file can seek, else in
streaming mode) rather than with webdataset's ``tar_file_iterator``, which reads every member whole with
no bound on its size.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec

from finetune.errors import UserError, describe_error

INDEX_NAME = "index.json"
CLASSES_NAME = "classes.txt"
INDEX_FORMAT = "finetune.shards/1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEYS = ("cls", "json")
MAX_MEMBER_BYTES = 64 << 20  # one image; a member claiming more is refused before it is read
MAX_INDEX_BYTES = 16 << 20  # ~100k shards
MAX_CLASSES_BYTES = 16 << 20
MAX_LABEL_BYTES = 64 << 10
MAX_SHARDS = 1_000_000  # a brace pattern names at most this many shards


@dataclass(frozen=True)
class Shard:
    """One shard: where it is, and how many samples its index says it holds."""

    url: str
    samples: int
    classes: tuple[int, ...] | None = None  # samples per label, when the index says


def expand_urls(pattern: str | list[str]) -> list[str]:
    """The shard URLs a brace pattern (or a list of them) names, in order.

    >>> expand_urls("s3://b/train-{000..002}.tar")
    ['s3://b/train-000.tar', 's3://b/train-001.tar', 's3://b/train-002.tar']
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls: list[str] = []
    for item in patterns:
        for url in braceexpand.braceexpand(str(item)):
            urls.append(url)
            if len(urls) > MAX_SHARDS:
                raise UserError(f"'{item}' names more than {MAX_SHARDS} shards: check the brace pattern")
    if not urls:
        raise UserError(f"'{pattern}' names no shard: give a path, a URL or a brace pattern like train-{{000..009}}.tar")
    return urls


# Bounded waits on object storage: botocore's own defaults wait 60 s for a connection, 5 times over.
STORAGE_DEFAULTS = {"s3": {"config_kwargs": {"connect_timeout": 10, "read_timeout": 60,
                                             "retries": {"max_attempts": 3, "mode": "standard"}}}}


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system and the path in it of ``url`` (``storage_options``: credentials, endpoint).

    Credentials and endpoint come from where the storage's own tools look (for S3: ``AWS_ACCESS_KEY_ID``,
    ``AWS_ENDPOINT_URL``, ``~/.aws/``), so they never enter the run's config or files.
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = STORAGE_DEFAULTS.get(protocol, {}) | (storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise UserError(f"cannot open '{url}' ({describe_error(err)}): install finetune[stream] for s3:// URLs, "
                        "or check the URL") from None
    return fs, path


def read_bounded(fs: fsspec.AbstractFileSystem, path: str, *, max_bytes: int, what: str, url: str) -> bytes:
    """The bytes of a small file beside the shards, refused when larger than ``max_bytes``."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError as err:
        raise UserError(f"{what} '{url}' does not exist ({describe_error(err)})") from None
    except Exception as err:  # fsspec back ends raise their own types (botocore, aiohttp)
        raise UserError(storage_error(url, err)) from None
    if len(data) > max_bytes:
        raise UserError(f"{what} '{url}' is larger than {max_bytes} bytes: refused")
    return data


def storage_error(url: str, err: BaseException) -> str:
    """One line for a failure to reach ``url``: what the storage said."""
    return (f"cannot read '{url}' ({describe_error(err)}): check the URL, the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY or ~/.aws/) and the endpoint (AWS_ENDPOINT_URL)")


def read_index(directory: str, storage_options: dict[str, Any] | None = None) -> dict[str, Shard]:
    """``{shard base name: Shard}`` from ``DIRECTORY/index.json`` (samples, and per-class counts if given)."""
    url = join_url(directory, INDEX_NAME)
    fs, path = open_fs(url, storage_options)
    raw = read_bounded(fs, path, max_bytes=MAX_INDEX_BYTES, what="shard index", url=url)
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        raise UserError(f"shard index '{url}' is not valid JSON: write it again with python -m finetune.shard") from None
    shards = record.get("shards") if isinstance(record, dict) else None
    if record.get("format") != INDEX_FORMAT or not isinstance(shards, dict):
        raise UserError(f"shard index '{url}' is not a {INDEX_FORMAT} index: write it with python -m finetune.shard")
    counts = {}
    for name, entry in shards.items():
        samples = entry.get("samples") if isinstance(entry, dict) else None
        classes = entry.get("classes") if isinstance(entry, dict) else None
        if (posixpath.basename(name) != name or name in ("", ".", "..") or not _count(samples)
                or not (classes is None or isinstance(classes, list) and all(map(_count, classes)))):
            raise UserError(f"shard index '{url}' has a bad entry for '{str(name)[:100]}': refused")
        counts[name] = Shard(join_url(directory, name), samples, None if classes is None else tuple(classes))
    return counts


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def join_url(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def list_shards(pattern: str | list[str], storage_options: dict[str, Any] | None = None) -> list[Shard]:
    """Every shard ``pattern`` names, with its sample count from the index beside it."""
    indexes: dict[str, dict[str, Shard]] = {}
    shards = []
    for url in expand_urls(pattern):
        directory, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if directory not in indexes:
            indexes[directory] = read_index(directory, storage_options)
        if name not in indexes[directory]:
            raise UserError(f"shard '{url}' is not in its index '{join_url(directory, INDEX_NAME)}': the counts "
                            "are needed for exact epochs; write the shards with python -m finetune.shard")
        entry = indexes[directory][name]
        shards.append(Shard(url, entry.samples, entry.classes))
    return shards


def read_classes(directory: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Class names from ``DIRECTORY/classes.txt`` (one a line, index = line)."""
    url = join_url(directory, CLASSES_NAME)
    fs, path = open_fs(url, storage_options)
    raw = read_bounded(fs, path, max_bytes=MAX_CLASSES_BYTES, what="class list", url=url)
    names = [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"class list '{url}' is empty or names a class twice: one distinct name a line")
    return names


# ------------------------------------------------------------------ samples
@dataclass
class RawSample:
    """One sample's members as bytes, by extension (``{"png": b"...", "cls": b"3"}``)."""

    key: str
    members: dict[str, bytes]


def iter_shard(url: str, storage_options: dict[str, Any] | None = None, *, keep: Any = None) -> Iterator[RawSample | None]:
    """The samples of one shard in tar order. ``keep(i)`` says whether the ``i``-th sample is wanted: an
    unwanted one is skipped without keeping its bytes and yielded as None (so positions stay countable).

    Raises:
        UserError: The shard cannot be read, is truncated, or a member is over `MAX_MEMBER_BYTES`.
    """
    fs, path = open_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=_read_mode(f)) as tar:
            yield from _group_members(tar, url, keep)
    except UserError:
        raise
    except FileNotFoundError as err:
        raise UserError(f"shard '{url}' does not exist ({describe_error(err)}): check data.train_urls / "
                        "data.val_urls") from None
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f"shard '{url}' is not a complete tar file ({describe_error(err)}): it is truncated or "
                        "damaged; write it again") from None
    except Exception as err:  # the storage's own errors (botocore, aiohttp, OSError)
        raise UserError(storage_error(url, err)) from None


def _read_mode(f: Any) -> str:
    """tarfile's mode for ``f``: random access where it can seek (a member is read in one call, an unwanted
    one is seeked past; streaming mode copies every member through a 10 KiB buffer, 3x slower), else a stream."""
    return "r:*" if f.seekable() else "r|*"


def _group_members(tar: tarfile.TarFile, url: str, keep: Any) -> Iterator[RawSample | None]:
    """Consecutive members with one key make a sample (WebDataset's ``group_by_keys``), bounded."""
    current: RawSample | None = None
    index = -1
    wanted = False
    for member in tar:
        if not member.isfile():
            continue
        base = posixpath.basename(member.name)
        if base.startswith(".") or "." not in base:
            continue  # not a sample member (hidden, or no extension): WebDataset skips these too
        key, ext = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0]), base.split(".", 1)[1].lower()
        if current is None or key != current.key:
            if current is not None:
                yield current if wanted else None
            index += 1
            wanted = keep is None or keep(index)
            current = RawSample(key, {})
        if member.size > MAX_MEMBER_BYTES:
            raise UserError(f"shard '{url}': member '{member.name[:200]}' is {member.size} bytes, over the "
                            f"limit of {MAX_MEMBER_BYTES}: refused")
        if wanted:
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError("unexpected end of data")
            current.members[ext] = data
    if current is not None:
        yield current if wanted else None


def image_and_label(sample: RawSample, *, url: str, num_classes: int) -> tuple[bytes, int]:
    """The image bytes and the integer label of a sample; one line naming the sample when either is missing."""
    image = next((sample.members[k] for k in IMAGE_KEYS if k in sample.members), None)
    where = f"shard '{url}', sample '{sample.key[:200]}'"
    if image is None:
        raise UserError(f"{where} has no image (expected a member ending .{', .'.join(IMAGE_KEYS)})")
    label = _label(sample, where)
    if not 0 <= label < num_classes:
        raise UserError(f"{where} has label {label}, outside the {num_classes} classes: check classes.txt / data.classes")
    return image, label


def _label(sample: RawSample, where: str) -> int:
    raw = sample.members.get("cls")
    if raw is not None and len(raw) <= MAX_LABEL_BYTES:
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise UserError(f"{where}: its .cls is not an integer") from None
    raw = sample.members.get("json")
    if raw is not None and len(raw) <= MAX_LABEL_BYTES:
        try:
            value = json.loads(raw).get("label")
        except (ValueError, RecursionError, AttributeError):
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: its .json has no integer \"label\"")
    raise UserError(f"{where} has no label (expected a .cls member, or .json with \"label\", under {MAX_LABEL_BYTES} bytes)")
