"""Labels from a table (``data=table data.file=labels.csv``): CSV, TSV, JSONL or Parquet, chosen by extension.

A table is often someone else's file, so it is read as data with bounds: at most `MAX_TABLE_BYTES` on
disk and `MAX_ROWS` rows (Parquet: its own row count and uncompressed size, checked from the footer
before a row is read), one CSV cell at most ``csv.field_size_limit()`` (128 KiB). An image path is
relative to the table's folder, or absolute; either way it must stay inside that folder's tree, links
resolved, unless ``data.allow_outside=true``. Nothing is ever written beside the table.

Every problem is one line naming the file, the row and the fix. Rows are numbered as an editor or a
spreadsheet shows them: the line in a CSV, TSV or JSONL file (the header is line 1), the 1-based row
in a Parquet file.

Columns: ``path``; ``label`` (one class, ``task=multiclass``) or ``labels`` (several, ``task=multilabel``:
joined by ``data.label_sep``, or a JSON/Parquet list); optional ``split`` (``train``, ``val``, ``test``).
Other names: ``data.columns.path``, ``data.columns.label``, ``data.columns.split``.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as d:
...     _ = pathlib.Path(d, "t.csv").write_text(  # safe-write: a temporary dir
...         "path,labels\\na.png,cat;dog\\nb.png,\\n")
...     rows = read_table(pathlib.Path(d, "t.csv"), columns=TableColumns(label="labels"), multilabel=True)
>>> [(r.line, r.path, r.labels) for r in rows.rows]
[(2, 'a.png', ('cat', 'dog')), (3, 'b.png', ())]
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError, describe_error

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
MAX_TABLE_BYTES = 1 << 30  # 1 GiB: ten million rows of short paths and labels fit with room to spare
MAX_ROWS = 10_000_000
MAX_PARQUET_BYTES = 4 << 30  # uncompressed, from the footer: what reading the needed columns may allocate
SPLITS = ("train", "val", "test")
PARQUET_EXTRA = "pip install 'finetune[table]'"


@dataclass(frozen=True)
class TableColumns:
    """Column names; ``label`` None: ``label`` (multiclass) or ``labels`` (multilabel); ``split`` None: a
    column named ``split`` when the table has one (a name given must exist)."""

    path: str = "path"
    label: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class TableRow:
    line: int  # the row as an editor shows it (see the module docstring)
    path: str  # as written in the table
    labels: tuple[str, ...]  # one for multiclass; any number (none too) for multilabel
    split: str | None  # train | val | test, or None without a split column


@dataclass
class Table:
    """A table's rows, checked cell by cell, and which columns it had."""

    file: Path
    rows: list[TableRow]
    has_split: bool
    unit: str  # "line" (text formats) or "row" (Parquet): how rows are named in messages

    def where(self, row: TableRow) -> str:
        return f"'{self.file}' {self.unit} {row.line}"


def read_table(file: str | Path, *, columns: TableColumns = TableColumns(), multilabel: bool = False,
               label_sep: str = ";") -> Table:
    """The rows of ``file``; a missing column, a row whose cell has the wrong type, an empty label
    (multiclass) or a split that is not train/val/test is one `UserError` naming the file and the row."""
    path = Path(file).expanduser()
    fmt = _format_of(path)
    label = columns.label or ("labels" if multilabel else "label")
    wanted = {"path": columns.path, "label": label, "split": columns.split or "split"}
    reader = {"csv": _csv_records, "tsv": _csv_records, "jsonl": _jsonl_records, "parquet": _parquet_records}[fmt]
    records, header = reader(path, fmt, list(wanted.values()))
    _check_columns(path, header, wanted, explicit_split=columns.split is not None, multilabel=multilabel)
    has_split = wanted["split"] in header
    unit = "row" if fmt == "parquet" else "line"
    rows = [_row(path, unit, line, record, wanted, has_split=has_split, multilabel=multilabel, sep=label_sep)
            for line, record in records]
    if not rows:
        raise UserError(f"table '{path}' has no rows: add one row per image ({columns.path},{label})")
    return Table(path, rows, has_split, unit)


def _format_of(path: Path) -> str:
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"data.file '{path}' is not a table finetune reads: its extension must be one of "
                        f"{', '.join(TABLE_FORMATS)} (the format is chosen by extension)")
    try:
        info = os.stat(path)
    except OSError as err:
        raise UserError(f"data.file '{path}' cannot be read ({err.strerror or err}): give the path of your label "
                        "table") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"data.file '{path}' is not a regular file: give the path of your label table")
    if fmt != "parquet" and info.st_size > MAX_TABLE_BYTES:
        raise UserError(f"table '{path}' is larger than {MAX_TABLE_BYTES} bytes: refused (split it, or use Parquet)")
    return fmt


Records = Iterator[tuple[int, dict[str, Any]]]


def _csv_records(path: Path, fmt: str, wanted: list[str]) -> tuple[Records, list[str]]:
    with open(path, "rb") as f:
        text = f.read(MAX_TABLE_BYTES + 1).decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as err:
        raise UserError(f"'{path}' line 1 (the header) is not {fmt.upper()} ({err}): fix the header row") from None
    return _csv_rows(path, reader, header), header


def _csv_rows(path: Path, reader: Any, header: list[str]) -> Records:
    count = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # a cell over csv.field_size_limit(), a NUL byte, ...
            raise UserError(f"'{path}' line {reader.line_num}: {err}: fix that row") from None
        if not any(c.strip() for c in cells):
            continue  # a blank line
        count = _count(path, count)
        if len(cells) != len(header):
            raise UserError(f"'{path}' line {reader.line_num} has {len(cells)} cells where the header has "
                            f"{len(header)}: quote cells that hold the delimiter, or fix the row")
        yield reader.line_num, dict(zip(header, cells))


def _jsonl_records(path: Path, fmt: str, wanted: list[str]) -> tuple[Records, list[str]]:
    with open(path, "rb") as f:
        lines = f.read(MAX_TABLE_BYTES + 1).decode("utf-8-sig", errors="replace").splitlines()
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        _count(path, len(records))
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise UserError(f"'{path}' line {number} is not a JSON object ({describe_error(err, limit=80)}): "
                            "write one object per line, e.g. {\"path\": \"a.jpg\", \"labels\": [\"cat\"]}") from None
        if not isinstance(record, dict):
            raise UserError(f"'{path}' line {number} is not a JSON object: write one object per line")
        records.append((number, record))
    header = list(dict.fromkeys(k for _, r in records for k in r)) if records else []
    return iter(records), header


def _parquet_records(path: Path, fmt: str, wanted: list[str]) -> tuple[Records, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"data.file '{path}' is a Parquet table, which needs pyarrow: {PARQUET_EXTRA}") from None
    try:
        meta = pq.ParquetFile(path).metadata
        header = list(meta.schema.names)
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows > MAX_ROWS or size > MAX_PARQUET_BYTES:
            raise UserError(f"table '{path}' has {meta.num_rows} rows ({size} bytes uncompressed), over the limit of "
                            f"{MAX_ROWS} rows and {MAX_PARQUET_BYTES} bytes: refused (split the table)")
        table = pq.read_table(path, columns=[c for c in wanted if c in header])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow's many error types: one line
        raise UserError(f"data.file '{path}' cannot be read as Parquet ({describe_error(err)}): it is damaged or "
                        "not a Parquet file") from None
    return ((i + 1, record) for i, record in enumerate(table.to_pylist())), header


def _count(path: Path, count: int) -> int:
    if count >= MAX_ROWS:
        raise UserError(f"table '{path}' has more than {MAX_ROWS} rows: refused (split the table)")
    return count + 1


def _check_columns(path: Path, header: list[str], wanted: dict[str, str], *, explicit_split: bool,
                   multilabel: bool) -> None:
    keys = [("path", "data.columns.path"), ("label", "data.columns.label")]
    if explicit_split:
        keys.append(("split", "data.columns.split"))
    for role, key in keys:
        name = wanted[role]
        if name in header:
            continue
        hint = f"name yours with {key}=NAME"
        other = "label" if multilabel else "labels"
        if role == "label" and other in header:
            hint = (f"the table has '{other}': for one class per image use task=multiclass (column 'label'), for "
                    "several task=multilabel (column 'labels'), or set data.columns.label" if not multilabel else
                    f"the table has '{other}': set data.columns.label={other}")
        shown = ", ".join(f"'{h}'" for h in header[:12]) or "none"
        raise UserError(f"'{path}' line 1 (the header) has no column '{name}' (columns: {shown}): {hint}")


def _row(path: Path, unit: str, line: int, record: dict[str, Any], wanted: dict[str, str], *, has_split: bool,
         multilabel: bool, sep: str) -> TableRow:
    where = f"'{path}' {unit} {line}"
    image = record.get(wanted["path"])
    if not isinstance(image, str) or not image.strip():
        raise UserError(f"{where}: the {wanted['path']} cell is {_shown(image)}, not a file name: give the image's "
                        "path (relative to the table's folder) or drop the row")
    labels = _labels(record.get(wanted["label"]), where=where, column=wanted["label"], multilabel=multilabel, sep=sep)
    split = None
    if has_split:
        value = record.get(wanted["split"])
        split = value.strip().lower() if isinstance(value, str) else value
        if split not in SPLITS:
            raise UserError(f"{where}: split {_shown(value)} is not one of {', '.join(SPLITS)}: fix the cell (or "
                            "remove the split column to split by data.val_split)")
    return TableRow(line, image.strip(), labels, split)


def _labels(value: Any, *, where: str, column: str, multilabel: bool, sep: str) -> tuple[str, ...]:
    if isinstance(value, int) and not isinstance(value, bool):  # a class id in JSON or Parquet
        value = str(value)
    if value is None:
        value = ""
    if multilabel and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        parts = list(value)
    elif isinstance(value, str):
        parts = value.split(sep) if multilabel and sep else [value]
    else:
        raise UserError(f"{where}: {column} {_shown(value)} is not {'a list of class names' if multilabel else 'a class name'}: "
                        "write class names as text")
    labels = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not multilabel and not labels:
        raise UserError(f"{where}: the {column} cell is empty: give every image its class or drop the row (an "
                        "image without a positive class needs task=multilabel, where an empty label set is allowed)")
    return labels


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else repr(value)
    return repr(text if len(text) <= 60 else f"{text[:60]}...")


# ------------------------------------------------------------ the table as a data split
MAX_LISTED = 5


def scan_table(file: str | Path, *, columns: TableColumns = TableColumns(), multilabel: bool = False,
               label_sep: str = ";", classes: Any = None, allow_outside: bool = False, val_split: float = 0.2,
               seed: int = 0, folds: int | None = None, fold: int | None = None, skip_bad_images: bool = False,
               check_images: bool = True) -> Any:
    """The `finetune.data.DataSplit` a label table describes.

    Paths are checked (inside the table's folder unless ``allow_outside``; the image exists; a path named
    twice has one label set and one split), class names come from ``classes`` (a list, or a text file with
    one per line) or are the sorted distinct labels, and the images are split: by the table's split column,
    by fold ``fold`` of ``folds`` (over the train and val rows; test rows stay test), or seeded and
    stratified by ``val_split`` (multiclass: today's per-class split of class folders; multi-label:
    iterative stratification). Missing and unreadable images are refused, or with ``skip_bad_images`` left
    out and listed.
    """
    from finetune.data.folder import DataSplit, check_images_readable
    from finetune.data.splits import check_folds

    check_folds(folds, fold)
    table = read_table(file, columns=columns, multilabel=multilabel, label_sep=label_sep)
    root = table.file.absolute().parent
    rows, skipped = _existing(table, _resolved(table, root, allow_outside=allow_outside), skip=skip_bad_images)
    names = _class_names(table, rows, classes, multilabel=multilabel)
    if check_images:
        bad = check_images_readable([p for p, _ in rows], root, skip=skip_bad_images, where=f"table '{table.file}'")
        rows, skipped = [(p, r) for p, r in rows if p not in bad], sorted(skipped + list(bad))
    index = {name: i for i, name in enumerate(names)}
    samples = {path: (tuple(sorted(index[c] for c in row.labels)) if multilabel else index[row.labels[0]], row.split)
               for path, row in rows}
    train, val, test, layout = _split(table, samples, names, multilabel=multilabel, val_split=val_split, seed=seed,
                                      folds=folds, fold=fold)
    _check_not_empty(table, train, val, names, multilabel=multilabel)
    return DataSplit(train, val, names, str(root), layout, skipped, val_split if layout == "split" else None, seed,
                     multilabel=multilabel, test=test, folds=folds, fold=fold, source=str(table.file.absolute()))


def _resolved(table: Table, root: Path, *, allow_outside: bool) -> list[tuple[str, TableRow]]:
    """``(normalised absolute path, row)`` per row; a path out of the table's folder tree (links resolved) is
    refused unless ``allow_outside``."""
    base = os.path.realpath(root)
    out = []
    for row in table.rows:
        path = os.path.normpath(row.path if os.path.isabs(row.path) else os.path.join(root, row.path))
        real = os.path.realpath(path)
        if not allow_outside and real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
            raise UserError(f"{table.where(row)}: path '{row.path}' leads outside the table's folder '{root}' (to "
                            f"'{real}'), and data.allow_outside=false: move the image under that folder, or set "
                            "data.allow_outside=true if you trust the table")
        out.append((path, row))
    return _deduplicated(table, out)


def _deduplicated(table: Table, rows: list[tuple[str, TableRow]]) -> list[tuple[str, TableRow]]:
    first: dict[str, TableRow] = {}
    repeated = 0
    for path, row in rows:
        seen = first.setdefault(path, row)
        if seen is row:
            continue
        if set(seen.labels) != set(row.labels) or seen.split != row.split:
            what = "labels" if set(seen.labels) != set(row.labels) else "splits"
            raise UserError(f"{table.where(row)}: '{row.path}' is named again with different {what} (first at "
                            f"{table.unit} {seen.line}: {_labels_shown(seen)}, here: {_labels_shown(row)}): keep one "
                            "row per image (several classes of one image: task=multilabel with a labels column)")
        repeated += 1
    if repeated:
        import warnings

        warnings.warn(f"table '{table.file}': {repeated} rows repeat an image with the same labels; each image is "
                      "used once", stacklevel=4)
    return [(path, row) for path, row in first.items()]


def _labels_shown(row: TableRow) -> str:
    return ";".join(row.labels) + (f" (split {row.split})" if row.split else "") if row.labels else "no label"


def _existing(table: Table, rows: list[tuple[str, TableRow]], *,
              skip: bool) -> tuple[list[tuple[str, TableRow]], list[str]]:
    missing = [(path, row) for path, row in rows if not os.path.isfile(path)]
    if not missing:
        return rows, []
    lines = ", ".join(str(row.line) for _, row in missing[:MAX_LISTED])
    more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    first = missing[0][1]
    if not skip:
        raise UserError(f"{table.where(first)}: image '{first.path}' does not exist ({len(missing)} rows name a "
                        f"missing image: {table.unit}s {lines}{more}): fix the paths, or set data.skip_bad_images=true "
                        "to skip missing and unreadable images")
    import warnings

    warnings.warn(f"table '{table.file}': skipping {len(missing)} rows whose image does not exist ({table.unit}s "
                  f"{lines}{more}; first: '{first.path}')", stacklevel=3)
    gone = {path for path, _ in missing}
    return [(p, r) for p, r in rows if p not in gone], sorted(gone)


def _class_names(table: Table, rows: list[tuple[str, TableRow]], classes: Any, *, multilabel: bool) -> list[str]:
    """``data.classes`` (a list, or a file with one name per line), else the sorted distinct labels; a label
    not among given classes is refused naming its row."""
    if classes is None:
        names = sorted({c for _, row in rows for c in row.labels})
    else:
        names = given_classes(classes)
        known = set(names)
        for _, row in rows:
            unknown = [c for c in row.labels if c not in known]
            if unknown:
                raise UserError(f"{table.where(row)}: label '{unknown[0]}' is not in data.classes ({_few(names)}): fix "
                                "the label, or add the class to data.classes")
    least = 1 if multilabel else 2
    if len(names) < least:
        raise UserError(f"table '{table.file}' has {len(names)} class(es) ({_few(names)}): a classifier needs at least "
                        f"{least}; check data.columns.label (and data.label_sep for several labels per image)")
    return names


def given_classes(classes: Any) -> list[str]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(classes):
        classes = OmegaConf.to_container(classes)
    if isinstance(classes, str):
        from finetune.files import read_text_bounded

        classes = [line.strip() for line in read_text_bounded(Path(classes).expanduser(), max_bytes=64 << 20,
                                                               what="data.classes file").splitlines() if line.strip()]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise UserError(f"data.classes must be a list of class names or a file with one name per line, got "
                        f"{_shown(classes)}")
    duplicated = sorted({c for c in classes if classes.count(c) > 1})
    if duplicated:
        raise UserError(f"data.classes names '{duplicated[0]}' more than once: give each class once")
    return list(classes)


def _few(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")


def _split(table: Table, samples: dict[str, tuple[Any, str | None]], names: list[str], *, multilabel: bool,
           val_split: float, seed: int, folds: int | None, fold: int | None) -> tuple[list, list, list, str]:
    """Train, val, test samples and the layout (see `DataSplit`)."""
    from finetune.data.folder import _check_val_split, _split_stratified, split_by_fold
    from finetune.data.splits import assign_multilabel_folds

    ordered = sorted(samples.items())
    test = [(p, label) for p, (label, split) in ordered if split == "test"]
    pool = [(p, label) for p, (label, split) in ordered if split != "test"]
    if folds is None and table.has_split:
        return ([(p, label) for p, (label, split) in ordered if split == "train"],
                [(p, label) for p, (label, split) in ordered if split == "val"], test, "column")
    if folds is None:
        _check_val_split(val_split)
    if multilabel:
        proportions = [1 / folds] * folds if folds is not None else [1 - val_split, val_split]
        subset = assign_multilabel_folds([label for _, label in pool], proportions, seed=seed)
        held_out = fold if folds is not None else 1
        train = [s for s, j in zip(pool, subset) if j != held_out]
        val = [s for s, j in zip(pool, subset) if j == held_out]
        return train, val, test, "split" if folds is None else "folds"
    by_class = {name: [] for name in names}
    for p, label in pool:
        by_class[names[label]].append(p)
    empty = [name for name, images in by_class.items() if not images]
    if empty:
        raise UserError(f"table '{table.file}': class '{empty[0]}' has no image to train on (classes without images: "
                        f"{_few(empty)}): add rows for it, or leave it out of data.classes")
    if folds is not None:
        return (*split_by_fold(by_class, names, folds=folds, fold=fold, seed=seed), test, "folds")
    return (*_split_stratified(by_class, names, val_split, seed,
                               remedy=f"give table '{table.file}' a split column with train and val rows"), test, "split")


def _check_not_empty(table: Table, train: list, val: list, names: list[str], *, multilabel: bool) -> None:
    for split, samples in (("train", train), ("val", val)):
        if not samples:
            raise UserError(f"table '{table.file}' has no {split} image: give the split column 'train' and 'val' "
                            "rows, or remove the column to split by data.val_split")
    if not multilabel:
        counts = [0] * len(names)
        for _, label in train:
            counts[label] += 1
        missing = [n for n, c in zip(names, counts) if c == 0]
        if missing:
            raise UserError(f"table '{table.file}' has no train image of class '{missing[0]}' (classes without train "
                            f"images: {_few(missing)}): add train rows for it, or leave it out of data.classes")
