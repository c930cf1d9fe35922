"""Seeded, stratified assignments of labelled images to subsets: the train/val split and k folds.

Multiclass: per class, the sorted files are shuffled by ``random.Random(f"{seed}:{class}")`` (the
shuffle `finetune.data.folder` has always used for ``data.val_split``) and dealt round-robin into
the folds, each class starting where the previous one stopped, so fold sizes differ by at most one.

Multi-label: iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the Stratification of
Multi-Label Data", ECML PKDD 2011): the label with the fewest images left goes first; each of its
images goes to the subset that still wants most of that label (then most images; then a seeded
draw). Written here rather than taken from ``iterative-stratification`` (iterstrat): that package
needs scikit-learn at run time, gives only equal folds or a shuffle split, and breaks ties with
numpy's RandomState; one function here does both the ``val_split`` split and the folds, seeded by
``data.split_seed`` alone and independent of the table's row order.

>>> folds = assign_multilabel_folds([(0,), (0, 1), (1,), (), (0,), (1,)], [1 / 3] * 3, seed=0)
>>> sorted(folds), len(folds)
([0, 0, 1, 1, 2, 2], 6)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from finetune.errors import UserError


def assign_multiclass_folds(by_class: dict[str, list[str]], class_names: list[str], *, folds: int,
                            seed: int) -> dict[str, int]:
    """``path -> fold`` for every image: each class's images shuffled by the seed and dealt into ``folds``."""
    out: dict[str, int] = {}
    offset = 0
    for name in class_names:
        images = sorted(by_class[name])
        if len(images) < 2:
            raise UserError(f"class '{name}' has {len(images)} image, too few for data.folds={folds}: every fold's "
                            "training part needs one; add images to it or drop the class")
        random.Random(f"{seed}:{name}").shuffle(images)  # str seeds hash stably across runs
        for j, path in enumerate(images):
            out[path] = (j + offset) % folds
        offset = (offset + len(images)) % folds
    return out


def assign_multilabel_folds(label_sets: Sequence[Sequence[int]], proportions: Sequence[float], *,
                            seed: int) -> list[int]:
    """The subset (0 .. len(proportions) - 1) of each image, by iterative stratification.

    Args:
        label_sets: The classes of each image (an empty set is allowed), in a fixed order (sorted paths).
        proportions: The share of the images each subset should get (they sum to 1).
        seed: Tie-breaks and the order within a label are drawn from ``random.Random(f"{seed}:iterstrat")``.
    """
    rng = random.Random(f"{seed}:iterstrat")
    count = len(label_sets)
    wanted = [p * count for p in proportions]  # images each subset still wants
    by_label: dict[int, list[int]] = {}
    for i, labels in enumerate(label_sets):
        for label in labels:
            by_label.setdefault(label, []).append(i)
    wanted_label = {label: [p * len(members) for p in proportions] for label, members in by_label.items()}
    left = {label: len(members) for label, members in by_label.items()}
    subset: list[int | None] = [None] * count
    while any(left.values()):
        label = min((n, label) for label, n in left.items() if n > 0)[1]  # rarest label left (ties: lowest class)
        members = [i for i in by_label[label] if subset[i] is None]
        rng.shuffle(members)
        for i in members:
            j = _choose(wanted_label[label], wanted, rng)
            subset[i] = j
            wanted[j] -= 1
            for other in label_sets[i]:
                wanted_label[other][j] -= 1
                left[other] -= 1
    for i in (i for i in range(count) if subset[i] is None):  # images without a label: by images wanted
        j = _choose(wanted, wanted, rng)
        subset[i] = j
        wanted[j] -= 1
    return [int(s) for s in subset]


def _choose(first: list[float], second: list[float], rng: random.Random) -> int:
    """The subset wanting most by ``first``, then by ``second``, then a seeded draw among the ties."""
    best = max(first)
    tied = [j for j, v in enumerate(first) if v == best]
    if len(tied) > 1:
        most = max(second[j] for j in tied)
        tied = [j for j in tied if second[j] == most]
    return tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]


def check_folds(folds: int | None, fold: int | None) -> None:
    """``data.folds`` and ``data.fold`` make sense together (both null: no cross-validation)."""
    if folds is None and fold is None:
        return
    if folds is None:
        raise UserError(f"data.fold={fold} needs data.folds=K (the number of folds): e.g. data.folds=5 data.fold={fold}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"data.folds must be an integer of at least 2 (or null: no cross-validation), got '{folds}'")
    if fold is None:
        raise UserError(f"data.folds={folds} needs data.fold=i, the fold to validate on (0 .. {folds - 1}); all of "
                        f"them in one sweep: python -m finetune -m data.folds={folds} data.fold='range({folds})'")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise UserError(f"data.fold must be an integer in 0 .. {folds - 1} (data.folds={folds}), got '{fold}'")
