"""The embedded demo data set: procedurally drawn shapes on cluttered backgrounds.

Each image shows one class shape (circle, square, triangle, ...) with a random fill
colour, size, position and rotation on a random gradient with noise, distractor
lines and small irregular blobs. Colour is drawn independently of the class, so only
the outline tells the classes apart.

The set is a pure function of its parameters: every image has its own random stream
seeded from ``(seed, split, class, index)``, so the same seed gives byte-identical
files. It is written once, as an ordinary image folder, to
``<cache_dir>/demo-<hash>/{train,val}/<class>/<index>.png`` and read afterwards through
the same code path as a user's folder (`scan_image_folder`).

Writing is atomic: the set is built in a hidden temporary folder beside its final
place and renamed into place, so a killed generation never leaves a half set that a
later run would reuse, and two concurrent runs both end up using one complete set.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     root = ensure_demo_dataset(tmp, train_per_class=2, val_per_class=1, image_size=32)
...     sorted(p.name for p in (root / "train").iterdir()), sorted(p.name for p in (root / "val" / "star").iterdir())
(['circle', 'cross', 'hexagon', 'square', 'star', 'triangle'], ['0000.png'])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finetune.errors import UserError

# Bump when the drawing changes: the cache key includes it, so old sets are not reused.
GENERATOR_VERSION = 1
SUPERSAMPLE = 4  # shapes are drawn as masks at 4x and downsampled: smooth edges
STALE_TEMP_SECONDS = 3600
# Bounds on what a demo set may cost: a run dir from someone else names its demo settings, and
# `finetune.evaluate` generates the set it was trained on (under the user's own cache).
MAX_IMAGE_SIZE = 512
MAX_PIXELS = 100_000_000  # about 10x the default set (6 classes x 100 images x 128^2)

Point = tuple[float, float]
Rng = np.random.Generator


def _regular_polygon(sides: int) -> list[Point]:
    return [(math.cos(2 * math.pi * k / sides), math.sin(2 * math.pi * k / sides)) for k in range(sides)]


def _star(points: int = 5, inner: float = 0.45) -> list[Point]:
    verts = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = math.pi * k / points - math.pi / 2
        verts.append((radius * math.cos(angle), radius * math.sin(angle)))
    return verts


def _cross(arm: float = 0.34) -> list[Point]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _arrow() -> list[Point]:
    return [(-1, -0.28), (0.15, -0.28), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.28), (-1, 0.28)]


# Class shapes as polygons on the unit circle; circle and crescent are drawn specially.
POLYGONS: dict[str, list[Point]] = {
    "square": _regular_polygon(4),
    "triangle": _regular_polygon(3),
    "star": _star(),
    "cross": _cross(),
    "hexagon": _regular_polygon(6),
    "arrow": _arrow(),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "arrow", "crescent")


def ensure_demo_dataset(
    cache_dir: str | Path,
    *,
    seed: int = 0,
    num_classes: int = 6,
    train_per_class: int = 80,
    val_per_class: int = 20,
    image_size: int = 128,
) -> Path:
    """Return the demo image folder, generating it once if it is not cached yet.

    Args:
        cache_dir: Folder that holds generated sets (created if missing; ``~`` expanded).
        seed: Seed of the whole set; the same seed gives byte-identical files.
        num_classes: Number of shape classes, 2 to ``len(SHAPES)``.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        image_size: Side of the square images in pixels.

    Returns:
        The set's root, holding ``train/<class>/*.png`` and ``val/<class>/*.png``.

    Raises:
        UserError: A parameter is out of range or the cache folder is not writable.
    """
    params = _check_params(seed, num_classes, train_per_class, val_per_class, image_size)
    cache = Path(cache_dir).expanduser()
    final = cache / f"demo-{_hash_params(params)}"
    if final.is_dir():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"demo cache dir '{cache}' cannot be created ({exc.strerror}): "
                        "choose a writable folder") from exc
    _remove_stale_temps(cache, final.name)
    temp = cache / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(temp, params)
        _publish(temp, final)
    except OSError as exc:
        raise UserError(f"demo cache dir '{cache}' is not writable ({exc.strerror or exc}): "
                        "choose a writable folder") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def _check_params(seed: int, num_classes: int, train_per_class: int, val_per_class: int, image_size: int) -> dict:
    if not 2 <= num_classes <= len(SHAPES):
        raise UserError(f"demo num_classes must be between 2 and {len(SHAPES)}, got '{num_classes}': "
                        "pick a value in range")
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value < 1:
            raise UserError(f"demo {name} must be a positive integer, got '{value}'")
    if not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"demo image_size must be between 32 and {MAX_IMAGE_SIZE} pixels, got '{image_size}'")
    pixels = num_classes * (train_per_class + val_per_class) * image_size ** 2
    if pixels > MAX_PIXELS:
        raise UserError(f"the demo set asked for ({num_classes} classes x {train_per_class + val_per_class} images "
                        f"x {image_size}^2 pixels) is more than {MAX_PIXELS:.0e} pixels, 10x the default set: "
                        "ask for fewer or smaller images (use data=custom for real data)")
    return {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "classes": list(SHAPES[:num_classes]),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "image_size": int(image_size),
    }


def _hash_params(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _remove_stale_temps(cache: Path, name: str) -> None:
    """Delete temp folders that killed generations left behind (old enough not to be live)."""
    for temp in cache.glob(f".{name}.tmp-*"):
        try:
            if time.time() - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            pass  # another process removed it meanwhile


def _publish(temp: Path, final: Path) -> None:
    """Rename the finished set into place; if another run won the race, keep theirs."""
    try:
        os.rename(temp, final)
    except OSError:
        if not final.is_dir():
            raise


def _write_dataset(root: Path, params: dict) -> None:
    splits = {"train": params["train_per_class"], "val": params["val_per_class"]}
    for split_index, (split, count) in enumerate(splits.items()):
        for class_index, shape in enumerate(params["classes"]):
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([params["seed"], split_index, class_index, i])
                image = draw_sample(shape, params["image_size"], rng)
                image.save(folder / f"{i:04d}.png", optimize=False, compress_level=6)
    (root / "demo.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")  # safe-write: a fresh temp dir


def draw_sample(shape: str, size: int, rng: Rng) -> Image.Image:
    """Draw one demo image of ``shape``: clutter, the shape, a little clutter on top, noise.

    Args:
        shape: One of `SHAPES`.
        size: Image side in pixels.
        rng: The image's own random stream.

    Returns:
        An RGB image of ``size`` x ``size`` pixels.
    """
    canvas = _draw_background(size, rng)
    _draw_clutter(canvas, rng, lines=int(rng.integers(4, 10)), blobs=int(rng.integers(3, 7)))
    radius = size * rng.uniform(0.2, 0.36)
    centre = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
    mask = _draw_shape_mask(shape, size, centre, radius, rng.uniform(0, 2 * math.pi))
    colour = _pick_contrasting_colour(canvas, mask, rng)
    canvas.paste(Image.new("RGB", canvas.size, colour), mask=mask)
    _draw_clutter(canvas, rng, lines=int(rng.integers(0, 3)), blobs=0)
    noise = rng.normal(0, 8, (size, size, 3))
    pixels = np.asarray(canvas, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _random_colour(rng: Rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _draw_background(size: int, rng: Rng) -> Image.Image:
    """A linear gradient between two random colours in a random direction."""
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs * math.cos(angle) + ys * math.sin(angle) + 1.5) / 3.0
    pixels = start[None, None, :] * (1 - t[..., None]) + end[None, None, :] * t[..., None]
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _draw_clutter(canvas: Image.Image, rng: Rng, *, lines: int, blobs: int) -> None:
    """Distractors that are none of the class shapes: straight lines and irregular blobs."""
    draw = ImageDraw.Draw(canvas)
    size = canvas.size[0]
    for _ in range(lines):
        ends = [float(v) for v in rng.uniform(0, size, 4)]
        draw.line(ends, fill=_random_colour(rng), width=int(rng.integers(1, max(2, size // 32))))
    for _ in range(blobs):
        radius = size * rng.uniform(0.04, 0.14)
        cx, cy = rng.uniform(0, size, 2)
        sides = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, sides))
        radii = radius * rng.uniform(0.4, 1.0, sides)
        draw.polygon([(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, radii)],
                     fill=_random_colour(rng))


def _draw_shape_mask(shape: str, size: int, centre: Point, radius: float, angle: float) -> Image.Image:
    """Render the class shape as an anti-aliased 'L' mask."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    cx, cy, r = centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, radius * SUPERSAMPLE
    DRAWERS.get(shape, _draw_polygon)(ImageDraw.Draw(mask), shape, (cx, cy), r, angle)
    return mask.resize((size, size), Image.Resampling.BOX)


def _draw_polygon(draw: ImageDraw.ImageDraw, shape: str, centre: Point, radius: float, angle: float) -> None:
    cos, sin = math.cos(angle), math.sin(angle)
    points = [(centre[0] + radius * (x * cos - y * sin), centre[1] + radius * (x * sin + y * cos))
              for x, y in POLYGONS[shape]]
    draw.polygon(points, fill=255)


def _draw_circle(draw: ImageDraw.ImageDraw, shape: str, centre: Point, radius: float, angle: float) -> None:
    draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=255)


def _draw_crescent(draw: ImageDraw.ImageDraw, shape: str, centre: Point, radius: float, angle: float) -> None:
    _draw_circle(draw, shape, centre, radius, angle)
    bite = (centre[0] + 0.45 * radius * math.cos(angle), centre[1] + 0.45 * radius * math.sin(angle))
    inner = 0.85 * radius
    draw.ellipse([bite[0] - inner, bite[1] - inner, bite[0] + inner, bite[1] + inner], fill=0)


DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, str, Point, float, float], None]] = {
    "circle": _draw_circle,
    "crescent": _draw_crescent,
}


def _pick_contrasting_colour(canvas: Image.Image, mask: Image.Image, rng: Rng) -> tuple[int, int, int]:
    """A random colour far enough from the background under the shape to be visible."""
    weights = np.asarray(mask, dtype=np.float32)[..., None]
    behind = (np.asarray(canvas, dtype=np.float32) * weights).sum((0, 1)) / max(weights.sum(), 1.0)
    colour = _random_colour(rng)
    for _ in range(20):
        if np.linalg.norm(np.asarray(colour) - behind) >= 110:
            break
        colour = _random_colour(rng)
    return colour
