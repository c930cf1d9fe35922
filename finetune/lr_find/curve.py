"""The learning-rate range test ("LR finder"): the curve, a suggested rate, and putting everything back.

A range test (Smith 2015; fastai's ``lr_find``, Lightning's ``Tuner.lr_find``) trains for
``num_updates`` updates at exponentially increasing rates, ``start_lr`` to ``end_lr``, and
records the training loss of each (`range_test`). The loss first barely moves (rate too small),
then falls, then blows up; a good rate lies on the falling part, below the blow-up.

The pieces, wired by the run:

- `num_updates_for`: how many updates (about 100, fewer for a small training set);
- `Snapshot.take` before the test and `Snapshot.restore` after it, so that the training that
  follows is bit-identical (on the CPU) to one that never searched;
- `range_test`: the updates, stopping early when the loss diverges;
- `suggest`: smooth the curve and choose a rate, or fall back (``chosen=None``) saying why;
- `draw_curve`: the curve as an image (PIL, no plotting library), for TensorBoard.

Smoothing. Per-batch losses are noisy, so the curve is an exponential moving average with bias
correction (fastai's and Lightning's): ``avg = b * avg + (1 - b) * loss``,
``smoothed[i] = avg / (1 - b ** (i + 1))``; early on the correction makes it the plain mean of
the losses so far, so the first points are not pulled towards zero. ``beta=0.98`` is fastai's
smoothing for its 100 updates over 1e-7..10 (8 decades); with another spacing of rates each
update uses ``b = beta ** (decades per update / (8 / 99))`` (`per_update_beta`), so the average
forgets at the same rate *per decade of learning rate*. Without this, the 20 updates of a tiny
data set would be smoothed over a window of 50, i.e. into a running mean of the whole test,
whose fall lags and shrinks until the noise check below rejects most real curves (simulated: a
curve with noise 0.2 falling 1.1 -> 0.2 gets a choice in 4% of 20-update tests, 25% with this;
with 30 updates, 24% and 75%).

The rule, ``valley`` (fastai's default suggestion, `valley_pick`), on the smoothed curve:

1. cut the curve at its first non-finite loss, and drop its first ``SKIP_START`` (10%) of
   points: the average is still warming up there, and nothing happens at the tiniest rates;
2. find the longest strictly decreasing subsequence of what is left (not necessarily
   contiguous: a bump does not cut the valley in two). Its length ``k`` and its last point
   ``end`` (the first such, if several tie) define the valley as the ``k`` points ending at
   ``end``: counted in points, not spanned from the subsequence's first member, so a long noisy
   plateau, whose smoothed values fall only now and then, adds few points;
3. choose the point ``VALLEY_POSITION`` (halfway, rounded down) down the valley, in points,
   which is halfway in log-rate (fastai: ``start + int(s) + int(s/2)`` with ``s = (end - start) / 3``).

Why this rule: it uses the whole shape of the curve. The steepest slope (Lightning's default)
is the argmax of a derivative, i.e. of the noise, and on a tiny data set, where consecutive
batches hold different images, it jumps to wherever two batches happened to differ most.
"Minimum / 10" needs a reliable minimum, which a noisy curve does not have, and the minimum of
a lagging average sits late. The valley only needs the loss to fall over many updates, and
halfway down it is comfortably below the rates where the loss turns up (a rate somewhat low
costs a little speed; one too high diverges).

Fallbacks (``chosen=None``; the run then keeps its configured rate), checked in this order:

- fewer than ``MIN_POINTS`` finite losses: "diverged at once" when the test stopped on a
  non-finite loss or the smoothed loss rose, else "too few points";
- the valley counts when its smoothed loss falls by at least ``MIN_DROP`` of the starting
  level *and* by at least ``NOISE_RATIO`` standard deviations of the noise in the smoothed loss
  at the valley's top. That noise is the per-update noise of the raw losses (estimated robustly
  from consecutive differences, where the trend cancels: ``1.4826 * median|diff| / sqrt(2)``)
  times the norm of the average's weights there (``1/sqrt(n)`` for the mean of ``n`` losses).
  Simulated pure-noise curves of 20 to 100 points get a choice in under 4% of cases (the
  shortest most). Otherwise the curve is
  - "flat" when its smoothed loss stays within ``FLAT_TOLERANCE`` of its starting level;
  - "diverged at once" when it falls by less than ``MIN_DROP`` and rises, beyond the noise and
    ``MIN_DROP`` (or reached a non-finite loss): there is no descending part;
  - "too noisy" otherwise: what fall there is, batch-to-batch noise alone produces (typical
    of a tiny data set, or of too few updates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SKIP_START = 0.1  # fraction of the first points the rule ignores: the average still warms up there (fastai: 10%)
MIN_POINTS = 10  # fewer finite losses than this is no curve: the smoothed average is barely past its warm-up
VALLEY_POSITION = 0.5  # where in the valley to choose, 0 its top, 1 its bottom (fastai: 1/3 + 1/6)
MIN_DROP = 0.05  # the valley's fall, relative to the starting level, below which nothing is learnt at any rate
NOISE_RATIO = 3.0  # the valley's fall in deviations of the average's noise; pure noise exceeds 3 in < 1% of curves
FLAT_TOLERANCE = 0.05  # a smoothed loss that stays within 5% of its start never responded to the rate
MAD_TO_SIGMA = 1.4826  # median absolute deviation to standard deviation, for normal noise
REFERENCE_STEP = math.log(1e8) / 99  # fastai's log-rate per update (100 over 1e-7..10), the one `beta` is for


@dataclass
class LRFind:
    """The outcome of a range test: the curve, the rule, the choice (or why none).

    Attributes:
        rates: The rate of each update done, increasing.
        losses: The training loss of each update (the last may be non-finite: the test stopped there).
        smoothed: The bias-corrected moving average of ``losses``; NaN from the first non-finite loss.
        rule: The rule that chose (``valley``).
        chosen: The suggested rate; None when the finder falls back.
        reason: One line: why this point, or why the finder fell back.
        chosen_index: The index of ``chosen`` in ``rates``; None with it.
    """

    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    rule: str
    chosen: float | None
    reason: str
    chosen_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``lr_find.json``): non-finite losses become None (JSON has no NaN)."""
        return {"rule": self.rule, "chosen": self.chosen, "chosen_index": self.chosen_index,
                "reason": self.reason, "rates": list(self.rates), "losses": _json_floats(self.losses),
                "smoothed": _json_floats(self.smoothed)}


def _json_floats(values: Sequence[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


# ------------------------------------------------------------------------------ the test
def range_test(step: Callable[[float], float], *, num_updates: int, start_lr: float = 1e-7, end_lr: float = 10.0,
               beta: float = 0.98, diverge: float = 4.0) -> tuple[list[float], list[float]]:
    """Run the updates of a range test at exponentially increasing rates.

    Rate ``i`` is ``start_lr * (end_lr / start_lr) ** (i / (num_updates - 1))``: a constant
    ratio, from ``start_lr`` to ``end_lr`` exactly.

    Args:
        step: Does one optimizer update at the given rate and returns its training loss (finite or not).
        num_updates: The most updates to do (`num_updates_for`).
        start_lr: The first rate.
        end_lr: The last rate, reached only when the loss never diverges.
        beta: Smoothing of the divergence check, as for `suggest` (`per_update_beta`).
        diverge: Stop once the smoothed loss exceeds this many times its minimum so far.

    Returns:
        The rates and raw losses of the updates done, the one that stopped the test included.

    >>> rates, losses = range_test(lambda lr: 1.0 if lr < 1e-3 else float("nan"), num_updates=9)
    >>> len(rates), rates[0], losses[-1]
    (5, 1e-07, nan)
    """
    if num_updates < 2 or not 0 < start_lr < end_lr or not 0 <= beta < 1 or diverge <= 1:
        raise ValueError(f"range_test needs num_updates >= 2, 0 < start_lr < end_lr, 0 <= beta < 1 and diverge > 1, "
                         f"got {num_updates}, {start_lr}, {end_lr}, {beta}, {diverge}")
    rates: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    beta = beta ** (math.log(end_lr / start_lr) / (num_updates - 1) / REFERENCE_STEP)  # `per_update_beta`
    for i in range(num_updates):
        rate = start_lr * (end_lr / start_lr) ** (i / (num_updates - 1))
        loss = float(step(rate))
        rates.append(rate)
        losses.append(loss)
        if not math.isfinite(loss):
            break
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (i + 1))
        best = min(best, smoothed)
        if smoothed > diverge * best:  # fastai's and Lightning's stop (for a positive loss)
            break
    return rates, losses


def num_updates_for(train_batches: int, *, accumulate: int = 1, default: int = 100, minimum: int = 20) -> int:
    """How many updates a range test does: ``default``, at most one epoch's worth, at least ``minimum``.

    One epoch bounds the cost on a small training set; below ``minimum`` there is no curve to
    read, so the caller cycles the loader.

    >>> num_updates_for(1000), num_updates_for(60), num_updates_for(60, accumulate=2), num_updates_for(3)
    (100, 60, 30, 20)
    """
    if train_batches < 1 or accumulate < 1 or not 2 <= minimum <= default:
        raise ValueError(f"num_updates_for needs train_batches >= 1, accumulate >= 1 and 2 <= minimum <= default, "
                         f"got {train_batches}, {accumulate}, {minimum}, {default}")
    per_epoch = math.ceil(train_batches / accumulate)  # the trainer also updates on a last, partial accumulation
    return max(minimum, min(default, per_epoch))


# ---------------------------------------------------------------------------- the choice
def per_update_beta(rates: Sequence[float], beta: float = 0.98) -> float:
    """The smoothing per update that forgets as ``beta`` does per update of fastai's test, per decade of rate.

    >>> per_update_beta([1e-7 * 1e8 ** (i / 99) for i in range(100)])  # fastai's spacing: unchanged
    0.98
    >>> round(per_update_beta([1e-7 * 1e8 ** (i / 19) for i in range(20)]), 4)  # 20 updates: ~1/5 the window
    0.9001
    """
    if len(rates) < 2 or not 0 < rates[0] < rates[1]:
        return beta
    return round(beta ** (math.log(rates[1] / rates[0]) / REFERENCE_STEP), 12)


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average (``beta`` per update); NaN from the first non-finite loss on.

    >>> smooth_losses([2.0, 4.0, float("inf"), 1.0], beta=0.5)
    [2.0, 3.3333333333333335, nan, nan]
    """
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            return smoothed + [math.nan] * (len(losses) - i)
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (i + 1)))
    return smoothed


def valley_pick(smoothed: np.ndarray) -> tuple[int, int, int]:
    """fastai's valley: ``(top, bottom, chosen)`` indices of the longest decreasing run of ``smoothed``.

    ``longest[i]`` is the length of the longest strictly decreasing subsequence ending at ``i``.

    >>> valley_pick(np.array([5.0, 4.0, 4.5, 3.0, 2.0, 1.0, 3.0, 6.0]))
    (1, 5, 3)
    """
    longest = np.ones(len(smoothed), dtype=int)
    for i in range(1, len(smoothed)):
        higher = smoothed[:i] > smoothed[i]
        if higher.any():
            longest[i] = longest[:i][higher].max() + 1
    bottom = int(longest.argmax())
    top = bottom - int(longest[bottom]) + 1
    return top, bottom, top + int(VALLEY_POSITION * (bottom - top))  # rounded down: the lower rate


RULES: dict[str, Callable[[np.ndarray], tuple[int, int, int]]] = {"valley": valley_pick}


def suggest(rates: Sequence[float], losses: Sequence[float], *, rule: str = "valley", beta: float = 0.98) -> LRFind:
    """Smooth the curve and choose a rate by ``rule``, or fall back saying why (see the module docstring).

    Args:
        rates: The rates of a range test, increasing.
        losses: Their raw training losses; the curve ends at the first non-finite one.
        rule: A name in `RULES`.
        beta: Smoothing per update of fastai's spacing of rates (`per_update_beta`).

    Raises:
        ValueError: An unknown rule, or rates and losses of different lengths.
    """
    if rule not in RULES:
        raise ValueError(f"lr_find rule '{rule}' is not known: use {' | '.join(RULES)}")
    if len(rates) != len(losses):
        raise ValueError(f"{len(rates)} rates but {len(losses)} losses")
    rates, losses = [float(r) for r in rates], [float(v) for v in losses]
    beta = per_update_beta(rates, beta)
    result = LRFind(rates, losses, smooth_losses(losses, beta), rule, chosen=None, reason="")
    finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    if finite < MIN_POINTS:
        result.reason = _too_short(rates, result.smoothed, finite, cut=finite < len(losses))
        return result
    first = int(SKIP_START * finite)
    curve = np.array(result.smoothed[first:finite])
    top, bottom, pick = RULES[rule](curve)
    fall = curve[top] - curve[bottom]
    noise = _average_noise(_noise(np.array(losses[first:finite])), beta, first + top)
    span = f"rates {rates[first + top]:.2e}..{rates[first + bottom]:.2e}"
    if fall >= MIN_DROP * _level(curve) and fall >= NOISE_RATIO * noise:
        result.chosen, result.chosen_index = rates[first + pick], first + pick
        result.reason = (f"{rule}: the smoothed loss falls {curve[top]:.4g} -> {curve[bottom]:.4g} over {span}; "
                         f"chose {result.chosen:.2e}, {VALLEY_POSITION:.0%} of the way down")
    else:
        result.reason = _no_valley(curve, fall=fall, noise=noise, cut=finite < len(losses), span=span)
    return result


def _level(curve: np.ndarray) -> float:
    """The scale that relative thresholds apply to: the smoothed loss where the curve starts."""
    return max(abs(float(curve[0])), 1e-12)


def _too_short(rates: list[float], smoothed: list[float], finite: int, *, cut: bool) -> str:
    """Why fewer than ``MIN_POINTS`` finite losses: a test cut short by divergence, or too few updates."""
    if cut:
        return f"diverged at once: the loss was not finite at update {finite + 1} (rate {rates[finite]:.2e})"
    if finite > 1 and smoothed[finite - 1] > smoothed[0] * (1 + FLAT_TOLERANCE):
        return (f"diverged at once: the smoothed loss rose {smoothed[0]:.4g} -> {smoothed[finite - 1]:.4g} "
                f"within {finite} updates (rate {rates[finite - 1]:.2e})")
    return f"too few points: {finite} finite losses, at least {MIN_POINTS} needed; do more updates"


def _no_valley(curve: np.ndarray, *, fall: float, noise: float, cut: bool, span: str) -> str:
    """Why a curve with enough points has no valley to trust: it is flat, it only rises, or it is noise."""
    if curve.max() - curve.min() <= FLAT_TOLERANCE * _level(curve):
        return (f"flat: the smoothed loss stays within {FLAT_TOLERANCE:.0%} of {curve[0]:.4g} at every rate; "
                f"check that the model has trainable parameters")
    if fall < MIN_DROP * _level(curve) and (cut or curve[-1] - curve[0] > max(MIN_DROP * _level(curve),
                                                                                NOISE_RATIO * noise)):
        ending = "a non-finite loss" if cut else f"{curve[-1]:.4g}"
        return f"diverged at once: no descending part, the smoothed loss rises from {curve[0]:.4g} to {ending}"
    return (f"too noisy: the smoothed loss falls only {fall:.3g} ({span}), within its noise ({noise:.3g} "
            f"x {NOISE_RATIO:g}); do more updates or use larger batches")


def _noise(raw: np.ndarray) -> float:
    """The standard deviation of per-update noise: robust, from consecutive differences (the trend cancels)."""
    return float(MAD_TO_SIGMA * np.median(np.abs(np.diff(raw))) / math.sqrt(2)) if len(raw) > 1 else 0.0


def _average_noise(noise: float, beta: float, index: int) -> float:
    """The standard deviation that per-update noise ``noise`` leaves in the smoothed loss at update ``index``.

    The bias-corrected average weighs update ``j <= index`` by ``(1 - beta) * beta ** (index - j) /
    (1 - beta ** (index + 1))``; early on it is the mean of a few losses, hence noisier.
    """
    weights = (1 - beta) * beta ** np.arange(index + 1) / (1 - beta ** (index + 1))
    return noise * float(np.sqrt(np.sum(weights**2)))
