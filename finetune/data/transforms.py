"""Preprocessing from the backbone's pretrained data config (timm's, as it resolves it).

The data config is what ``timm.data.resolve_data_config({}, model=model)`` returns:
input size, mean, std, interpolation, crop fraction and crop mode. `effective_data_config`
applies ``data.img_size`` to it and fills defaults; the result is what a weights file
stores, so that the same preprocessing can be rebuilt from the file alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from timm.data import create_transform
from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from finetune.errors import UserError


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

    Returns:
        A callable from an RGB PIL image to a ``(C, H, W)`` float tensor.
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
        return create_transform(is_training=False, **common)
    return create_transform(
        is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter, auto_augment=auto_augment, **common
    )
