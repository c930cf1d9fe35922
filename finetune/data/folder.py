"""Find the images of a class-folder data set, check them, and split train from val.

Two layouts are accepted, the same for the demo set and a user's folder:

- ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (layout ``train_val``);
- ``ROOT/<class>/<image>``, split per class by ``val_split`` with a seeded shuffle of the
  sorted file list, so the split depends only on the files, the seed and the fraction
  (layout ``split``).

Images may sit in sub-folders of a class folder. Hidden files and folders are ignored,
as are plain files directly under ROOT (a README, the demo's ``demo.json``).
"""

from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.dataset import open_image
from finetune.data.splits import assign_multiclass_folds, check_folds
from finetune.errors import UserError, describe_error
from finetune.files import walk_files

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LAYOUT_HINT = "expected DIR/<class>/<image> or DIR/train/<class>/<image> with DIR/val/<class>/<image>"
MAX_LISTED = 5

Sample = tuple[str, Any]  # (path, class index); multi-label: (path, tuple of class indices)


@dataclass
class DataSplit:
    """Train and val samples of an image folder or a label table, with where they came from.

    Attributes:
        train: ``(path, label)`` pairs for training (multi-label: ``(path, (label, ...))``).
        val: ``(path, label)`` pairs for validation.
        class_names: Class names in label order (sorted folder names, or the table's classes).
        root: The data set root, ``~`` expanded and absolute (a table's folder).
        layout: ``"train_val"`` (given folders), ``"split"`` (split by ``val_split``), ``"column"`` (a
            table's split column) or ``"folds"`` (fold ``fold`` of ``folds`` is val).
        skipped: Unreadable (or, for a table, missing) files that were left out (paths).
        val_split: The fraction held out when ``layout == "split"``, else None.
        seed: The seed of the split.
        multilabel: Labels are sets of classes (``task=multilabel``).
        test: A table's ``split=test`` rows (never trained or validated on).
        folds, fold: k-fold cross-validation: the number of folds and the one validated on.
        source: The label table (or Hugging Face dataset) the samples come from (None for a folder).
        images: Reads a sample's key as an image (`finetune.data.hf.HFImages`: keys ``SPLIT/ROW``); None: the
            keys are file paths.
    """

    train: list[Sample]
    val: list[Sample]
    class_names: list[str]
    root: str
    layout: str
    skipped: list[str] = field(default_factory=list)
    val_split: float | None = None
    seed: int = 0
    multilabel: bool = False
    test: list[Sample] = field(default_factory=list)
    folds: int | None = None
    fold: int | None = None
    source: str | None = None
    images: Any = None

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def class_counts(self, split: str = "train") -> list[int]:
        """Number of samples per class (multi-label: positives), in label order, of ``split``."""
        counts = [0] * self.num_classes
        for _, label in self._samples(split):
            for index in (label if self.multilabel else (label,)):
                counts[index] += 1
        return counts

    def to_record(self) -> dict:
        """A JSON-serialisable description of the split, for the run dir's ``split.json``.

        File paths are relative to ``root`` (POSIX separators) so the record survives
        moving the data set.
        """
        splits = ("train", "val", "test") if self.test else ("train", "val")
        return {
            "root": self.root,
            "layout": self.layout,
            "val_split": self.val_split,
            "seed": self.seed,
            "task": "multilabel" if self.multilabel else "multiclass",
            "source": self.source,
            "folds": self.folds,
            "fold": self.fold,
            "class_names": list(self.class_names),
            "counts": {split: dict(zip(self.class_names, self.class_counts(split))) for split in splits},
            "files": {split: [[self._relative(p), list(label) if self.multilabel else label]
                              for p, label in self._samples(split)] for split in splits},
            "skipped": [self._relative(p) for p in self.skipped],
        }

    def _samples(self, split: str) -> list[Sample]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return {"train": self.train, "val": self.val, "test": self.test}[split]

    def _relative(self, path: str) -> str:
        """Relative to ``root`` (POSIX separators); a table's image outside it (``data.allow_outside``): absolute;
        a dataset's key (``images``) as it is."""
        if self.images is not None:
            return path
        relative = Path(os.path.relpath(path, self.root)).as_posix()
        return Path(path).as_posix() if relative == ".." or relative.startswith("../") else relative


def scan_image_folder(
    root: str | Path,
    *,
    val_split: float = 0.2,
    seed: int = 0,
    skip_bad_images: bool = False,
    check_images: bool = True,
    folds: int | None = None,
    fold: int | None = None,
) -> DataSplit:
    """Collect, check and split the images under ``root``.

    Args:
        root: The data set folder (``~`` expanded).
        val_split: Fraction of each class held out for validation when ``root`` has no
            ``train/`` and ``val/`` folders; must be in (0, 1) then.
        seed: Seed of that split.
        skip_bad_images: Leave unreadable images out with a warning instead of failing.
        check_images: Decode every image once to find unreadable ones before training.
        folds, fold: k-fold cross-validation over every image (``train/`` and ``val/`` together): fold
            ``fold`` of ``folds`` (`finetune.data.splits.assign_multiclass_folds`) is val.

    Returns:
        The samples of each split, class names and provenance.

    Raises:
        UserError: The folder is missing or malformed, a class has no images, the split
            is impossible, or images are unreadable and ``skip_bad_images`` is False.
    """
    base = Path(root).expanduser().absolute()
    _check_root(base, root)
    layout = _detect_layout(base)
    if layout == "train_val":
        files = {split: _collect_classes(base / split) for split in ("train", "val")}
        _check_same_classes(base, files["train"], files["val"])
    else:
        _check_val_split(val_split)
        files = {"all": _collect_classes(base)}
    skipped = _drop_bad_images(base, files, skip_bad_images) if check_images else []
    for key, by_class in files.items():
        _check_classes(base if key == "all" else base / key, by_class, skipped)
    class_names = sorted(next(iter(files.values())))
    if folds is not None:
        check_folds(folds, fold)
        pool = {name: sorted(p for by_class in files.values() for p in by_class[name]) for name in class_names}
        train, val = split_by_fold(pool, class_names, folds=folds, fold=fold, seed=seed)
        return DataSplit(train, val, class_names, str(base), "folds", skipped, None, seed, folds=folds, fold=fold)
    if layout == "train_val":
        train, val = _label(files["train"], class_names), _label(files["val"], class_names)
        return DataSplit(train, val, class_names, str(base), layout, skipped, None, seed)
    train, val = _split_stratified(files["all"], class_names, val_split, seed)
    return DataSplit(train, val, class_names, str(base), layout, skipped, float(val_split), seed)


def _check_root(base: Path, given: str | Path) -> None:
    if not base.exists():
        raise UserError(f"data.root '{given}' does not exist: set data.root to your image folder ({LAYOUT_HINT})")
    if not base.is_dir():
        raise UserError(f"data.root '{given}' is not a folder: set data.root to your image folder ({LAYOUT_HINT})")


def _detect_layout(base: Path) -> str:
    has_train, has_val = (base / "train").is_dir(), (base / "val").is_dir()
    if has_train and has_val:
        return "train_val"
    if has_train or has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise UserError(
            f"data.root '{base}' has '{present}/' but no '{absent}/': add {base / absent}/<class>/<image>, "
            f"or move the class folders directly under data.root to split them by data.val_split"
        )
    return "split"


def _list_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _collect_classes(folder: Path) -> dict[str, list[str]]:
    """Map each class folder's name to its image files (sorted, sub-folders included)."""
    class_dirs = _list_dirs(folder)
    if not class_dirs:
        raise UserError(f"data.root '{folder}' has no class folders: {LAYOUT_HINT}")
    return {d.name: _list_images(d) for d in class_dirs}


def _list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (`walk_files`), sorted."""
    return sorted(p for p in walk_files(folder) if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)


def _check_same_classes(base: Path, train: dict[str, list[str]], val: dict[str, list[str]]) -> None:
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    if only_train or only_val:
        raise UserError(
            f"data.root '{base}': train/ and val/ have different class folders "
            f"(only in train: {_quote(only_train)}; only in val: {_quote(only_val)}): give both the same class folders"
        )


def _check_val_split(val_split: float) -> None:
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 < val_split < 1:
        raise UserError(
            f"data.val_split must be a fraction between 0 and 1 (exclusive) to split data.root, got '{val_split}': "
            "use e.g. data.val_split=0.2, or provide DIR/train and DIR/val folders"
        )


def _check_classes(folder: Path, by_class: dict[str, list[str]], skipped: list[str]) -> None:
    empty = [name for name, images in by_class.items() if not images]
    if empty:
        note = f" ({len(skipped)} unreadable images skipped)" if skipped else ""
        raise UserError(
            f"class folder '{folder / empty[0]}' has no images{note}: add images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder (classes without images: {_quote(empty)})"
        )
    if len(by_class) < 2:
        raise UserError(
            f"data.root '{folder}' needs at least 2 classes, found 1: {_quote(list(by_class))}: "
            f"add another class folder ({LAYOUT_HINT})"
        )


def _quote(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) if names else "none"


def _label(by_class: dict[str, list[str]], class_names: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(class_names)}
    return [(path, index[name]) for name in class_names for path in by_class[name]]


def _split_stratified(
    by_class: dict[str, list[str]], class_names: list[str], val_split: float, seed: int, *,
    remedy: str = "provide DIR/train and DIR/val folders",
) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``round(n * val_split)`` images of each class (at least 1, leaving at least 1); ``remedy``: the
    other way to a validation set, named in the error for a class of one image (it depends on the source)."""
    train, val = [], []
    for label, name in enumerate(class_names):
        images = list(by_class[name])
        if len(images) < 2:
            raise UserError(
                f"class '{name}' has {len(images)} image, too few to split by data.val_split={val_split}: "
                f"add images to it or {remedy}"
            )
        random.Random(f"{seed}:{name}").shuffle(images)  # str seeds hash stably across runs
        n_val = min(max(1, round(len(images) * val_split)), len(images) - 1)
        val += [(p, label) for p in sorted(images[:n_val])]
        train += [(p, label) for p in sorted(images[n_val:])]
    return train, val


def split_by_fold(by_class: dict[str, list[str]], class_names: list[str], *, folds: int, fold: int,
                  seed: int) -> tuple[list[Sample], list[Sample]]:
    """Train (every other fold) and val (fold ``fold``), each by class, then path."""
    assigned = assign_multiclass_folds(by_class, class_names, folds=folds, seed=seed)
    train, val = [], []
    for label, name in enumerate(class_names):
        for path in sorted(by_class[name]):
            (val if assigned[path] == fold else train).append((path, label))
    return train, val


def find_unreadable_images(paths: list[str], *, max_workers: int | None = None) -> list[tuple[str, str]]:
    """Decode each image once and return ``(path, reason)`` for those that fail.

    Decoding (not just ``verify()``) catches truncated files; JPEGs are decoded at
    reduced size via ``draft`` to keep a full check of a large folder quick. An image whose
    header claims more than ``MAX_IMAGE_PIXELS`` (a decompression bomb) is reported, not decoded.
    """
    workers = max_workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_read_error, paths, chunksize=64))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def _read_error(path: str) -> str | None:
    try:
        with open_image(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return describe_error(exc).replace(f" '{path}'", "").replace(path, "file")
    return None


def _drop_bad_images(base: Path, files: dict[str, dict[str, list[str]]], skip: bool) -> list[str]:
    """Check every image; fail listing the bad ones, or drop them with a warning."""
    paths = [p for by_class in files.values() for images in by_class.values() for p in images]
    bad_set = check_images_readable(paths, base, skip=skip, where=f"data.root '{base}'")
    for by_class in files.values():
        for name, images in by_class.items():
            by_class[name] = [p for p in images if p not in bad_set]
    return sorted(bad_set)


def check_images_readable(paths: list[str], base: Path, *, skip: bool, where: str) -> set[str]:
    """The unreadable images among ``paths``: none, or with ``skip`` those (listed in a warning);
    otherwise one `UserError` listing them (names relative to ``base``)."""
    bad = find_unreadable_images(paths)
    if not bad:
        return set()
    listed = "; ".join(f"'{os.path.relpath(p, base)}' ({reason})" for p, reason in bad[:MAX_LISTED])
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    if not skip:
        raise UserError(
            f"{len(bad)} unreadable image(s) under {where}: {listed}{more}: "
            "fix or remove them, or set data.skip_bad_images=true to skip them"
        )
    warnings.warn(f"skipping {len(bad)} unreadable image(s) under {where}: {listed}{more}", stacklevel=4)
    return {p for p, _ in bad}
