"""Preprocessing from the backbone's pretrained data config (timm's, as it resolves it).

The data config is what ``timm.data.resolve_data_config({}, model=model)`` returns:
input size, mean, std, interpolation, crop fraction and crop mode. `effective_data_config`
applies ``data.img_size`` to it and fills defaults; the result is what a weights file
stores, so that the same preprocessing can be rebuilt from the file alone.

`build_transforms` returns timm's transform wrapped in a `Preprocess`: called on a PIL image it
is timm's transform, unchanged; its ``plan`` lets `finetune.data.dataset.load_transformed`
decode a JPEG at 1/2, 1/4 or 1/8 of its size when the output needs no more pixels than that.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F

from finetune.data.dataset import MAX_IMAGE_PIXELS
from finetune.errors import UserError

# ``data.augment``: the train transform's settings per preset (timm's create_transform arguments); any of
# data.crop_scale, crop_ratio, hflip, color_jitter, auto_augment, random_erase set in the config overrides its
# preset's value. "light" is timm's default train transform, the behaviour before presets existed.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0, "color_jitter": 0.0, "auto_augment": None,
             "re_prob": 0.0},
    "light": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": 0.4, "auto_augment": None,
              "re_prob": 0.0},
    # TrivialAugment (Mueller & Hutter 2021): one op per image at a magnitude drawn uniformly (timm: n1, mstd > 100)
    "medium": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": 0.4,
               "auto_augment": "rand-n1-m10-mstd101-inc1", "re_prob": 0.25},
    # timm's ImageNet recipe (RandAugment m9, two ops, and random erasing), erasing more often
    "heavy": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": 0.4,
              "auto_augment": "rand-m9-n2-mstd0.5-inc1", "re_prob": 0.5},
}


def augment_settings(preset: str, **overrides: Any) -> dict[str, Any]:
    """The train transform's settings: ``preset``'s (`AUGMENT_PRESETS`), with every override that is not None
    in its place; ``auto_augment="none"`` switches a preset's auto-augment off.

    >>> augment_settings("medium", hflip=0.0, auto_augment="none", scale=[0.35, 1.0])["auto_augment"]
    >>> augment_settings("heavy", scale=[0.35, 1.0])["scale"], augment_settings("none")["re_prob"]
    ((0.35, 1.0), 0.0)
    """
    if preset not in AUGMENT_PRESETS:
        raise UserError(f"data.augment '{preset}' is not a preset: use {', '.join(AUGMENT_PRESETS)}")
    settings = dict(AUGMENT_PRESETS[preset])
    for key, value in overrides.items():
        if value is not None:
            settings[key] = tuple(value) if key in ("scale", "ratio") else value
    if settings["auto_augment"] == "none":
        settings["auto_augment"] = None
    return settings


REDUCTIONS = (8, 4, 2, 1)  # the scales libjpeg decodes a JPEG at (Pillow's Image.draft), largest first


def effective_data_config(data_config: Mapping[str, Any], img_size: int | None) -> dict[str, Any]:
    """The data config actually used: ``img_size`` applied, defaults filled, plain types.

    Args:
        data_config: A timm data config (``input_size`` as ``(C, H, W)``, ...).
        img_size: Square input side overriding ``input_size``; None keeps the model's.

    Returns:
        ``input_size`` (list ``[C, H, W]``), ``mean``, ``std`` (lists), ``interpolation``,
        ``crop_pct``, ``crop_mode``: JSON-serialisable, and accepted back by
        `build_transforms`.

    Raises:
        UserError: ``img_size`` is not a positive integer.
    """
    channels, height, width = _input_size(data_config)
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise UserError(f"data.img_size must be a positive integer or null, got '{img_size}'")
        height = width = img_size
    return {
        "input_size": [channels, height, width],
        "mean": [float(v) for v in data_config.get("mean") or IMAGENET_DEFAULT_MEAN],
        "std": [float(v) for v in data_config.get("std") or IMAGENET_DEFAULT_STD],
        "interpolation": str(data_config.get("interpolation") or "bilinear"),
        "crop_pct": float(data_config.get("crop_pct") or DEFAULT_CROP_PCT),
        "crop_mode": str(data_config.get("crop_mode") or "center"),
    }


def _input_size(data_config: Mapping[str, Any]) -> tuple[int, int, int]:
    size = data_config.get("input_size", (3, 224, 224))
    if isinstance(size, int):
        return 3, size, size
    size = [int(v) for v in size]
    return (3, *size) if len(size) == 2 else tuple(size)


def build_transforms(
    data_config: Mapping[str, Any],
    *,
    img_size: int | None,
    train: bool,
    scale: tuple[float, float] | None = None,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    auto_augment: str | None = None,
    ratio: tuple[float, float] | None = None,
    re_prob: float = 0.0,
) -> Callable[[Any], Any]:
    """timm's train augmentation or eval resize + centre crop, to a normalised tensor.

    Args:
        data_config: A timm data config (see `effective_data_config`).
        img_size: Square input side overriding the config's; None keeps it.
        train: Random-resized crop, flip and colour jitter (True) or resize + crop by
            ``crop_pct`` (False).
        scale: Area range of the random-resized crop (timm default ``(0.08, 1.0)``).
        hflip: Horizontal-flip probability (train only).
        color_jitter: Colour-jitter strength (train only).
        auto_augment: A timm auto-augment spec, e.g. ``"rand-m9-mstd0.5"`` (train only).
        ratio: Aspect-ratio range of the random-resized crop (timm default ``(3/4, 4/3)``).
        re_prob: Random-erasing probability (train only; timm's per-pixel mode). Erasing works on the
            normalised tensor, so the loader then normalises in its workers.

    Returns:
        A callable from an RGB PIL image to a ``(C, H, W)`` float tensor (a `Preprocess`).
    """
    config = effective_data_config(data_config, img_size)
    common = {
        "input_size": tuple(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "crop_pct": config["crop_pct"],
        "crop_mode": config["crop_mode"],
    }
    if not train:
        return Preprocess(create_transform(is_training=False, **common))
    return Preprocess(create_transform(
        is_training=True, scale=scale, ratio=ratio, hflip=hflip, color_jitter=color_jitter, auto_augment=auto_augment,
        re_prob=re_prob, re_mode="pixel", **common
    ))


def largest_reduction(available: tuple[float, float], needed: tuple[int, int]) -> int:
    """The largest JPEG reduction ``r`` (8, 4, 2) with ``available / r >= needed`` in both dimensions, else 1.

    >>> largest_reduction((1600, 1200), (313, 235)), largest_reduction((500, 375), (313, 235))
    (4, 1)
    """
    return next((r for r in REDUCTIONS if available[0] / r >= needed[0] and available[1] / r >= needed[1]), 1)


class Preprocess:
    """timm's transform, which can also start from a JPEG decoded at a reduced size.

    Called on a PIL image, it is ``transform`` unchanged. ``plan(size)`` serves
    `finetune.data.dataset.load_transformed`: when the transform's first step is timm's random
    resized crop (training) or a shorter-side resize (evaluation), it says how far the decode may
    be reduced, and finishes the transform from the reduced image.

    The rule is the same for both: the region the first step turns into the output must keep at
    least as many pixels as the output, in each dimension, after the reduction. The output is
    then still a downscale (never an upscale) of the decoded pixels, and differs from the full
    decode only by how the downscaling filters (libjpeg's scaled IDCT, then the resize's filter,
    instead of the resize's filter alone): tests/test_data_fast.py measures it.

    - Training: the crop box is drawn first, from the header's size, with the same random draws as
      timm's crop (``get_params``, then the interpolation when it is random), so the box is the
      one the full decode would get, and the reduction is chosen for that box: a small crop of a
      large image keeps the full resolution, a large crop is decoded reduced. (A fixed rule for
      every sample would have to assume the smallest crop, ``min scale`` of the area at the
      narrowest aspect ratio: 1 / sqrt(0.08 * 3/4) = 4.1x the output side for timm's default scale,
      which no 1600 x 1200 photo reaches at 224 px.)
    - Evaluation: the resize target (shorter side ``img_size / crop_pct``, or both sides) is
      computed from the full size, as torchvision computes it; the reduced image is resized to
      exactly that size, so the centre crop takes the same region.

    With no reduction (a small image, or not a JPEG) the result is bit-identical to ``transform``.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform
        steps = list(getattr(transform, "transforms", ()))
        first = steps[0] if steps else None
        if type(first) is RandomResizedCropAndInterpolation:
            self.kind = "crop"
        elif type(first) is transforms.Resize and first.max_size is None and len(_as_list(first.size)) in (1, 2):
            self.kind = "resize"
        else:
            self.kind = None  # anything else: decoded in full
        self.first, self.rest = first, transforms.Compose(steps[1:])

    def without_normalize(self) -> tuple[Preprocess, torch.Tensor, torch.Tensor] | None:
        """This transform ending in an 8-bit ``(C, H, W)`` tensor, and the ``mean`` and ``std`` (each
        ``(C, 1, 1)``) it then leaves to `normalize_batch`; None unless it ends in timm's
        ``MaybeToTensor`` + ``Normalize``. (Sending 8-bit images from the loader workers and
        normalising the batch after collation is what timm's ``fast_collate`` + prefetcher do.)"""
        steps = list(getattr(self.transform, "transforms", ()))
        if len(steps) < 2 or type(steps[-2]) is not MaybeToTensor or type(steps[-1]) is not transforms.Normalize:
            return None
        normalize = steps[-1]
        shape = (-1, 1, 1)  # as torchvision's normalize views them
        mean = torch.as_tensor(normalize.mean, dtype=torch.get_default_dtype()).view(shape)
        std = torch.as_tensor(normalize.std, dtype=torch.get_default_dtype()).view(shape)
        return Preprocess(transforms.Compose([*steps[:-2], MaybePILToTensor()])), mean, std

    @property
    def transforms(self) -> list[Callable[[Any], Any]]:
        """The steps of timm's transform (``torchvision.transforms.Compose.transforms``)."""
        return self.transform.transforms

    def __call__(self, image: Image.Image) -> Any:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"Preprocess({self.transform!r})"

    def plan(self, size: tuple[int, int]) -> tuple[int, Callable[[Image.Image, int], Any]]:
        """From the upright ``(width, height)`` of the file: the largest reduction the output allows,
        and ``finish(image, reduction)``, the transform of the image decoded at that reduction."""
        if self.kind == "crop":
            return self._plan_crop(size)
        if self.kind == "resize":
            return self._plan_resize(size)
        return 1, lambda image, reduction: self.transform(image)

    def _plan_crop(self, size: tuple[int, int]) -> tuple[int, Callable[[Image.Image, int], Any]]:
        crop = self.first
        # timm's own draws, in its order; a 0 x H x W tensor stands in for the image (only its size is read)
        top, left, height, width = crop.get_params(torch.empty(0, size[1], size[0]), crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        out_height, out_width = crop.size
        reduction = largest_reduction((width, height), (out_width, out_height))

        def finish(image: Image.Image, applied: int) -> Any:
            if applied == 1:
                region = F.resized_crop(image, top, left, height, width, crop.size, interpolation)
            else:
                box = (left / applied, top / applied, (left + width) / applied, (top + height) / applied)
                region = image.resize((out_width, out_height), F.pil_modes_mapping[interpolation], box=box)
            return self.rest(region)

        return reduction, finish

    def _plan_resize(self, size: tuple[int, int]) -> tuple[int, Callable[[Image.Image, int], Any]]:
        resize = self.first
        out_height, out_width = resized_size(size, _as_list(resize.size))
        if out_height * out_width > MAX_IMAGE_PIXELS:  # a long, thin image: its shorter side resized up
            raise Image.DecompressionBombError(
                f"{size[0]}x{size[1]} pixels would be resized to {out_width}x{out_height} before the crop, over the "
                f"limit of {MAX_IMAGE_PIXELS} pixels (finetune.data.dataset.MAX_IMAGE_PIXELS): crop the image first")
        reduction = largest_reduction(size, (out_width, out_height))

        def finish(image: Image.Image, applied: int) -> Any:
            if applied == 1:
                return self.transform(image)
            return self.rest(image.resize((out_width, out_height), F.pil_modes_mapping[resize.interpolation]))

        return reduction, finish


def normalize_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A batch of 8-bit images ``(N, C, H, W)`` as timm's ``ToTensor`` + ``Normalize`` make each image:
    the same operations in the same order (to float, / 255, - mean, / std), so the result is the
    same to the last bit as normalising each image in the worker.

    >>> mean, std = torch.tensor([0.5]).view(-1, 1, 1), torch.tensor([0.25]).view(-1, 1, 1)
    >>> normalize_batch(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), mean, std).tolist()
    [[[[-2.0, 2.0]]]]
    """
    return images.to(dtype=torch.get_default_dtype()).div(255).sub_(mean).div_(std)


def resized_size(size: tuple[int, int], target: list[int]) -> tuple[int, int]:
    """``(height, width)`` that ``torchvision.transforms.Resize(target)`` gives an image of ``size`` (W, H).

    >>> resized_size((1600, 1200), [235]), resized_size((375, 500), [235]), resized_size((640, 480), [200, 100])
    ((235, 313), (313, 235), (200, 100))
    """
    if len(target) == 2:
        return target[0], target[1]
    width, height = size
    short, long = min(width, height), max(width, height)
    new_long = int(target[0] * long / short)
    return (target[0], new_long) if height <= width else (new_long, target[0])


def _as_list(size: int | list[int] | tuple[int, ...]) -> list[int]:
    return [size] if isinstance(size, int) else list(size)
