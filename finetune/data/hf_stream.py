"""``data=hf data.streaming=true``: a Hugging Face dataset's Parquet files read as they stream (a local folder
or any fsspec URL, ``s3://...``), with the exact epochs and resume of WebDataset shards.

Why not `datasets`' own streaming (``load_dataset(..., streaming=True)``): its iterable dataset shuffles with
a buffer whose content its ``state_dict`` does not keep, so a run resumed mid-epoch refills the buffer and
sees another order than an uninterrupted run ("Loading a state dict of a shuffle buffer of a dataset
without the buffer content", huggingface/datasets#7444). Here each Parquet file is a shard of
`finetune.data.stream`: its row count comes from the file's footer (never guessed), and the epoch's
order, the split over processes and workers, the resume skip and the evaluation are the shards' own.

What `datasets` still decides:

- which file is which split (``datasets.data_files.get_data_patterns``, as ``load_dataset`` reads a
  folder: ``train-*.parquet``, ``data/train-00000-of-00004.parquet`` as the Hub lays them out,
  ``train/*.parquet``). ``train`` trains, the first of `finetune.data.hf.VAL_SPLITS` validates. A stream
  is not split by seed: a dataset without a validation split is refused in one line;
- the features: the ``huggingface`` key of the Parquet schema's metadata, which ``Dataset.to_parquet``
  and the Hub write. A ``ClassLabel`` column gives the class names; a plain integer or string column gives
  its sorted distinct values (as `finetune.data.hf` does on disk).

The label column of every file is read once before training (that column alone): it checks every label
and counts the classes. Images must be stored in the files (the ``bytes`` of the ``Image`` struct): a cell
that names a file elsewhere is refused when it is read. The files are data from others: a row group
larger than `MAX_ROW_GROUP_BYTES` is refused before it is read, and a split of more than
`finetune.data.hf.MAX_ROWS` rows too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from finetune.data.shards import Shard, open_fs, storage_error
from finetune.errors import UserError, describe_error

MAX_ROW_GROUP_BYTES = 1 << 30  # one row group is read whole (images included): 1 GiB at most
MAX_FILES = 100_000  # data files in the dataset's folder
BATCH_ROWS = 64  # rows decoded from Parquet at a time


def scan_hf_stream(path: str, *, image_column: str, label_column: str,
                   storage_options: dict[str, Any] | None = None) -> Any:
    """The `finetune.data.stream.ShardSplit` of the Parquet files at ``path`` (train and val), with a
    `ParquetRows` that reads their rows."""
    from finetune.data.hf import VAL_SPLITS, choose_splits, import_datasets
    from finetune.data.stream import ShardSplit

    import_datasets()
    files = split_files(path, storage_options)
    train_name, val_name = choose_splits(path, list(files))
    if val_name is None:
        raise UserError(f"data.path '{path}' has one split ('{train_name}'): data.streaming=true reads the splits as "
                        f"they are stored (a stream is not split by seed); add a {' or '.join(map(repr, VAL_SPLITS))} "
                        "split (validation-*.parquet), or leave data.streaming=false for a dataset on disk")
    facts = {split: [parquet_facts(url, storage_options, image_column=image_column, label_column=label_column)
                     for url in files[split]] for split in (train_name, val_name)}
    names, index = class_names(path, [f for split in facts.values() for f in split], label_column)
    shards = {split: [Shard(f.url, f.rows, tuple(f.counts(index, len(names)))) for f in facts[split]]
              for split in facts}
    rows = ParquetRows(image_column, label_column, index, storage_options)
    return ShardSplit(shards[train_name], shards[val_name], names, root=path, layout="hf-stream", rows=rows)


def split_files(path: str, storage_options: dict[str, Any] | None) -> dict[str, list[str]]:
    """``{split: [file URL, ...]}`` of the Parquet files at ``path``, by `datasets`' own naming rules."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
    from datasets.download import DownloadConfig

    fs, root = open_fs(path, storage_options)
    protocol = path.split("://", 1)[0] if "://" in path else None
    config = DownloadConfig(storage_options={protocol: fs.storage_options} if protocol else {})
    try:
        if not fs.isdir(root):
            what = "is not a folder of Parquet files" if fs.exists(root) else "does not exist"
            raise UserError(f"data.path '{path}' {what}: data.streaming=true reads a folder of a dataset's data "
                            "files (train-*.parquet and validation-*.parquet); check the URL")
        if any(fs.exists(f"{root}/{name}") for name in ("dataset_dict.json", "state.json")):
            raise UserError(f"data.path '{path}' is a dataset save_to_disk wrote (Arrow files), not Parquet files: "
                            "read it from disk with data.streaming=false, or write it with to_parquet to stream it")
        patterns = get_data_patterns(path, download_config=config)
        found = DataFilesDict.from_patterns(patterns, base_path=path, allowed_extensions=[".parquet"],
                                            download_config=config)
    except UserError:
        raise
    except EmptyDatasetError:
        found = {}
    except Exception as err:  # noqa: BLE001 - the storage's own errors (botocore, aiohttp) and fsspec's
        raise UserError(storage_error(path, err)) from None
    files = {split: [_url(path, f) for f in urls] for split, urls in found.items() if urls}
    if not files:
        raise UserError(f"data.path '{path}' holds no Parquet data files: data.streaming=true reads train-*.parquet "
                        "and validation-*.parquet (as Dataset.to_parquet and the Hub write them)")
    if sum(map(len, files.values())) > MAX_FILES:
        raise UserError(f"data.path '{path}' holds more than {MAX_FILES} data files: refused (merge them)")
    return files


def _url(path: str, resolved: str) -> str:
    """A file `datasets` resolved, as a URL of the same storage as ``path`` (it drops nothing but may add the
    protocol or make a local path absolute)."""
    if "://" not in path or "://" in resolved:
        return resolved
    return f"{path.split('://', 1)[0]}://{resolved.lstrip('/')}"


class ParquetFacts:
    """What one file's footer and label column say: rows, features, labels."""

    def __init__(self, url: str, rows: int, features: dict[str, Any], labels: list[Any]):
        self.url, self.rows, self.features, self.labels = url, rows, features, labels

    def counts(self, index: dict[Any, int], classes: int) -> list[int]:
        counts = [0] * classes
        for value in self.labels:
            counts[index[value]] += 1
        return counts


def parquet_facts(url: str, storage_options: dict[str, Any] | None, *, image_column: str,
                  label_column: str) -> ParquetFacts:
    """The footer of ``url`` checked (columns, row group sizes) and its label column read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = open_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema, meta = parquet.schema_arrow, parquet.metadata
            missing = [c for c in (image_column, label_column) if c not in schema.names]
            if missing:
                key = "data.image_column" if missing[0] == image_column else "data.label_column"
                raise UserError(f"'{url}' has no column '{missing[0]}' (columns: {', '.join(map(repr, schema.names))}): "
                                f"name yours with {key}=NAME")
            image = schema.field(image_column).type
            if not (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0):
                raise UserError(f"data.image_column '{image_column}' of '{url}' holds {image}, not images (the "
                                "struct of bytes and path the Image feature stores): name the image column with "
                                "data.image_column")
            check_row_groups(url, meta)
            labels = parquet.read(columns=[label_column]).column(0).to_pylist()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"'{url}' does not exist (listed a moment ago): the dataset is being written") from None
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"'{url}' is not a readable Parquet file ({describe_error(err)}): write it again") from None
    except Exception as err:  # noqa: BLE001 - the storage's own errors
        raise UserError(storage_error(url, err)) from None
    return ParquetFacts(url, meta.num_rows, _features(schema), labels)


def check_row_groups(url: str, meta: Any) -> None:
    for group in range(meta.num_row_groups):
        size = meta.row_group(group).total_byte_size
        if size > MAX_ROW_GROUP_BYTES:
            raise UserError(f"'{url}' row group {group} holds {size} bytes, over the {MAX_ROW_GROUP_BYTES} read at "
                            "once: refused (write it with smaller row groups)")


def _features(schema: Any) -> dict[str, Any]:
    """The `datasets` features the file records (``{}`` when it records none, or a record that is not JSON)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError, RecursionError):
        return {}
    return features if isinstance(features, dict) else {}


def class_names(path: str, files: list[ParquetFacts], column: str) -> tuple[list[str], dict[Any, int]]:
    """The class names and ``label value -> class index``: a ``ClassLabel``'s names (the same in every file), or
    the sorted distinct values of the column. Every label of every file is checked here."""
    from finetune.data.hf import MAX_ROWS

    declared = [f.features.get(column) for f in files]
    if isinstance(declared[0], dict) and declared[0].get("_type") == "ClassLabel":
        names = [str(n) for n in declared[0].get("names") or []]
        differing = next((f.url for f, d in zip(files, declared, strict=True)
                          if not isinstance(d, dict) or [str(n) for n in d.get("names") or []] != names), None)
        if differing:
            raise UserError(f"'{differing}': the {column} classes differ from those of '{files[0].url}': give every "
                            "file the same ClassLabel")
        index: dict[Any, int] = {i: i for i in range(len(names))}
    else:
        values = {v for f in files for v in f.labels if v is not None}
        if len({type(v) for v in values}) > 1:
            raise UserError(f"dataset '{path}': the {column} column holds integers in one file and text in another: "
                            "give every file the same label type")
        ordered = sorted(values)  # integers in numeric order, or text
        names, index = [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}
    for f in files:
        if f.rows > MAX_ROWS:
            raise UserError(f"'{f.url}' has {f.rows} rows, over the limit of {MAX_ROWS}: refused")
        bad = next((row for row, value in enumerate(f.labels) if value not in index), None)
        if bad is not None:
            raise UserError(f"'{f.url}' row {bad}: {column} {f.labels[bad]!r} is not a class (a row without a label, "
                            f"or out of the {len(names)} ClassLabel names): drop it before training")
    if len(names) < 2:
        raise UserError(f"dataset '{path}' has {len(names)} class(es) in '{column}': a classifier needs at least 2; "
                        "check data.label_column")
    return names, index


class ParquetRows:
    """The rows of one Parquet file, for `finetune.data.stream.ShardReader`: for each row, None when ``keep``
    refuses its position (not decoded), else ``(image bytes, class index, name)``. Pickles into loader workers."""

    def __init__(self, image_column: str, label_column: str, index: dict[Any, int],
                 storage_options: dict[str, Any] | None):
        self.columns, self.index, self.storage_options = [image_column, label_column], index, storage_options

    def __call__(self, shard: Shard, keep: Callable[[int], bool]) -> Iterator[tuple[bytes, int, str] | None]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = open_fs(shard.url, self.storage_options)
        row = 0
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                check_row_groups(shard.url, parquet.metadata)
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=self.columns):
                    images, labels = batch.column(0).field("bytes"), batch.column(1).to_pylist()
                    for j, label in enumerate(labels):
                        yield self._row(shard, row, images[j].as_py(), label) if keep(row) else None
                        row += 1
        except UserError:
            raise
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"'{shard.url}' cannot be read after row {row} ({describe_error(err)}): write it again"
                            ) from None
        except Exception as err:  # noqa: BLE001 - the storage's own errors
            raise UserError(storage_error(shard.url, err)) from None

    def _row(self, shard: Shard, row: int, image: bytes | None, label: Any) -> tuple[bytes, int, str]:
        name = f"{shard.url}:row {row}"
        if image is None:
            raise UserError(f"'{name}' holds no image bytes, only a file name (a stream cannot read files beside "
                            "it): write the files with the images in them (push_to_hub does; for Dataset.to_parquet, "
                            "give the Image column bytes)")
        if label not in self.index:
            raise UserError(f"'{name}': label {label!r} is not a class: the file changed since the run started")
        return image, self.index[label], name


__all__ = ["ParquetRows", "scan_hf_stream", "split_files"]
