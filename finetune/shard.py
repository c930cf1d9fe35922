"""``python -m finetune.shard SRC OUT --shard-size 256MB``: WebDataset shards from a class folder.

SRC is an image folder as ``data=custom`` reads it (``SRC/<class>/<image>``, split by ``--val-split``, or
``SRC/train/...`` and ``SRC/val/...``). OUT (a local folder, created) receives::

    train-000000.tar ...   samples in a seeded random order (classes mixed in every shard)
    val-000000.tar ...     samples in folder order
    classes.txt            one class name a line, index = line
    index.json             the count index: samples and bytes of every shard (finetune.data.shards)

Each sample is ``KEY.<ext>`` (the image file's own bytes: jpg, jpeg, png, webp; other formats are
re-encoded as png) and ``KEY.cls`` (the label as an integer). Train with::

    python -m finetune data=webdataset data.train_urls='OUT/train-{000000..000007}.tar' \\
        data.val_urls='OUT/val-{000000..000001}.tar'

(the command with the right ranges is printed at the end). Every shard is written to a temporary file
and renamed into place when complete, and the index last: a folder with an index is a complete set.
Shards are reproducible: the same folder, seed and size give byte-identical tar files (members carry
no time stamps or owners), which is why they are written with ``tarfile`` here and not webdataset's
``TarWriter`` (it stamps the current time).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from finetune.cli import status_of
from finetune.data.shards import CLASSES_NAME, INDEX_FORMAT, INDEX_NAME
from finetune.errors import UserError
from finetune.files import atomic_write_stream, atomic_write_text

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
KEPT_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
TAR_BLOCK = 512


def parse_size(text: str) -> int:
    """``256MB`` -> 256000000 (KB/MB/GB decimal, KiB/MiB/GiB binary, plain bytes).

    >>> parse_size("256MB"), parse_size("1GiB"), parse_size("4096")
    (256000000, 1073741824, 4096)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) * UNITS[unit] < 1:
        raise UserError(f"--shard-size '{text}' is not a size: write e.g. 256MB, 1GiB or 4096")
    return int(float(match.group(1)) * UNITS[unit])


def sample_members(path: str, label: int, key: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample: the image (its own bytes, or re-encoded as png) and its ``.cls``."""
    ext = KEPT_EXTENSIONS.get(Path(path).suffix.lower())
    if ext is not None:
        image = Path(path).read_bytes()
    else:
        from finetune.data.dataset import load_image, naming_the_file

        with naming_the_file(path):
            picture = load_image(path, 4 if Path(path).suffix.lower() in (".gif", ".tif", ".tiff") else 3)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        image, ext = buffer.getvalue(), "png"
    return [(f"{key}.{ext}", image), (f"{key}.cls", str(label).encode())]


def tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """What ``members`` add to a tar file: a header block each, data padded to blocks."""
    return sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for _, data in members)


def group_into_shards(samples: list[tuple[str, int]], *, prefix: str, max_bytes: int,
                      max_count: int | None) -> Iterator[list[list[tuple[str, bytes]]]]:
    """Samples' members, grouped so that each shard stays under ``max_bytes`` (one sample at least)."""
    shard: list[list[tuple[str, bytes]]] = []
    size = 0
    for position, (path, label) in enumerate(samples):
        members = sample_members(path, label, f"{prefix}{position:08d}")
        if shard and (size + tar_bytes(members) > max_bytes or (max_count and len(shard) >= max_count)):
            yield shard
            shard, size = [], 0
        shard.append(members)
        size += tar_bytes(members)
    if shard:
        yield shard


def write_tar(stream: io.RawIOBase, samples: list[list[tuple[str, bytes]]]) -> None:
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def write_split(out: Path, split: str, samples: list[tuple[str, int]], *, max_bytes: int,
                max_count: int | None, num_classes: int) -> dict[str, dict]:
    """The shards of one split, each renamed into place once complete; their index entries."""
    entries = {}
    for number, shard in enumerate(group_into_shards(samples, prefix=f"{split}-", max_bytes=max_bytes,
                                                     max_count=max_count)):
        name = f"{split}-{number:06d}.tar"
        facts = atomic_write_stream(out / name, lambda stream, shard=shard: write_tar(stream, shard), root=out)
        labels = [int(members[-1][1]) for members in shard]
        entries[name] = {"samples": len(shard), "bytes": facts.bytes,
                         "classes": [labels.count(c) for c in range(num_classes)]}
    return entries


def write_shards(src: str, out: str, *, shard_size: str = "256MB", max_count: int | None = None,
                 val_split: float = 0.2, seed: int = 0) -> dict:
    """Write the shards of ``src`` into ``out``; returns the index (also written as ``out/index.json``)."""
    from finetune.data.folder import scan_image_folder

    max_bytes = parse_size(shard_size)
    if max_count is not None and max_count < 1:
        raise UserError(f"--max-count '{max_count}' must be a positive number of samples")
    target = Path(out).expanduser().absolute()
    if "://" in out:
        raise UserError(f"OUT '{out}' is a URL: this version writes shards to a local folder; upload it after "
                        "(e.g. aws s3 sync)")
    if (target / INDEX_NAME).exists() or (target.is_dir() and any(target.glob("*.tar"))):
        raise UserError(f"OUT '{out}' already holds shards: choose an empty or new folder")
    data = scan_image_folder(src, val_split=val_split, seed=seed)
    target.mkdir(parents=True, exist_ok=True)
    train = list(data.train)
    random.Random(seed).shuffle(train)  # classes mixed in every shard: the sample buffer then needs no depth
    shards = write_split(target, "train", train, max_bytes=max_bytes, max_count=max_count,
                         num_classes=data.num_classes)
    shards |= write_split(target, "val", list(data.val), max_bytes=max_bytes, max_count=max_count,
                          num_classes=data.num_classes)
    atomic_write_text(target / CLASSES_NAME, "".join(f"{name}\n" for name in data.class_names), root=target)
    index = {"format": INDEX_FORMAT, "classes": list(data.class_names), "shards": shards}
    atomic_write_text(target / INDEX_NAME, json.dumps(index, indent=1) + "\n", root=target)
    return index


def urls_of(out: str, index: dict, split: str) -> str:
    """The brace pattern of a split's shards: ``OUT/train-{000000..000007}.tar``."""
    count = sum(1 for name in index["shards"] if name.startswith(f"{split}-"))
    last = f"{count - 1:06d}"
    return f"{out.rstrip('/')}/{split}-{{000000..{last}}}.tar" if count > 1 else f"{out.rstrip('/')}/{split}-000000.tar"


def report(out: str, index: dict) -> None:
    from finetune.cli import command, override

    shards = index["shards"]
    for split in ("train", "val"):
        names = [n for n in shards if n.startswith(f"{split}-")]
        print(f"{split}: {sum(shards[n]['samples'] for n in names)} samples in {len(names)} shards, "
              f"{sum(shards[n]['bytes'] for n in names)} bytes")
    target = str(Path(out).expanduser().absolute())
    print("train with:\n  " + command("finetune", "data=webdataset",
                                       override("data.train_urls", urls_of(target, index, "train")),
                                       override("data.val_urls", urls_of(target, index, "val"))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.shard", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="image folder: SRC/<class>/<image> or SRC/{train,val}/<class>/<image>")
    parser.add_argument("out", help="folder to write the shards into (new or empty)")
    parser.add_argument("--shard-size", default="256MB", help="largest shard: 256MB, 1GiB, ... (default 256MB)")
    parser.add_argument("--max-count", type=int, default=None, help="at most this many samples a shard")
    parser.add_argument("--val-split", type=float, default=0.2, help="held out when SRC has no train/ and val/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the train samples' order")
    args = parser.parse_args(argv)

    def task() -> None:
        report(args.out, write_shards(args.src, args.out, shard_size=args.shard_size, max_count=args.max_count,
                                      val_split=args.val_split, seed=args.seed))

    return status_of(task)


if __name__ == "__main__":
    sys.exit(main())
