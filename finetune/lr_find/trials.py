"""Budget-aware selection of the peak rate: short trial fine-tunes of a few candidates, by successive halving.

Why: the range test alone (`finetune.lr_find.curve`) answers "which rates are safe", not "which rate
trains best within this run's budget". On few-shot data its valley sits 2-10x below the rates that
win a 10-epoch fine-tune (``docs/benchmarks.md``, issue 12: it lost to the fixed default in every
cell). So ``optim.lr=auto`` (``optim.lr_find.select=trials``, the default) reads the curve for
candidates and lets short fine-tunes decide:

- `candidate_rates`: the valley, the steepest fall, 3x and 10x the valley (fastai's "a bit before
  the minimum" lies there), and the configured ``fallback_lr`` with 3x it (the usual fixed
  recipe): so the chosen rate is never picked without the usual recipe having been tried. Rates
  within 1.5x of a lower one merge; rates at or beyond where the test diverged are dropped.
- `holdout_split`: a class-stratified slice of the *training* pool (the validation set is never
  seen): the trials train on the rest and are judged on it.
- `frozen_candidate_rates`: with ``optim.lr_find.freeze_candidates`` (default ``[head_only]``) a run
  that freezes nothing also tries the backbone frozen, at 1x, 3x and 10x ``fallback_lr``: the range
  test's curve describes the whole network, and a head alone trains well at higher rates than the
  network (a linear probe takes about 10x a fine-tune's rate); on few-shot data the frozen backbone
  beat every rate for the whole network in most cells (``docs/benchmarks.md``, issue 26).
- `successive_halving` (Jamieson & Talwalkar 2016): every candidate trains ``first_updates``
  updates, each time from the same starting weights, under the run's own schedule shape
  compressed to the trial; the best third (lowest held-out loss) trains ``eta`` times longer; and
  so on until one is left. Cost: ``n * first_updates`` for the first rung, about as much again for
  the later ones.
- `select` (the default, ``optim.lr_find.final_share=1``): successive halving *within* each family
  (the rates for the whole network; the rates with the backbone frozen), then a final rung at the
  run's own length between each family's winner and each family's usual recipe (``fallback_lr``),
  judged by the run's monitored metric (``checkpoint.monitor``, then the loss),
  averaged over several disjoint held-out slices where one slice is small (`fold_count`,
  `further_folds`: k-fold, every image of a few-shot pool judged once).
  Why: short trials judge the start of a run, not its end. Measured on the
  few-shot grid (``docs/benchmarks.md``, issue 26), they favoured fast rates for the whole
  network, which lead early and lose by the last epoch, and passed over the frozen backbone, which
  learns slowly at first and wins at the end. Only a trial as long as the run compares what the
  run will deliver. Keeping each family's usual recipe among the finalists means ``auto`` leaves
  the simple recipes only when a full-length trial beats them on held-out images (the frozen
  backbone's short rung sent 3e-3 or 1e-2 where its usual 1e-3 was right). Cost: each finalist
  trains as many updates as the run (on 80% of its images) once per slice: about 3 to 5 runs in
  all with one slice (a pool of 1,000 images or more), 11 to 25 with five (200 images or fewer).

Held-out *loss* judges the short rungs (not accuracy): on a slice of a few images per class accuracy
moves in steps of 1/n and ties, the loss does not. The final rung goes by the metric the run itself
picks its best epoch by, the loss breaking ties: loss and accuracy disagree when one model is better
calibrated but less often right.

Pure functions here; the trials themselves run in `finetune.lr_find.run_trials`.

>>> rungs = successive_halving([1e-4, 3e-4, 1e-3, 1e-2], lambda rate, n: abs(rate - 1e-3) / n, first_updates=2)
>>> [r["updates"] for r in rungs], rungs[0]["kept"], rungs[-1]["kept"]
([2, 6], [0.001, 0.0003], [0.001])
>>> pairs = [(1e-3, "none"), (1e-2, "none"), (1e-3, "head_only"), (1e-2, "head_only")]
>>> loss = {(1e-3, "none"): (0.9, 0.5), (1e-2, "none"): (0.7, 0.8), (1e-3, "head_only"): (1.0, 0.6),
...         (1e-2, "head_only"): (0.8, 0.7)}  # (after 2 updates, after 20): the fast rates lead early
>>> rungs = select(pairs, lambda c, n: loss[c][n == 20], first_updates=2, final_updates=20, family=lambda c: c[1],
...                usual=[(1e-3, "none")])
>>> [(r.get("family"), r["updates"], r["kept"]) for r in rungs]
[('none', 2, [[0.01, 'none']]), ('head_only', 2, [[0.01, 'head_only']]), (None, 20, [[0.001, 'none']])]
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from finetune.lr_find.curve import LRFind

MERGE_RATIO = 1.5  # candidates closer than this (ratio) are one candidate: trials could not tell them apart
ETA = 3  # successive halving keeps the best 1/ETA of each rung, and gives it ETA times the updates
ABOVE_VALLEY = (3.0, 10.0)  # multiples of the valley tried too: faster rates, still below the blow-up
ABOVE_FALLBACK = (1.0, 3.0)  # multiples of optim.lr_find.fallback_lr (the usual fixed rate) tried too
FROZEN_FALLBACK = (1.0, 3.0, 10.0)  # multiples of optim.lr_find.fallback_lr tried with the backbone frozen
JUDGE_IMAGES = 200  # the final rung is judged on at least this many held-out images, as far as the pool has them
MIN_TRIAL_UPDATES = 6  # the first rung's updates per candidate, at least: fewer barely leave the warmup
TRIAL_SHARE = 8  # by default the first rung gets 1/8 of the run's updates per candidate


def candidate_rates(find: LRFind, *, fallback: float) -> list[float]:
    """The rates the trials compare, increasing: from the range test's curve and the usual fixed rate.

    >>> find = LRFind([1e-5, 1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.9, 1.2, 1.0, float("nan")], [], "valley",
    ...               chosen=1e-4, reason="", chosen_index=1)
    >>> [f"{r:.0e}" for r in candidate_rates(find, fallback=1e-3)]
    ['1e-04', '3e-04', '1e-03', '3e-03']
    """
    rates = [fallback * m for m in ABOVE_FALLBACK]
    if find.chosen is not None:
        rates += [find.chosen, *(find.chosen * m for m in ABOVE_VALLEY)]
        steepest = _steepest(find)
        if steepest is not None:
            rates.append(steepest)
    ceiling = _divergence_rate(find)
    return _merge(sorted(r for r in rates if r < ceiling))


def frozen_candidate_rates(*, fallback: float) -> list[float]:
    """The rates tried with the backbone frozen: the usual fixed rate, 3x and 10x it (a head alone takes more).

    >>> [f"{r:.0e}" for r in frozen_candidate_rates(fallback=1e-3)]
    ['1e-03', '3e-03', '1e-02']
    """
    return [fallback * m for m in FROZEN_FALLBACK]


def _steepest(find: LRFind) -> float | None:
    """The rate where the smoothed loss falls fastest (Lightning's suggestion), within the finite curve."""
    curve = np.array([v if v is not None else math.nan for v in find.smoothed], dtype=float)
    finite = int(np.isfinite(curve).sum()) if np.isfinite(curve).all() else int(np.argmax(~np.isfinite(curve)))
    if finite < 3:
        return None
    first = max(1, finite // 10)
    slopes = np.diff(curve[first - 1:finite])
    return float(find.rates[first + int(np.argmin(slopes))])


def _divergence_rate(find: LRFind) -> float:
    """The rate at which the range test stopped on a blown-up loss; infinity when it never did."""
    losses = list(find.losses)
    for rate, loss in zip(find.rates, losses, strict=True):  # one rate and one loss per update
        if loss is None or not math.isfinite(loss):
            return float(rate)
    smoothed = [v for v in find.smoothed if v is not None and math.isfinite(v)]
    if smoothed and smoothed[-1] > 2 * min(smoothed):  # stopped by the divergence check
        return float(find.rates[len(smoothed) - 1])
    return math.inf


def _merge(rates: Sequence[float]) -> list[float]:
    kept: list[float] = []
    for rate in rates:
        if not kept or rate >= kept[-1] * MERGE_RATIO:
            kept.append(rate)
    return kept


def first_rung_updates(run_updates: int, configured: int | None) -> int:
    """Updates per candidate in the first rung: as configured, else 1/8 of the run's, at least 6.

    >>> first_rung_updates(400, None), first_rung_updates(20, None), first_rung_updates(20, 3)
    (50, 6, 3)
    """
    return configured if configured is not None else max(MIN_TRIAL_UPDATES, math.ceil(run_updates / TRIAL_SHARE))


def successive_halving(candidates: Sequence[Any], score: Callable[[Any, int], float], *, first_updates: int,
                       eta: int = ETA) -> list[dict[str, Any]]:
    """Score every candidate, keep the best ``1/eta`` at ``eta`` times the updates, until one is left.

    Args:
        candidates: What the trials compare, safest first (rates, increasing; or ``(rate, freeze)`` pairs):
            a tie goes to the earlier one.
        score: ``score(candidate, updates)``: the held-out loss after a trial of ``updates`` updates from the
            starting weights (lower is better; ``inf`` for a trial that diverged).
        first_updates: Updates of the first rung.

    Returns:
        One record per rung: ``updates``, ``scores`` (``[candidate, loss]`` pairs; a pair candidate as a list)
        and ``kept`` (the candidates that go on; the last rung keeps one: the choice).
    """
    rungs, alive, updates = [], list(candidates), first_updates
    order = {candidate: i for i, candidate in enumerate(candidates)}
    while True:
        scores = [(candidate, float(score(candidate, updates))) for candidate in alive]
        keep = 1 if len(alive) <= eta else math.ceil(len(alive) / eta)
        ranked = sorted(scores, key=lambda pair: (pair[1], order[pair[0]]))  # ties: the earlier, the safer one
        alive = [candidate for candidate, _ in ranked[:keep]]
        rungs.append({"updates": updates, "scores": [[_listed(c), v if math.isfinite(v) else None] for c, v in scores],
                      "kept": [_listed(c) for c in alive]})
        if len(alive) == 1:
            return rungs
        updates *= eta


def select(candidates: Sequence[Any], score: Callable[[Any, int], float], *, first_updates: int,
           final_updates: int | None, family: Callable[[Any], Any] = lambda candidate: None,
           usual: Sequence[Any] = (),
           judge: Callable[[Any, int], tuple[float, float | None]] | None = None,
           eta: int = ETA) -> list[dict[str, Any]]:
    """Successive halving within each family of candidates, then a final rung of ``final_updates`` updates between
    each family's winner and the ``usual`` recipes: ``judge`` decides there (by default the lowest held-out loss
    wins).
    ``final_updates=None``: one successive halving over all candidates, without a final rung (the selection before
    the final rung existed).

    Args:
        candidates: As for `successive_halving`, safest first.
        family: The family of a candidate (``(rate, freeze)`` pairs: the freeze option); each family halves on its own,
            so short trials never rank a frozen backbone against the whole network (they judge the start of a run).
        usual: The usual recipes (each freeze option at ``fallback_lr``: for the whole network the candidate nearest
            it): always finalists, so the short trials' lean to fast rates never drops the usual rate of an option.
        judge: ``judge(candidate, updates)``: ``(loss, value)`` of the final rung, ``value`` the run's monitored metric
            turned lower-is-better (None: the loss alone judges); the lowest value wins, then the lowest loss.

    Returns:
        The rungs as `successive_halving` records them, each family's with ``family``, then the final one with
        ``final: true`` (absent when a single finalist is left); the last rung keeps the choice.
    """
    if final_updates is None:
        return successive_halving(candidates, score, first_updates=first_updates, eta=eta)
    rungs, finalists = [], []
    families = list(dict.fromkeys(family(c) for c in candidates))
    for name in families:
        members = [c for c in candidates if family(c) == name]
        if len(members) == 1:
            finalists += members
            continue
        halved = successive_halving(members, score, first_updates=first_updates, eta=eta)
        rungs += [{"family": name, **rung} if name is not None else rung for rung in halved]
        finalists.append(_candidate(halved[-1]["kept"][0]))
    finalists += [c for c in dict.fromkeys(usual) if c in candidates and c not in finalists]
    order = {candidate: i for i, candidate in enumerate(candidates)}
    finalists.sort(key=order.__getitem__)
    if len(finalists) == 1:
        return rungs
    judge = judge or (lambda candidate, updates: (score(candidate, updates), None))
    judged = [(candidate, *judge(candidate, final_updates)) for candidate in finalists]
    won = min(judged, key=lambda t: (t[2] if t[2] is not None else 0.0, t[1], order[t[0]]))[0]  # then the safer one
    final = {"updates": final_updates, "final": True,
             "scores": [[_listed(c), loss if math.isfinite(loss) else None] for c, loss, _ in judged],
             "kept": [_listed(won)]}
    if any(value is not None for _, _, value in judged):
        final["values"] = [[_listed(c), value] for c, _, value in judged]
    return rungs + [final]


def final_rung_updates(run_updates: int, share: float) -> int | None:
    """Updates of the final rung: ``share`` of the run's (at least 1); None for ``share`` 0 (no final rung).

    >>> final_rung_updates(400, 1.0), final_rung_updates(400, 0.25), final_rung_updates(400, 0.0)
    (400, 100, None)
    """
    return max(1, math.ceil(share * run_updates)) if share > 0 else None


def fold_count(held_images: int, *, fraction: float, configured: int | None) -> int:
    """Held-out slices that judge the final rung: as configured, else as many as it takes to judge `JUDGE_IMAGES`
    images, at most the ``1 / fraction`` disjoint slices the pool holds (every image judged once: k-fold).

    Why 200: the standard error of an accuracy on n images is up to ``0.5 / sqrt(n)``, 0.035 on 200. A few-shot
    slice of 4-32 images (20% of 5-20 per class) has 0.09-0.25, more than the gaps between the finalists, and the
    few-shot grid showed single slices picking the worse finalist (``docs/benchmarks.md``, issue 26).

    >>> fold_count(8, fraction=0.2, configured=None), fold_count(64, fraction=0.2, configured=None)
    (5, 4)
    >>> fold_count(400, fraction=0.2, configured=None), fold_count(8, fraction=0.2, configured=2)
    (1, 2)
    """
    if configured is not None:
        return configured
    return max(1, min(max_folds(fraction), math.ceil(JUDGE_IMAGES / max(1, held_images))))


def max_folds(fraction: float) -> int:
    """Disjoint held-out slices of ``fraction`` of each class that fit in the pool.

    >>> max_folds(0.2), max_folds(0.3), max_folds(0.6)
    (5, 3, 1)
    """
    return max(1, math.floor(1 / fraction + 1e-9))


def further_folds(samples: Sequence[tuple[str, int]], held: Sequence[tuple[str, int]], *, fraction: float, seed: int,
                  folds: int) -> list[tuple[list, list]]:
    """``(rest, held_out)`` of the slices after ``held`` (`holdout_split`'s): each takes as many images of each
    class as the first did, from those no earlier slice held, in an order drawn from ``seed``; a class that runs out
    is not in the later slices. Together with the first: ``folds`` disjoint slices (k-fold when they cover the pool).

    >>> samples = [(f"{c}{i}", c) for c in (0, 1) for i in range(5)]
    >>> rest, held = holdout_split(samples, fraction=0.2, seed=0)
    >>> slices = [held] + [h for _, h in further_folds(samples, held, fraction=0.2, seed=0, folds=5)]
    >>> sorted(s for h in slices for s in h) == sorted(samples), [len(h) for h in slices]
    (True, [2, 2, 2, 2, 2])
    """
    taken = {id(s) for s in held}
    by_class = _by_class(samples)
    rng, slices = random.Random(f"{seed}/folds"), [set() for _ in range(folds - 1)]
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < 2:
            continue
        count = _held_count(len(members), fraction)
        left = [s for s in members if id(s) not in taken]
        rng.shuffle(left)
        for j, ids in enumerate(slices):
            ids.update(id(s) for s in left[j * count:(j + 1) * count])
    return [([s for s in samples if id(s) not in ids], [s for s in samples if id(s) in ids]) for ids in slices]


def nearest(candidates: Sequence[Any], rate: float, *, rate_of: Callable[[Any], float] = float) -> Any:
    """The candidate whose rate is nearest ``rate`` (by ratio): the usual recipe among merged rates.

    >>> nearest([2e-4, 8e-4, 3e-3], 1e-3)
    0.0008
    """
    return min(candidates, key=lambda c: abs(math.log(rate_of(c) / rate)))


def _candidate(kept: Any) -> Any:
    """A candidate back from its record (a pair was listed)."""
    return tuple(kept) if isinstance(kept, list) else kept


def _listed(candidate: Any) -> Any:
    """A candidate as the record keeps it: a pair as a list (as JSON and the training state give it back)."""
    return list(candidate) if isinstance(candidate, tuple) else candidate


def holdout_split(samples: Sequence[tuple[str, int]], *, fraction: float, seed: int) -> tuple[list, list]:
    """``(rest, held_out)``: ``fraction`` of each class (at least one image) held out, for classes of 2 or more.

    >>> rest, held = holdout_split([("a", 0), ("b", 0), ("c", 0), ("d", 1)], fraction=0.2, seed=0)
    >>> len(rest), len(held), sorted(label for _, label in held)
    (3, 1, [0])
    """
    by_class = _by_class(samples)
    rng, held = random.Random(seed), set()
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) >= 2:
            held.update(id(s) for s in rng.sample(members, _held_count(len(members), fraction)))
    return [s for s in samples if id(s) not in held], [s for s in samples if id(s) in held]


def _by_class(samples: Sequence[tuple[str, int]]) -> dict[int, list[tuple[str, int]]]:
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    return by_class


def _held_count(members: int, fraction: float) -> int:
    """Images of a class of ``members`` (2 or more) that one held-out slice takes: ``fraction``, at least one, never
    all."""
    return min(members - 1, max(1, round(fraction * members)))
