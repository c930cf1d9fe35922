"""The range test's curve as an image (PIL, no plotting library), for TensorBoard and ``lr_find.png``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from finetune.lr_find.curve import LRFind

RAW_COLOUR, SMOOTH_COLOUR, CHOSEN_COLOUR = (170, 195, 235), (20, 55, 150), (210, 30, 30)
PLOT_TOP = 2.0  # the loss axis ends at most at this many times the first smoothed loss (higher is clipped)


@dataclass
class _Axes:
    """Maps (rate, loss) to pixels inside ``box`` (left, top, right, bottom): log rate, linear loss (clipped)."""

    box: tuple[int, int, int, int]
    decades: tuple[int, int]
    loss_range: tuple[float, float]

    def x(self, rate: float) -> float:
        left, _, right, _ = self.box
        low, high = self.decades
        return left + (math.log10(rate) - low) / (high - low) * (right - left)

    def y(self, loss: float) -> float:
        _, top, _, bottom = self.box
        low, high = self.loss_range
        return bottom - (min(max(loss, low), high) - low) / (high - low) * (bottom - top)


def draw_curve(result: LRFind, size: tuple[int, int] = (480, 320)) -> np.ndarray:
    """The curve as an ``H x W x 3`` uint8 RGB image: loss against rate on a log axis.

    Raw losses light, smoothed dark, the chosen rate marked in red; the title says the choice or
    why there is none. ``size`` is (width, height), as PIL's.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    title = f"{result.rule}: {result.chosen:.2e}" if result.chosen is not None else f"no suggestion: {result.reason}"
    draw.text((8, 3), title[: max(width // 6 - 2, 1)], fill="black")
    points = [(r, v, s) for r, v, s in zip(result.rates, result.losses, result.smoothed)
              if r > 0 and math.isfinite(v) and math.isfinite(s)]
    axes = _draw_frame(draw, points, (52, 34, width - 10, height - 34))
    if axes is None:
        return np.asarray(image)
    for column, colour, line_width in ((1, RAW_COLOUR, 1), (2, SMOOTH_COLOUR, 2)):
        draw.line([(axes.x(p[0]), axes.y(p[column])) for p in points], fill=colour, width=line_width)
    if result.chosen_index is not None:
        x = axes.x(result.rates[result.chosen_index])
        y = axes.y(result.smoothed[result.chosen_index])
        draw.line([(x, axes.box[1]), (x, axes.box[3])], fill=CHOSEN_COLOUR)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=CHOSEN_COLOUR, width=2)
    return np.asarray(image)


def _draw_frame(draw: ImageDraw.ImageDraw, points: list[tuple[float, float, float]],
                box: tuple[int, int, int, int]) -> _Axes | None:
    """Box, ticks and labels for ``points`` (rate, raw, smoothed); None (and a note) when there is none."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text(((left + right) // 2 - 70, bottom + 18), "learning rate (log scale)", fill="black")
    draw.text((4, top - 17), "loss", fill="black")
    if not points:
        draw.text((left + 10, (top + bottom) // 2), "no finite loss recorded", fill="black")
        return None
    low_decade = math.floor(math.log10(points[0][0]))
    decades = (low_decade, max(math.ceil(math.log10(points[-1][0])), low_decade + 1))
    # the smoothed curve sets the top, at most PLOT_TOP x where it starts: the divergence would squash the rest
    low, high = min(min(p[1], p[2]) for p in points), max(p[2] for p in points)
    high = min(high, PLOT_TOP * abs(points[0][2])) if PLOT_TOP * abs(points[0][2]) > low else high
    axes = _Axes(box, decades, (low, high if high > low else low + max(abs(low), 1.0) * 0.1))
    every = max(1, math.ceil((decades[1] - decades[0]) / 8))  # at most ~9 labels
    for decade in range(decades[0], decades[1] + 1, every):
        x = axes.x(10.0**decade)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 10, bottom + 6), f"1e{decade}", fill="black")
    for loss in np.linspace(*axes.loss_range, 4):
        y = axes.y(loss)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 5), f"{loss:.3g}", fill="black")
    return axes
