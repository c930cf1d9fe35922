"""Deployable weights files: the model's own ``state_dict()`` keys plus string metadata
(architecture, classes, head, preprocessing), enough to rebuild the model alone.

A weights file is often someone else's, so `load_model` trusts none of its metadata: every field
is type- and range-checked (`check_data_config`, `check_head`, `check_classes`, also used for
exported files' metadata), the model is built on the meta device and its ``state_dict()`` keys and
shapes compared with the file's tensors (read from the header, for safetensors), and only then
built for real. A file cannot make ``load_model`` allocate more than its own tensors need.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from finetune.errors import UserError, describe_error
from finetune.files import FileFacts, atomic_write_stream
from finetune.models import SOURCES, BackboneSpec, build_model
from finetune.weights.formats import check_tensor_bytes, check_zip_archive, explain_read_error, unexpected_read_error

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "finetune.weights/1"
WEIGHTS_EXTENSIONS = {"safetensors": ".safetensors", "torch": ".pt"}  # checkpoint.weights_format -> extension

# What a file's metadata may say. Each bound admits every real value with room to spare, and keeps
# what is built or resized from the metadata small.
CHANNELS = (1, 3, 4)  # finetune.data.dataset.IMAGE_MODES: the channels an image file gives (grey, RGB, RGBA)
# Input height and width: 4x timm's largest pretrained input (1024, SAM); one 4-channel float image of
# 4096 x 4096 is 256 MB, where crop_pct=0.0005 once asked for a resize to 448,000 pixels a side.
MAX_SIDE = 4096
CROP_PCT_RANGE = (0.5, 2.0)  # timm's pretrained configs use 0.875 to 1.15 (volo); the resize is side / crop_pct
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's (str_to_pil_interp)
CROP_MODES = ("center", "squash", "border")  # timm's transforms_imagenet_eval
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")  # effective_data_config's
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,843 classes, timm's largest pretrained head 115,217
HEAD_SETTINGS = ("pool", "dropout", "head", "hidden", "activation", "norm")  # build_model's head keywords
HEAD_KINDS, HEAD_NORMS = ("linear", "mlp"), (None, "batch", "layer")  # the heads a run can train
MAX_HIDDEN_LAYERS, MAX_HIDDEN = 16, 65536  # an MLP head's hidden layers and their widths
MAX_WORD = 256  # model_name, head.pool, head.activation: names, not text
MAX_EPOCH = 10**9


class MetadataError(ValueError):
    """A field of a file's metadata is malformed or out of range; the message names it and the value."""

@dataclass(frozen=True)
class ModelDescription:
    """What every weights file of a run says about its model: fixed once the data config is known."""

    spec: BackboneSpec
    class_names: list[str]
    data_config: dict[str, Any]  # the preprocessing inference must reproduce
    versions: dict[str, str]
    task: str = "multiclass"  # multilabel: sigmoid outputs, a decision threshold per class

    def metadata(self, *, monitor: str | None = None, value: float | None = None,
                 epoch: int | None = None, thresholds: list[float] | None = None) -> dict[str, str]:
        """String metadata for a weights file: enough to rebuild the model and its preprocessing (and, for a
        multi-label model, to decide: ``task`` and the per-class ``thresholds``)."""
        spec = self.spec
        task = {"task": self.task} if self.task != "multiclass" else {}
        if thresholds is not None:
            task["thresholds"] = json.dumps(thresholds)
        return task | {
            "format": WEIGHTS_FORMAT, "model_name": spec.name, "model_source": spec.source,
            "num_classes": str(spec.num_classes), "in_chans": str(spec.in_chans),
            "class_names": json.dumps(self.class_names), "head": json.dumps(spec.head),
            "classifier": spec.classifier, "first_conv": spec.first_conv,
            "architecture": spec.architecture or spec.name, "model_args": json.dumps(spec.model_args),
            "data_config": json.dumps(self.data_config), "monitor": json.dumps(monitor),
            "value": json.dumps(value), "epoch": json.dumps(epoch), "versions": json.dumps(self.versions),
        }


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of the model's own state_dict (what safetensors needs)."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str],
                 weights_format: str = "safetensors") -> FileFacts:
    """Write the model's weights with ``metadata``: safetensors, or a ``torch.save`` dict (``.pt``)."""
    tensors = portable_state_dict(model)
    if weights_format == "torch":
        payload = {"format": WEIGHTS_FORMAT, "model": tensors, "weights_metadata": metadata}
        return atomic_write_stream(path, lambda f: torch.save(payload, f))
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write_stream(path, lambda f: f.write(data))


@dataclass
class ModelMeta:
    """What a weights file says about its model, parsed."""

    name: str
    source: str
    num_classes: int
    in_chans: int
    class_names: list[str]
    head: dict[str, Any]
    data_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # monitor, value, epoch, versions
    classifier: str | None = None  # the head's module path (weights files record it)
    architecture: str = ""  # what rebuilds the model: a registry name, never a hub or folder ('' = name)
    model_args: dict[str, Any] = field(default_factory=dict)  # the architecture's arguments (an hf-hub model's)
    task: str = "multiclass"  # or multilabel (sigmoid outputs)
    thresholds: list[float] | None = None  # multilabel: a class is predicted at probability >= its threshold

    def __post_init__(self) -> None:
        self.architecture = self.architecture or self.name

    def preprocess(self, path: str | Path) -> Any:
        """An image file as the model's input, a ``(C, H, W)`` tensor, exactly as training's evaluation
        made it: read upright in the model's channels, resized, centre-cropped and normalised, a large
        JPEG decoded at a reduced size where the output needs no more pixels (`load_transformed`)."""
        from finetune.data.dataset import load_transformed

        return load_transformed(str(path), self.transform(), self.channels)

    def transform(self) -> Any:
        """The evaluation preprocessing of this model (resize, centre crop, normalise), from a PIL image
        to a ``(C, H, W)`` tensor. For a file, `preprocess` is exact; ``transform()(read_image(path))``
        decodes a large JPEG in full, which differs by about one grey level on average (a few pixels
        on sharp edges by more; measured in tests/test_data_fast.py), as choosing another resize filter would."""
        from finetune.data.transforms import build_transforms

        return build_transforms(self.data_config, img_size=None, train=False)

    def read_image(self, path: str | Path) -> Any:
        """An image file decoded in full as training reads it: EXIF orientation applied, transparency on
        white, 16-bit scaled, converted to the model's channels (a PIL image for `transform`)."""
        from finetune.data.dataset import load_image

        return load_image(str(path), channels=self.channels)

    @property
    def channels(self) -> int:
        """The model's input channels (1 grey, 3 RGB, 4 RGBA)."""
        return int(self.data_config["input_size"][0])

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], path: Path) -> ModelMeta:
        """A weights file's metadata, parsed and checked (every number in range, every field of its type).

        Raises:
            UserError: Not a finetune weights file, or metadata out of range (one line naming the field).
        """
        if not isinstance(meta, Mapping) or meta.get("format") != WEIGHTS_FORMAT:
            raise UserError(f"'{path}' is not a finetune weights file (no '{WEIGHTS_FORMAT}' metadata): pass a file "
                            "a finetune run wrote (RUN_DIR/checkpoints/best.safetensors); to train from other "
                            "weights use model.weights=PATH")
        try:
            return cls._parse(meta)
        except MetadataError as err:
            raise UserError(f"weights file '{path}' is refused: in its metadata, {err}, which finetune never writes: "
                            "the file is damaged or forged; use the weights file its run wrote "
                            "(RUN_DIR/checkpoints/best.safetensors)") from err

    @classmethod
    def _parse(cls, meta: Mapping[str, Any]) -> ModelMeta:
        num_classes = _integer_text(meta, "num_classes")
        in_chans = _one_of(_integer_text(meta, "in_chans"), CHANNELS, "in_chans")
        class_names, head, data_config = (_json_field(meta, k) for k in ("class_names", "head", "data_config"))
        check_classes(class_names, num_classes=num_classes)
        check_head(head)
        check_data_config(data_config, channels=in_chans)
        name = _word(_text(meta, "model_name"), "model_name")
        return cls(name=name, source=_one_of(_text(meta, "model_source"), SOURCES, "model_source"),
                   num_classes=num_classes, in_chans=in_chans, class_names=class_names, head=head,
                   data_config={**data_config, "input_size": tuple(data_config["input_size"])},
                   extra=_extra(meta), classifier=_text(meta, "classifier") if "classifier" in meta else None,
                   architecture=_architecture(meta, name), model_args=_model_args(meta),
                   task=_one_of(_text(meta, "task"), TASKS, "task") if "task" in meta else "multiclass",
                   thresholds=_thresholds(meta, num_classes))


TASKS = ("multiclass", "multilabel")


def _thresholds(meta: Mapping[str, Any], num_classes: int) -> list[float] | None:
    """A multi-label model's decision thresholds: one number in [0, 1] per output."""
    if "thresholds" not in meta:
        return None
    values = _json_field(meta, "thresholds")
    if not isinstance(values, list) or len(values) != num_classes:
        raise MetadataError(f"thresholds is {_quoted(values)}, not a list of {num_classes} numbers")
    for value in values:
        _in_range(value, "thresholds", 0.0, 1.0, integer=False)
    return [float(v) for v in values]


def _architecture(meta: Mapping[str, Any], name: str) -> str:
    """The name the model is rebuilt from: a library's registry name, never ``hf-hub:`` or ``local-dir:``
    (a file naming one would make loading it read a hub or a folder someone else chose)."""
    architecture = _word(_text(meta, "architecture"), "architecture") if "architecture" in meta else name
    if ":" in architecture or "/" in architecture:
        raise MetadataError(f"the model to build is {_quoted(architecture)}, a hub or folder name, not an "
                            "architecture (a file written by finetune records the architecture)")
    return architecture


def _model_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture's arguments: at most 64 plain values (checked again by the meta-device build)."""
    args = _json_field(meta, "model_args") if "model_args" in meta else {}
    plain = (str, int, float, bool, type(None))
    if not isinstance(args, dict) or len(args) > 64 or not all(
            isinstance(k, str) and (isinstance(v, plain) or isinstance(v, list) and len(v) <= 64
                                    and all(isinstance(x, plain) for x in v)) for k, v in args.items()):
        raise MetadataError(f"model_args is {_quoted(args)}, not a mapping of at most 64 plain settings")
    return args


def check_data_config(config: Any, *, channels: int | None = None) -> None:
    """Refuse a file's preprocessing (``data_config``) that is malformed or out of range.

    Args:
        config: The parsed JSON: ``input_size`` ``[C, H, W]``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``, ``crop_mode`` (what `finetune.data.effective_data_config` writes).
        channels: The model's ``in_chans``, which ``C`` must equal; None: any of `CHANNELS`.

    Raises:
        MetadataError: Naming the field and its value.
    """
    if not isinstance(config, dict):
        raise MetadataError(f"data_config is a {type(config).__name__}, not a mapping")
    missing = [k for k in DATA_CONFIG_KEYS if k not in config]
    if missing:
        raise MetadataError(f"data_config.{missing[0]} is missing")
    size = config["input_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise MetadataError(f"data_config.input_size is {_quoted(size)}, not [channels, height, width]")
    chans = _one_of(size[0], CHANNELS, "data_config.input_size[0] (channels)")
    if channels is not None and chans != channels:
        raise MetadataError(f"data_config.input_size is {_quoted(list(size))}, {chans} channel(s) where in_chans is "
                            f"{channels}")
    for side in size[1:]:
        _in_range(side, "data_config.input_size (height, width)", 1, MAX_SIDE)
    for key in ("mean", "std"):
        values = config[key]
        if not isinstance(values, (list, tuple)) or len(values) != chans:
            raise MetadataError(f"data_config.{key} is {_quoted(values)}, not {chans} numbers (one per channel)")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    key == "std" and value <= 0):
                raise MetadataError(f"data_config.{key} holds {_quoted(value)}, not a finite number"
                                    + (" above 0" if key == "std" else ""))
    _in_range(config["crop_pct"], "data_config.crop_pct", *CROP_PCT_RANGE, integer=False)
    _one_of(config["interpolation"], INTERPOLATIONS, "data_config.interpolation")
    _one_of(config["crop_mode"], CROP_MODES, "data_config.crop_mode")


def check_head(head: Any) -> None:
    """Refuse head settings (``build_model`` keywords, from a file) that are unknown or out of range.

    Raises:
        MetadataError: Naming the setting and its value.
    """
    if not isinstance(head, dict):
        raise MetadataError(f"head is a {type(head).__name__}, not a mapping")
    unknown = [k for k in head if k not in HEAD_SETTINGS]
    if unknown:
        raise MetadataError(f"head has the unknown setting {_quoted(unknown[0])} (build_model takes "
                            f"{', '.join(HEAD_SETTINGS)})")
    for key in ("pool", "activation"):
        if head.get(key) is not None:
            _word(head[key], f"head.{key}")
    _in_range(head.get("dropout", 0.0), "head.dropout", 0.0, 1.0, integer=False)
    _one_of(head.get("head", "linear"), HEAD_KINDS, "head.head")
    _one_of(head.get("norm"), HEAD_NORMS, "head.norm")
    hidden = head.get("hidden", [])
    if not isinstance(hidden, list) or len(hidden) > MAX_HIDDEN_LAYERS:
        raise MetadataError(f"head.hidden is {_quoted(hidden)}, not a list of at most {MAX_HIDDEN_LAYERS} widths")
    for width in hidden:
        _in_range(width, "head.hidden", 1, MAX_HIDDEN)


def check_classes(names: Any, *, num_classes: Any) -> None:
    """Refuse a class count out of ``[1, MAX_CLASSES]``, or class names that are not a list of strings no
    longer than it (a model may have spare outputs, never fewer than its names).

    Raises:
        MetadataError: Saying what the count or the names are.
    """
    _in_range(num_classes, "num_classes", 1, MAX_CLASSES)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MetadataError(f"class_names is {_quoted(names)}, not a list of strings")
    if len(names) > num_classes:
        raise MetadataError(f"class_names lists {len(names)} classes, more than the model's {num_classes} outputs")


def _in_range(value: Any, key: str, low: float, high: float, *, integer: bool = True) -> Any:
    """``value`` when it is an integer (or, with ``integer=False``, a number) in ``[low, high]``."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:  # NaN fails too
        raise MetadataError(f"{key} is {_quoted(value)}, not {'an integer' if integer else 'a number'} "
                            f"in [{low}, {high}]")
    return value


def _one_of(value: Any, choices: tuple, key: str) -> Any:
    if not any(type(value) is type(c) and value == c for c in choices):  # 3.0 and True are not 3
        raise MetadataError(f"{key} is {_quoted(value)}, not one of {', '.join(map(str, choices))}")
    return value


def _word(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_WORD or not value.isprintable():
        raise MetadataError(f"{key} is {_quoted(value)}, not a name of at most {MAX_WORD} printable characters")
    return value


def _quoted(value: Any) -> str:
    """``'value'`` for a message, shortened: a hostile value may be megabytes long."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= 60 else f"{text[:60]}...")


def _text(meta: Mapping[str, Any], key: str) -> str:
    if key not in meta:
        raise MetadataError(f"'{key}' is missing")
    if not isinstance(meta[key], str):
        raise MetadataError(f"'{key}' is a {type(meta[key]).__name__}, not a string")
    return meta[key]


def _integer_text(meta: Mapping[str, Any], key: str) -> int:
    text = _text(meta, key)
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise MetadataError(f"{key} is {_quoted(text)}, not an integer")
    return int(text)


def _json_field(meta: Mapping[str, Any], key: str) -> Any:
    try:
        return json.loads(_text(meta, key))
    except (ValueError, RecursionError) as err:  # JSONDecodeError; an integer too long; nesting too deep
        raise MetadataError(f"'{key}' is not JSON ({describe_error(err, limit=80)})") from err


def _extra(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``monitor``, ``value``, ``epoch`` and ``versions``, those present, each of its type."""
    extra = {k: _json_field(meta, k) for k in ("monitor", "value", "epoch", "versions") if k in meta}
    if extra.get("monitor") is not None:
        _word(extra["monitor"], "monitor")
    if extra.get("value") is not None:
        _in_range(extra["value"], "value", -math.inf, math.inf, integer=False)
    if extra.get("epoch") is not None:
        _in_range(extra["epoch"], "epoch", 0, MAX_EPOCH)
    versions = extra.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise MetadataError(f"versions is {_quoted(versions)}, not a mapping of package names to versions")
    return extra


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a fine-tuned model from a ``.safetensors`` weights file or a ``last.ckpt``.

    The metadata is checked, and the model it describes built on the meta device and compared with
    the file's tensors (keys and shapes), before the real model is built and loaded.

    Returns the model in eval mode and its metadata (class names, data config for preprocessing).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    meta, shapes, read_tensors = _read_weights(path)
    model = build_checked_model(meta, shapes, path=path)
    model.load_state_dict(read_tensors())  # strict: the file holds exactly this model's keys
    return model.to(device).eval(), meta


def build_checked_model(meta: ModelMeta, shapes: Mapping[str, tuple[int, ...]], *, path: Path) -> nn.Module:
    """The model ``meta`` describes, with random weights, once proven to have exactly the tensors ``shapes``
    lists (keys and shapes): built first on the meta device, which allocates nothing.

    A model that cannot be built on the meta device is built for real after the metadata's range checks
    and a check of its head's rows against the file (`_check_head_rows`).

    Raises:
        UserError: The model cannot be built, or differs from the file (naming the first differing tensor).
    """
    kwargs = {"name": meta.architecture, "source": meta.source, "num_classes": meta.num_classes,
              "in_chans": meta.in_chans, "input_size": meta.data_config["input_size"][-1], **meta.head,
              "model_args": meta.model_args}
    try:
        with torch.device("meta"):
            skeleton, _ = build_model(**kwargs)
    except UserError as err:
        raise UserError(f"weights file '{path}' describes a model that cannot be built here ({err}): the file is "
                        "damaged or forged, or needs another timm/torchvision version") from err
    except Exception as err:  # noqa: BLE001 - a model whose __init__ needs real tensors: range checks only
        log.debug("'%s' cannot be built on the meta device (%s): its head is checked against '%s' instead",
                  meta.name, describe_error(err), path)
        _check_head_rows(meta, shapes, path)
    else:
        _check_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes, meta=meta, path=path)
    model, _ = build_model(**kwargs)
    return model


def _check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *,
                  meta: ModelMeta, path: Path) -> None:
    """Refuse a file whose tensors differ from the model's ``state_dict()`` in a key or a shape (the first one)."""
    described = f"the {meta.source} model '{meta.name}' with {meta.num_classes} classes its metadata describes"
    for key, shape in expected.items():
        if key not in found:
            problem = f"has no tensor '{key}'"
        elif tuple(found[key]) != shape:
            problem = f"has '{key}' of shape {list(found[key])} where the model has {list(shape)}"
        else:
            continue
        raise UserError(f"weights file '{path}' does not match {described}: it {problem}; the file is damaged "
                        "or forged; use the weights file its run wrote")
    extra = next((k for k in found if k not in expected), None)
    if extra is not None:
        raise UserError(f"weights file '{path}' does not match {described}: it has the tensor {_quoted(extra)}, "
                        "which the model has not; the file is damaged or forged; use the weights file its run wrote")


def _check_head_rows(meta: ModelMeta, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """The file's head layers (the weights under the metadata's ``classifier``, in order) have the rows the
    metadata says: ``hidden`` then ``num_classes``. What the head costs is then the file's own size."""
    prefix = re.escape(meta.classifier or "")
    layers = sorted((int(m.group(1) or 0), shape[0]) for key, shape in shapes.items()
                    if (m := re.fullmatch(rf"{prefix}(?:\.(\d+))?\.weight", key)) and len(shape) in (2, 4))
    rows, expected = [r for _, r in layers], [*meta.head.get("hidden", []), meta.num_classes]
    if not meta.classifier or rows != expected:
        raise UserError(f"weights file '{path}' does not match its metadata: its classifier {_quoted(meta.classifier)} "
                        f"has layers of {rows} rows in the file, the metadata says {expected}; the file is damaged "
                        "or forged; use the weights file its run wrote")


def _read_weights(path: Path) -> tuple[ModelMeta, dict[str, tuple[int, ...]], Callable[[], dict[str, torch.Tensor]]]:
    """The checked metadata, the tensors' shapes (from the header, for safetensors: no data read) and a
    function that reads the tensors; an unreadable file is one line."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = ModelMeta.from_metadata(f.metadata() or {}, path)
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return meta, shapes, lambda: _read_safetensors(path)
        check_zip_archive(path)  # a torch.save zip: no deflated (bomb) or overlapping entries
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch, safetensors and zip errors alike: sorted by _unreadable
        raise _unreadable(path, err) from err
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"'{path}' is not a finetune weights file or training state (no 'model' tensors)")
    meta = ModelMeta.from_metadata(state.get("weights_metadata") or {}, path)
    tensors = state["model"]
    odd = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise UserError(f"weights file '{path}' is refused: its 'model' entry {_quoted(odd)} is not a named tensor; "
                        "the file is damaged or forged; use the weights file its run wrote")
    check_tensor_bytes(tensors, path)  # no stride-0 views claiming more than the file holds
    if any(".lora_A." in k for k in tensors):  # finetune.adapters: the training state keeps LoRA unmerged
        raise UserError(f"training state '{path}' holds its model with the LoRA adapter apart (adapter=lora): load "
                        f"'{path.with_name('last.safetensors')}' or best.safetensors, which hold the merged weights")
    return meta, {k: tuple(v.shape) for k, v in tensors.items()}, lambda: tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors and OS errors alike: sorted by _unreadable
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> UserError:
    """One line for a reader's failure (raise it ``from err``): the file's fault, or an unexpected error."""
    failure = explain_read_error(path, err)
    if failure.kind == "unexpected":
        return unexpected_read_error(f"'{path}' cannot be read as a finetune weights file", failure)
    return UserError(f"'{path}' cannot be read as a finetune weights file ({failure.detail}): it is "
                     "truncated, corrupt, or not a plain-tensor file (load_model never runs pickled code)")
