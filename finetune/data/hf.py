"""Images and labels from a Hugging Face dataset on disk (``data=hf data.path=...``), read through `datasets`.

``data.path`` is, in this order:

- a directory ``save_to_disk`` wrote (a ``Dataset`` or a ``DatasetDict``): ``datasets.load_from_disk``;
- a Parquet or Arrow file, or a directory of data files: ``datasets.load_dataset`` (``parquet``/``arrow`` for a
  file; a directory as `datasets` reads a local folder, splits from file names such as ``train-*.parquet``);
- otherwise a dataset name (``owner/name``) already in the local Hugging Face cache: ``load_dataset(name)`` with
  `datasets` set offline for the whole process, so a name that is not cached fails at once and nothing is
  downloaded.

Splits: ``train`` trains; val is the first of `VAL_SPLITS` the dataset has; ``test`` (when val is another split)
is kept as the split's test samples. A dataset with one split (a ``Dataset``, a single file) is split by
``data.val_split``, stratified and seeded by ``data.split_seed``, exactly as a class-folder root is
(`finetune.data.folder`); ``data.folds``/``data.fold`` work as for folders.

Classes: a ``ClassLabel`` column gives its names, in its order; a plain integer or string column gives its
sorted distinct values (integers as text, in numeric order). A sample's key is ``SPLIT/ROW`` (``train/17``):
that is what ``split.json`` lists and what an error about an unreadable image names. Images are read as the
encoded bytes the dataset stores (``Image(decode=False)``) and decoded by the project's own `load_transformed`,
so a JPEG is decoded at a reduced size where the transform allows it, as for files.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from finetune.errors import UserError, describe_error

VAL_SPLITS = ("validation", "val", "test")  # the first the dataset has validates
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
MAX_ROWS = 10_000_000  # per split: the labels are read into memory (10M small ints is ~80 MB of Python ints)
HF_EXTRA = "pip install 'finetune[hf]'"
INTEGER_TYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
STRING_TYPES = frozenset({"string", "large_string"})


class HFImages:
    """Reads a sample key (``SPLIT/ROW``) as the image's encoded bytes, for `finetune.data.dataset.ImageDataset`.

    Holds only the image column of each split, with decoding off: `datasets` hands over the stored bytes (or
    the file path the cell names) and the project decodes them as it decodes files. Pickles cheaply into loader
    workers: a dataset on disk is memory-mapped, and pickled by its file names.
    """

    def __init__(self, splits: dict[str, Any], column: str, where: str, files_under: str) -> None:
        from datasets import Image

        self.column, self.files_under = column, os.path.realpath(files_under)
        self.fix = f"fix or drop that row of dataset '{where}'"  # the end of an unreadable image's error
        self.splits = {name: ds.select_columns([column]).cast_column(column, Image(decode=False))
                       for name, ds in splits.items()}

    def open(self, key: str) -> BinaryIO | str:
        """The image of ``key`` as a file object (or the file its cell names), for ``PIL.Image.open``."""
        split, row = key.rsplit("/", 1)
        cell = self.splits[split][int(row)][self.column]
        if cell is None or (cell.get("bytes") is None and not cell.get("path")):
            raise ValueError("the row holds no image")
        return io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else self._file(cell["path"])

    def _file(self, named: str) -> str:
        """A cell naming a file instead of holding bytes: a dataset from others is data, so the file must be a
        regular file inside the dataset's directory tree (links resolved), as a table's paths must."""
        real = os.path.realpath(named)
        if not real.startswith(self.files_under.rstrip(os.sep) + os.sep):
            raise ValueError(f"the row names the file '{named}', outside the dataset's folder '{self.files_under}': "
                             "refused (embed the image bytes, or keep the files under that folder)")
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise ValueError(f"the row names '{named}', which is not a regular file")
        return real


def scan_hf(path: str, *, image_column: str = "image", label_column: str = "label", val_split: float = 0.2,
            seed: int = 0, folds: int | None = None, fold: int | None = None) -> Any:
    """The `finetune.data.DataSplit` of a Hugging Face dataset: samples ``(SPLIT/ROW, class index)`` and an
    `HFImages` that reads them (see the module docstring for what ``path`` may be and how it is split)."""
    from finetune.data.folder import DataSplit
    from finetune.data.splits import check_folds

    check_folds(folds, fold)
    where, splits = load_hf(path)
    train_name, val_name = choose_splits(where, list(splits))
    used = {name: splits[name] for name in (train_name, val_name, "test") if name in splits}
    for name, ds in used.items():
        check_columns(where, name, ds, image_column=image_column, label_column=label_column)
    names, labels = class_labels(where, used, label_column)
    if val_name is None or folds is not None:
        pool = [s for name in (train_name, val_name) if name for s in samples_of(name, labels[name])]
        train, val = _split(pool, names, val_split=val_split, seed=seed, folds=folds, fold=fold)
        layout, test = ("split" if folds is None else "folds"), []
    else:
        train, val = samples_of(train_name, labels[train_name]), samples_of(val_name, labels[val_name])
        test = samples_of("test", labels["test"]) if val_name != "test" and "test" in labels else []
        layout = "column"
    return DataSplit(train, val, names, where, layout, [], float(val_split) if layout == "split" else None, seed,
                     test=test, folds=folds, fold=fold, source=where,
                     images=HFImages(used, image_column, where, files_under(where)))


def files_under(where: str) -> str:
    """Where a cell that names a file (not bytes) may point: the dataset's own directory (its folder, for a data
    file), or the Hugging Face cache for a cached name."""
    local = Path(where)
    if local.is_absolute() and local.exists():
        return str(local if local.is_dir() else local.parent)
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def load_hf(path: str) -> tuple[str, dict[str, Any]]:
    """``(where, {split: Dataset})``: ``where`` is the absolute path on disk, or the dataset's name."""
    datasets = import_datasets()
    local = Path(path).expanduser()
    looks_like_a_path = local.is_absolute() or path.startswith((".", "~")) or local.suffix in DATA_FILE_BUILDERS
    if not local.exists() and looks_like_a_path:
        raise UserError(f"data.path '{path}' does not exist: give the directory save_to_disk wrote, a Parquet or "
                        "Arrow file, or a dataset name in the local Hugging Face cache")
    where = str(local.absolute()) if local.exists() else path
    try:
        loaded = _load(datasets, local) if local.exists() else datasets.load_dataset(path)
    except UserError:
        raise
    except ConnectionError:  # offline: the name is not in the cache (datasets' OfflineModeIsEnabled)
        raise UserError(f"data.path '{path}' is neither a path on disk nor a dataset in the local Hugging Face cache "
                        f"('{datasets.config.HF_DATASETS_CACHE}'; nothing is downloaded): fix the path, or download "
                        "the dataset first (datasets.load_dataset, or save_to_disk it and give that directory)"
                        ) from None
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a file it cannot read: one line
        raise UserError(f"data.path '{path}' cannot be read as a Hugging Face dataset ({describe_error(err)}): give "
                        "the directory save_to_disk wrote, a Parquet or Arrow file, or a cached dataset name") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return where, splits


def import_datasets() -> Any:
    """`datasets`, set offline for this process before anything is loaded: data=hf never downloads."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when datasets is imported
    try:
        import datasets
        import huggingface_hub.constants
    except ImportError:
        raise UserError(f"data=hf needs the datasets library: {HF_EXTRA}") from None
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True  # imported earlier: set it again
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets


def _load(datasets: Any, local: Path) -> Any:
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        return datasets.load_from_disk(str(local))
    if local.is_file():
        builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise UserError(f"data.path '{local}' is a file but not a Parquet or Arrow file "
                            f"({', '.join(DATA_FILE_BUILDERS)}): "
                            "give a data file, a directory save_to_disk wrote, or a cached dataset name")
        return datasets.load_dataset(builder, data_files=str(local))
    return datasets.load_dataset(str(local))


def choose_splits(where: str, names: list[str]) -> tuple[str, str | None]:
    """The train split and the val split (None: one split, to be split by seed)."""
    if len(names) == 1:
        return names[0], None
    if "train" not in names:
        raise UserError(f"dataset '{where}' has the splits {', '.join(names)} but none named 'train': name the "
                        "training split 'train' (and the validation split one of " + ", ".join(VAL_SPLITS) + ")")
    val = next((name for name in VAL_SPLITS if name in names), None)
    if val is None:
        raise UserError(f"dataset '{where}' has the splits {', '.join(names)}, none to validate on: name one of "
                        f"them {' or '.join(VAL_SPLITS)}, or save only 'train' to split it by data.val_split")
    return "train", val


def check_columns(where: str, split: str, ds: Any, *, image_column: str, label_column: str) -> None:
    """The image column holds images and the label column classes; a missing one names the columns there are."""
    from datasets import ClassLabel, Image, Value

    columns = list(ds.features)
    for key, name in (("data.image_column", image_column), ("data.label_column", label_column)):
        if name not in columns:
            raise UserError(f"dataset '{where}' split '{split}' has no column '{name}' (columns: "
                            f"{', '.join(repr(c) for c in columns)}): name yours with {key}=NAME")
    image, label = ds.features[image_column], ds.features[label_column]
    if not isinstance(image, Image):
        raise UserError(f"data.image_column '{image_column}' of dataset '{where}' holds {image!r:.80}, not images (an "
                        "Image feature): name the image column with data.image_column (image paths in a table: "
                        "data=table)")
    if not (isinstance(label, ClassLabel) or isinstance(label, Value) and label.dtype in INTEGER_TYPES | STRING_TYPES):
        raise UserError(f"data.label_column '{label_column}' of dataset '{where}' holds {label!r:.80}, not classes: "
                        "give a ClassLabel, integer or string column with data.label_column")
    if ds.num_rows > MAX_ROWS:
        raise UserError(f"dataset '{where}' split '{split}' has {ds.num_rows} rows, over the limit of {MAX_ROWS}: "
                        "refused (train on a part of it)")


def class_labels(where: str, splits: dict[str, Any], column: str) -> tuple[list[str], dict[str, list[int]]]:
    """Class names, and each split's class index per row (see the module docstring for where names come from)."""
    from datasets import ClassLabel

    raw = {name: ds.with_format("arrow")[column].to_pylist() for name, ds in splits.items()}
    first = next(iter(splits.values())).features[column]
    if isinstance(first, ClassLabel):
        names = _class_label_names(where, splits, column)
        index = {i: i for i in range(len(names))}
    else:
        values = {v for rows in raw.values() for v in rows if v is not None}
        if len({type(v) for v in values}) > 1:
            raise UserError(f"dataset '{where}': the {column} column holds integers in one split and text in another: "
                            "give every split the same label type")
        ordered = sorted(values)  # integers in numeric order, or text
        names, index = [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}
    labels = {name: [index.get(v) for v in rows] for name, rows in raw.items()}
    for split, rows in labels.items():
        missing = next((row for row, label in enumerate(rows) if label is None), None)
        if missing is not None:
            raise UserError(f"dataset '{where}' split '{split}' row {missing}: {column} {raw[split][missing]!r} is "
                            "not a class (a row without a label): drop unlabelled rows before training")
    if len(names) < 2:
        raise UserError(f"dataset '{where}' has {len(names)} class(es) in '{column}': a classifier needs at least 2; "
                        "check data.label_column")
    return names, labels  # type: ignore[return-value]  # None was refused above


def _class_label_names(where: str, splits: dict[str, Any], column: str) -> list[str]:
    """The ``ClassLabel`` names, the same in every split."""
    from datasets import ClassLabel

    features = {name: ds.features[column] for name, ds in splits.items()}
    names = list(next(iter(features.values())).names)
    differing = [s for s, f in features.items() if not isinstance(f, ClassLabel) or list(f.names) != names]
    if differing:
        raise UserError(f"dataset '{where}': the {column} classes of split '{differing[0]}' differ from those of "
                        f"'{next(iter(features))}': give every split the same ClassLabel")
    return names


def samples_of(split: str, labels: list[int]) -> list[tuple[str, int]]:
    return [(f"{split}/{row}", label) for row, label in enumerate(labels)]


def _split(pool: list[tuple[str, int]], names: list[str], *, val_split: float, seed: int, folds: int | None,
           fold: int | None) -> tuple[list, list]:
    """Train and val of one pool of samples: the class-folder split (by ``val_split``, or fold ``fold``)."""
    from finetune.data.folder import _check_val_split, _split_stratified, split_by_fold

    by_class: dict[str, list[str]] = {name: [] for name in names}
    for key, label in pool:
        by_class[names[label]].append(key)
    if folds is not None:
        return split_by_fold(by_class, names, folds=folds, fold=fold, seed=seed)
    _check_val_split(val_split)
    return _split_stratified(by_class, names, val_split, seed,
                             remedy=f"give the dataset a {' or '.join(repr(v) for v in VAL_SPLITS)} split")
