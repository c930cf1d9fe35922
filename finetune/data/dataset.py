"""A map-style data set of image files, with per-sample seeded augmentation.

Reading is `load_image` (any format, upright, as RGB, grey or RGBA). A transform that can say,
before decoding, how much resolution its output needs (`finetune.data.transforms.Preprocess.plan`)
gets a JPEG decoded at 1/2, 1/4 or 1/8 of its size where that is still enough (`load_transformed`).

`ImageDataset` accepts two kinds of keys:

- an ``int`` index: the transform draws from the process's global RNGs (validation,
  prediction, any ordinary sampler);
- an ``(index, sample_seed)`` pair, as `EpochSampler` yields: python's ``random``,
  numpy's global RNG and torch's CPU generator are seeded with ``sample_seed`` for the
  duration of the transform and restored afterwards. The augmentation of a sample is
  then a pure function of that seed, whatever process or worker runs it, and the
  caller's RNG streams are left exactly as they were.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from finetune.errors import UserError, describe_error

Transform = Callable[[Image.Image], Any]
Finish = Callable[[Image.Image, int], Any]  # (image decoded at a reduction, that reduction) -> the transform's output
WHITE = (255, 255, 255)
ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose applies
SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations that turn the stored image by 90 degrees
# Larger images are refused from their header, before a pixel is decoded: a few-KB PNG or GIF
# can claim 100k x 100k pixels (a decompression bomb) and exhaust a loader worker's memory.
# 128 Mpx is ~11600 x 11600 (384 MiB as 8-bit RGB), far above what a classifier is trained on.
MAX_IMAGE_PIXELS = 128 * 2**20
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's own guard (it warns above this and raises above twice it)


def open_image(path: str) -> Image.Image:
    """``Image.open`` (reads the header only), refusing an image over `MAX_IMAGE_PIXELS` before decoding.

    Raises:
        PIL.Image.DecompressionBombError: The header claims too many pixels.
        OSError, ValueError, ...: Whatever PIL raises for an unreadable file.
    """
    image = Image.open(path)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels, over the limit of {MAX_IMAGE_PIXELS} "
            "(finetune.data.dataset.MAX_IMAGE_PIXELS): a decompression bomb, or an image to downscale first"
        )
    return image


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB, whatever its mode.

    EXIF orientation is applied; transparency (RGBA, LA, palette with transparency) is
    composited on white; 16/32-bit integer and float greyscale are scaled to 8 bits
    rather than clipped; CMYK, palette, bilevel and greyscale are converted.

    Args:
        path: Image file.

    Returns:
        An RGB image, fully loaded (the file is closed).

    Raises:
        PIL.Image.DecompressionBombError: Over `MAX_IMAGE_PIXELS` (nothing is decoded).
    """
    return load_image(path, 3)


IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels a model may take -> the PIL mode that gives them


def load_image(path: str, channels: int = 3) -> Image.Image:
    """Open an image file with ``channels`` channels: 1 grey, 3 RGB (`load_rgb`), 4 RGBA.

    Grey is the luminance of the RGB image `load_rgb` gives (transparency composited on
    white, high bit depths scaled); RGBA keeps the alpha channel (opaque where there is none).
    """
    with open_image(path) as image:
        return decode(image, channels)[0]


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened image once its EXIF orientation is applied (from the header)."""
    width, height = image.size
    return (height, width) if image.getexif().get(ORIENTATION, 1) in SWAPS_SIDES else (width, height)


def decode(image: Image.Image, channels: int = 3, reduction: int = 1) -> tuple[Image.Image, int]:
    """Decode an opened image (`open_image`) upright, with ``channels`` channels (see `load_image`).

    A JPEG is decoded at 1/``reduction`` of its size (1, 2, 4 or 8: libjpeg's DCT scaling, through
    Pillow's ``draft``); other formats decode in full. The entropy decoding still reads every
    coefficient, but the inverse DCT, the colour conversion and the memory cover only the pixels
    kept, and whatever resizes the image next works on a fraction of them. ``draft`` keeps the
    EXIF data; the orientation is applied after decoding. (When a side is not a multiple of the
    reduction, a flipped or rotated image can shift by less than one reduced pixel.)

    The decoded image is returned as it is, not copied: each copy of a large image is fresh
    memory to fault in, and the two copies this used to make (``exif_transpose``, ``convert``)
    took longer than decoding a 1600 x 1200 JPEG.

    Returns:
        The image, and the reduction actually applied (1 unless the file is a JPEG).
    """
    applied = 1
    if reduction > 1:
        width, height = image.size
        drafted = image.draft(None, (max(width // reduction, 1), max(height // reduction, 1)))
        if drafted is not None:  # JPEG: the box is the full image in the reduced image's pixels
            applied = round(width / drafted[1][2])
    image.load()  # decoded here, while the caller still has the file open
    ImageOps.exif_transpose(image, in_place=True)
    if channels == 3 and image.mode == "RGB":
        return image, applied
    return convert_to_channels(image, channels), applied


class PlannedTransform(Protocol):
    """A transform that can start from an image decoded at a reduced size (`load_transformed`)."""

    def plan(self, size: tuple[int, int]) -> tuple[int, Finish]:
        """From the upright ``(width, height)``: the largest reduction the output allows, and the
        function that finishes the transform from the image decoded at the reduction applied."""


def load_transformed(path: str, transform: Transform, channels: int = 3, *,
                     reading: Callable[[], AbstractContextManager] = nullcontext) -> Any:
    """``transform(load_image(path, channels))``, decoding a JPEG reduced where ``transform`` allows it.

    A transform with a ``plan`` method (`PlannedTransform`; `finetune.data.transforms.Preprocess`)
    is asked, from the size in the file's header, how far the decode may be reduced; the random
    choices it makes then are drawn before decoding, in the same order as without the reduction.
    Any other transform gets the fully decoded image.

    Args:
        reading: Entered around each step that reads the file (not around the transform): e.g. to
            name the file in an error.
    """
    plan = getattr(transform, "plan", None)
    if plan is None:
        with reading():
            image = load_image(path, channels)
        return transform(image)
    with reading():
        opened = open_image(path)
    with opened:
        with reading():
            size = upright_size(opened)
            reduction, finish = plan(size)  # may refuse the size (a resize past MAX_IMAGE_PIXELS)
        with reading():
            image, applied = decode(opened, channels, reduction)
    return finish(image, applied)


def convert_to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Convert a PIL image of any mode to ``channels`` 8-bit channels (see `load_image`)."""
    if channels == 3:
        return convert_to_rgb(image)
    if channels == 1:
        return convert_to_rgb(image).convert("L")
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_high_depth(image)
    return image.convert("RGBA")


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see `load_rgb`)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return _scale_high_depth(image).convert("RGB")
    return image.convert("RGB")


def _scale_high_depth(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int/float) greyscale to 8-bit 'L' by range, not by clipping."""
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if pixels.max(initial=0.0) <= 1.0 else max(pixels.max(), 1.0)
    else:
        top = 255.0 if pixels.max(initial=0) <= 255 else 65535.0
    scaled = np.clip(pixels / top * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, "L")


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) RNGs for the block; restore them afterwards.

    Only the CPU generator is touched: CUDA generators the trainer uses stay as they are.
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ImageDataset(Dataset):
    """``(path, label)`` samples read as RGB (or grey, RGBA) and transformed.

    Args:
        samples: ``(path, label)`` pairs.
        transform: Applied to the PIL image; None returns the image itself.
        channels: 3 reads RGB, 1 grey, 4 RGBA (see `load_image`); the model's ``in_chans``.
        images: Opens a sample's key as an image file object (``images.open(key)``: a Hugging Face dataset's
            rows, `finetune.data.hf.HFImages`); None: the keys are file paths.

    >>> import tempfile
    >>> from torchvision.transforms.functional import to_tensor
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Image.new("RGB", (8, 6), "red").save(f"{folder}/cat.png")
    ...     ds = ImageDataset([(f"{folder}/cat.png", 0)], transform=to_tensor)
    ...     (image, label), (again, _) = ds[0], ds[(0, 1234)]  # the second seeded per sample
    >>> image.shape, label, torch.equal(image, again)
    (torch.Size([3, 6, 8]), 0, True)
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform | None = None,
                 channels: int = 3, images: Any = None) -> None:
        if channels not in IMAGE_MODES:
            raise UserError(f"model.in_chans={channels}: image files give 1 (grey), 3 (RGB) or 4 (RGBA) "
                            "channels; set model.in_chans to one of those")
        self.samples = list(samples)
        self.transform = transform
        self.channels = channels
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        naming = partial(naming_the_file, path, *(() if self.images is None else (self.images.fix,)))
        with naming():
            source = self.images.open(path) if self.images is not None else path
        if self.transform is None:
            with naming():
                return load_image(source, self.channels), label
        with seeded_rng(sample_seed) if sample_seed is not None else nullcontext():
            return load_transformed(source, self.transform, self.channels, reading=naming), label


@contextmanager
def naming_the_file(path: str, fix: str = "fix or remove it, or set data.skip_bad_images=true") -> Iterator[None]:
    """Turn whatever reading ``path`` raised into a one-line UserError that names the file (and ``fix``)."""
    try:
        yield
    except Exception as exc:  # PIL raises many types; name the file either way
        raise UserError(f"cannot read image '{path}' ({describe_error(exc)}): {fix}") from exc
