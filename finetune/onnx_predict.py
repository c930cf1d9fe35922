"""Classify images with a model from ``python -m finetune.export format=onnx``, without torch.

    finetune-predict-onnx MODEL.onnx IMAGE_OR_DIR_OR_GLOB... [--topk 5] [--out predictions.csv]
    python -m finetune.onnx_predict MODEL.onnx ...        (the same)

Imports no torch: numpy, Pillow and onnxruntime, and finetune's torch-free `finetune.files` (how
files are found and CSV written), so it starts in a fraction of a second on a serving machine. The model file carries what training knew (its
``metadata_props``: class names and the data config), and images are prepared exactly as
finetune evaluated them: EXIF orientation applied, converted to the model's channels
(transparency composited on white, 16-bit scaled), resized so the shorter side is
``floor(size / crop_pct)`` with PIL's own filter (what torchvision's Resize calls), centre
cropped (timm's ``squash`` and ``border`` crop modes too), scaled to [0, 1] and normalised in
float32: timm's eval transform, pixel for pixel. A JPEG at least twice the resize target is decoded
at 1/2, 1/4 or 1/8 of its size first, as finetune's loader decodes it (``read``). The CSV has the columns of
``finetune.predict``'s ``predictions.csv``: ``path,label,prob,top2,prob2,...`` (``prob``: softmax); for a
multi-label model (``task=multilabel``) ``path,labels,p:<class>,...`` (sigmoid; ``labels``: the classes at or
above the thresholds the export recorded, joined by ``;``).
Files are found as ``finetune.predict`` finds them, and the ``path`` column is written the same way;
unreadable images and other files are named on stderr and left out. Bad arguments, no image at
all, or a model file finetune did not export are one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

from finetune.cli import status_of
from finetune.errors import UserError
from finetune.files import GLOB_CHARS, atomic_write_text, csv_text, glob_files, walk_files

EXPORT_FORMAT = "finetune.export/1"  # finetune.inference.EXPORT_FORMAT
INPUT_NAME, OUTPUT_NAME = "input", "logits"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 128 * 2**20  # finetune.data.dataset: refused from the header, before decoding
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# finetune.checkpoint.weights_file's bounds on a file's data config (see check_data_config)
CHANNELS, MAX_SIDE, CROP_PCT_RANGE = (1, 3, 4), 4096, (0.5, 2.0)
CROP_MODES = ("center", "squash", "border")
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
WHITE = (255, 255, 255)
ORIENTATION, SWAPS_SIDES = 0x0112, frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image sideways
REDUCTIONS = (8, 4, 2, 1)  # finetune.data.transforms: the JPEG decode scales, largest first
# timm's interpolation names -> PIL filters (timm.data.transforms._str_to_pil_interpolation)
FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
           "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


class UsageError(UserError):
    """A problem with the arguments or the model file: one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return status_of(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    if args.out and not Path(args.out).parent.is_dir():
        raise UsageError(f"--out '{args.out}': directory '{Path(args.out).parent}' does not exist")
    session, class_names, config = load_session(args.model)
    paths = find_images(args.inputs)
    thresholds = label_thresholds(session, len(class_names))
    if thresholds is not None:  # a multi-label model: path,labels,p:<class>...
        rows = predict(session, paths, config, class_names, topk=0, batch_size=args.batch_size, thresholds=thresholds)
        write_rows(["path", "labels"] + [f"p:{name}" for name in class_names], rows, out=args.out)
        return
    topk = min(args.topk, len(class_names))
    write_csv(predict(session, paths, config, class_names, topk=topk, batch_size=args.batch_size), topk=topk,
              out=args.out)


def label_thresholds(session: onnxruntime.InferenceSession, outputs: int) -> list[float] | None:
    """A multi-label model's per-class decision thresholds (metadata ``task``/``thresholds``); None otherwise."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get("task", "multiclass") == "multiclass":
        return None
    try:
        thresholds = json.loads(props.get("thresholds", "null")) or [0.5] * outputs
        if props["task"] != "multilabel" or not isinstance(thresholds, list) or len(thresholds) != outputs or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds):
            raise ValueError(f"task {quoted(props['task'])} with thresholds {quoted(thresholds)}")
    except (ValueError, RecursionError) as err:
        raise UsageError(f"the model is refused: in its finetune metadata, {err}: the file is damaged or forged; "
                         "export it again with python -m finetune.export") from err
    return [float(t) for t in thresholds]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an .onnx file written by python -m finetune.export format=onnx")
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call (default 32)")
    parser.add_argument("--out", help="write the CSV here instead of to stdout")
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error("--topk and --batch-size must be at least 1")
    return args


def load_session(path: str) -> tuple[onnxruntime.InferenceSession, list[str], dict[str, Any]]:
    """The onnxruntime session, a name per output (the class names, then ``#i`` as finetune.predict
    names spare outputs) and the data config of an exported model."""
    if not os.path.isfile(path):
        raise UsageError(f"model '{path}' does not exist")
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for any bad file
        raise UsageError(f"'{path}' cannot be read as an ONNX model ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})") from None
    props = session.get_modelmeta().custom_metadata_map  # the export's metadata_props
    if props.get("format") != EXPORT_FORMAT or "class_names" not in props or "data_config" not in props:
        raise UsageError(f"'{path}' was not exported by finetune (no '{EXPORT_FORMAT}' metadata): export it with "
                         "python -m finetune.export ckpt=RUN_DIR format=onnx")
    try:
        config, names = json.loads(props["data_config"]), json.loads(props["class_names"])
        check_data_config(config)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"class_names is {quoted(names)}, not a list of strings")
    except (ValueError, RecursionError) as err:  # also JSONDecodeError; nesting too deep
        raise UsageError(f"'{path}' is refused: in its finetune metadata, {err}: the file is damaged or forged; "
                         "export it again with python -m finetune.export") from err
    outputs = session.get_outputs()[0].shape[-1]
    spare = outputs - len(names) if isinstance(outputs, int) else 0  # model.num_classes above the class folders
    return session, names + [f"#{i}" for i in range(len(names), len(names) + spare)], config


def check_data_config(config: Any) -> None:
    """Refuse a data config out of range: finetune's ``check_data_config`` (finetune.checkpoint.weights_file),
    copied to stay torch-free. A file is often someone else's: ``crop_pct=0.0005`` once asked for a resize
    to 448,000 pixels a side."""
    if not isinstance(config, dict) or any(k not in config for k in DATA_CONFIG_KEYS):
        raise ValueError(f"data_config is {quoted(config)}, not a mapping of {', '.join(DATA_CONFIG_KEYS)}")
    size = config["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(type(v) is int for v in size)
            and size[0] in CHANNELS and all(1 <= v <= MAX_SIDE for v in size[1:])):
        raise ValueError(f"data_config.input_size is {quoted(size)}, not [channels ({', '.join(map(str, CHANNELS))}), "
                         f"height, width (1 to {MAX_SIDE})]")
    for key in ("mean", "std"):
        values = config[key]
        if not (isinstance(values, list) and len(values) == size[0] and all(
                type(v) in (int, float) and math.isfinite(v) and (key == "mean" or v > 0) for v in values)):
            raise ValueError(f"data_config.{key} is {quoted(values)}, not {size[0]} finite numbers (one per channel)"
                             + (" above 0" if key == "std" else ""))
    crop_pct = config["crop_pct"]
    if type(crop_pct) not in (int, float) or not CROP_PCT_RANGE[0] <= crop_pct <= CROP_PCT_RANGE[1]:
        raise ValueError(f"data_config.crop_pct is {quoted(crop_pct)}, not a number in {list(CROP_PCT_RANGE)}")
    for key, choices in (("interpolation", FILTERS), ("crop_mode", CROP_MODES)):
        if not isinstance(config[key], str) or config[key] not in choices:
            raise ValueError(f"data_config.{key} is {quoted(config[key])}, not one of {', '.join(choices)}")


def quoted(value: Any) -> str:
    """``'value'`` for a message, shortened: a hostile value may be megabytes long."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= 60 else f"{text[:60]}...")


def find_images(inputs: Sequence[str]) -> list[str]:
    """The image files ``inputs`` names, as ``finetune.predict`` finds them: files, folders (recursive,
    sorted, hidden entries skipped) or globs (``**`` recursive); other files are named on stderr."""
    found: dict[Path, None] = {}
    for entry in inputs:
        found |= dict.fromkeys(expand_input(entry))
    others = [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        print(f"warning: skipped {len(others)} files that are not images: {', '.join(map(str, others[:10]))}",
              file=sys.stderr)
    images = [str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise UsageError(f"no images in {' '.join(inputs)}: give image files "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))}), folders of them or globs")
    return images


def expand_input(entry: str) -> list[Path]:
    """A file, every file under a folder, or a glob's matches (`finetune.files.walk_files` and
    `glob_files`: each real folder walked once, however many links or loops lead to it)."""
    path = Path(entry).expanduser()
    if path.is_dir():
        return sorted(Path(p) for p in walk_files(path))
    if path.is_file():
        return [path]
    matches = glob_files(str(Path(entry).expanduser())) if GLOB_CHARS & set(entry) else []
    if not matches:
        raise UsageError(f"input '{entry}' is not a file, a folder or a glob that matches anything")
    return matches


# --- preprocessing: finetune.data.dataset.load_transformed with timm's eval transform ----------------

def read(path: str, config: dict[str, Any]) -> np.ndarray:
    """The model's input for one file, as finetune's evaluation makes it (``Preprocess.plan``): when
    the transform starts with a plain resize, a JPEG is decoded at the largest reduction that keeps
    at least the resize target in both sides, then resized to the target computed from its full size."""
    target = resize_target(config)
    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS}")
        upright = (height, width) if image.getexif().get(ORIENTATION, 1) in SWAPS_SIDES else (width, height)
        size = None if target is None else bounded(target(upright), upright)  # (h, w)
        reduction = 1 if size is None else largest_reduction(upright, (size[1], size[0]))
        applied = 1
        if reduction > 1:
            drafted = image.draft(None, (max(width // reduction, 1), max(height // reduction, 1)))
            if drafted is not None:  # a JPEG: the box is the full image in the reduced image's pixels
                applied = round(width / drafted[1][2])
        image = to_channels(image, int(config["input_size"][0]))
        if applied > 1:
            image = image.resize((size[1], size[0]), FILTERS[config.get("interpolation") or "bilinear"])
    return preprocess(image, config)


def resize_target(config: dict[str, Any]) -> Any:
    """``upright (w, h) -> (h, w)`` of the eval transform's first resize when it is torchvision's plain
    ``Resize`` (``squash``; ``center`` with a square target), else None (decoded in full)."""
    _, height, width = config["input_size"]
    crop_pct, mode = config.get("crop_pct") or 0.875, config.get("crop_mode") or "center"
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode == "squash":
        return lambda upright: scale
    if mode != "border" and scale[0] == scale[1]:
        return lambda upright: shorter_side_size(upright, scale[0])
    return None


def largest_reduction(available: tuple[int, int], needed: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 with ``available / r >= needed`` in both sides (``(w, h)``), else 1."""
    return next((r for r in REDUCTIONS if available[0] / r >= needed[0] and available[1] / r >= needed[1]), 1)


def load_image(path: str, channels: int) -> Image.Image:
    """The image decoded in full with ``channels`` 8-bit channels (1 grey, 3 RGB, 4 RGBA), upright."""
    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS}")
        return to_channels(image, channels)


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """An opened image decoded, EXIF orientation applied, with ``channels`` 8-bit channels."""
    image = ImageOps.exif_transpose(image)
    if channels == 3:
        return to_rgb(image)
    if channels == 1:
        return to_rgb(image).convert("L")
    if image.mode.startswith("I") or image.mode == "F":
        image = scale_high_depth(image)
    return image.convert("RGBA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency composited on white, 16/32-bit and float scaled by range."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return scale_high_depth(image).convert("RGB")
    return image.convert("RGB")


def scale_high_depth(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if pixels.max(initial=0.0) <= 1.0 else max(pixels.max(), 1.0)
    else:
        top = 255.0 if pixels.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).round().astype(np.uint8))


def preprocess(image: Image.Image, config: dict[str, Any]) -> np.ndarray:
    """timm's eval transform for ``config`` (``transforms_imagenet_eval``), as a ``(C, H, W)`` float32 array."""
    _, height, width = config["input_size"]
    crop_pct, mode = config.get("crop_pct") or 0.875, config.get("crop_mode") or "center"
    resample = FILTERS[config.get("interpolation") or "bilinear"]
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode == "squash":
        size = scale
    elif mode == "border":  # the longer side to its target (timm's ResizeKeepRatio, longest=1)
        size = keep_ratio_size(image, scale, longest=True)
    elif scale[0] == scale[1]:  # the shorter side to the target (torchvision's Resize(int))
        size = shorter_side_size(image.size, scale[0])
    else:
        size = keep_ratio_size(image, scale, longest=False)
    if (image.height, image.width) != bounded(size, image.size):  # torchvision skips a resize to the same size
        image = image.resize((size[1], size[0]), resample)
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    fill = [round(255 * v) for v in config["mean"]] if mode == "border" else [0] * pixels.shape[-1]
    pixels = center_crop(pixels, height, width, fill=fill)
    mean, std = np.asarray(config["mean"], np.float32), np.asarray(config["std"], np.float32)
    tensor = pixels.astype(np.float32) / np.float32(255)  # torchvision's to_tensor
    return ((tensor - mean) / std).transpose(2, 0, 1)  # Normalize: (x - mean) / std in float32


def bounded(size: tuple[int, int], original: tuple[int, int]) -> tuple[int, int]:
    """``size`` (h, w), refused when a resize to it would pass `MAX_IMAGE_PIXELS` (a long, thin image whose
    shorter side is scaled up), as finetune's loader refuses it (``Preprocess._plan_resize``)."""
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"{original[0]}x{original[1]} pixels would be resized to {size[1]}x{size[0]} before the "
                         f"crop, over the limit of {MAX_IMAGE_PIXELS} pixels: crop the image first")
    return size


def shorter_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """``(h, w)`` of a ``(w, h)`` image resized to the shorter side ``short``: torchvision's
    ``_compute_resized_output_size``."""
    w, h = size
    long = int(short * max(w, h) / min(w, h))
    return (long, short) if w <= h else (short, long)


def keep_ratio_size(image: Image.Image, target: tuple[int, int], *, longest: bool) -> tuple[int, int]:
    ratio_h, ratio_w = image.height / target[0], image.width / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(image.height / ratio), round(image.width / ratio)


def center_crop(pixels: np.ndarray, height: int, width: int, *, fill: Sequence[int]) -> np.ndarray:
    """torchvision's ``center_crop`` on ``(H, W, C)``; pads with ``fill`` (per channel) where the image is smaller."""
    h, w, channels = pixels.shape
    if height > h or width > w:
        padded = np.empty((max(h, height), max(w, width), channels), np.uint8)
        padded[...] = np.asarray(fill, np.uint8)
        top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
        padded[top:top + h, left:left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)
    return pixels[top:top + height, left:left + width]


# --- inference and output ---------------------------------------------------------------------------

def predict(session: onnxruntime.InferenceSession, paths: list[str], config: dict[str, Any],
            class_names: list[str], *, topk: int, batch_size: int,
            thresholds: list[float] | None = None) -> list[list[Any]]:
    """One CSV row per readable image; an unreadable one is named on stderr and left out."""
    rows = []
    for start in range(0, len(paths), batch_size):
        batch, arrays = [], []
        for path in paths[start:start + batch_size]:
            try:
                arrays.append(read(path, config))
                batch.append(path)
            except Exception as err:  # noqa: BLE001 - PIL raises many types for unreadable files
                print(f"warning: skipped '{path}': {type(err).__name__}: {err}", file=sys.stderr)
        if batch:
            logits = session.run([OUTPUT_NAME], {INPUT_NAME: np.stack(arrays)})[0]
            if thresholds is not None:
                rows += [label_set_row(path, p, class_names, thresholds) for path, p in zip(batch, sigmoid(logits))]
            else:
                rows += [row(path, p, class_names, topk) for path, p in zip(batch, softmax(logits), strict=True)]
    return rows


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # float32, as torch's softmax
    return shifted / shifted.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))


def label_set_row(path: str, probs: np.ndarray, class_names: list[str], thresholds: list[float]) -> list[Any]:
    """``path``, the classes at or above their threshold joined by ``;``, then each class's probability."""
    chosen = [name for name, p, t in zip(class_names, probs.tolist(), thresholds) if p >= t]
    return [path, ";".join(chosen)] + [f"{p:.6f}" for p in probs.tolist()]


def row(path: str, probs: np.ndarray, class_names: list[str], topk: int) -> list[Any]:
    order = np.argsort(-probs, kind="stable")[:topk]  # ties: the lower class index first, as torch.topk
    cells: list[Any] = [path]
    for index in order:
        cells += [class_names[index], f"{probs[index]:.6f}"]
    return cells


def header(topk: int) -> list[str]:
    """``path,label,prob,top2,prob2,...``: the columns of finetune.predict's predictions.csv."""
    return ["path", "label", "prob"] + [name for k in range(2, topk + 1) for name in (f"top{k}", f"prob{k}")]


def write_csv(rows: list[list[Any]], *, topk: int, out: str | None) -> None:
    """The CSV to stdout, or to ``out`` (written whole: a temporary file beside it, renamed when
    complete); cells as `finetune.files.csv_text` writes them (RFC 4180, no formula-like text)."""
    write_rows(header(topk), rows, out=out)


def write_rows(columns: list[str], rows: list[list[Any]], *, out: str | None) -> None:
    text = csv_text([columns, *rows])
    if out is None:
        sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
