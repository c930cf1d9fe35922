"""Deployable weights files: the model's own ``state_dict()`` keys plus string metadata
(architecture, classes, head, preprocessing), enough to rebuild the model alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from finetune.files import FileFacts, atomic_write_stream
from finetune.errors import UserError, describe_error
from finetune.models import BackboneSpec, build_model

WEIGHTS_FORMAT = "finetune.weights/1"
WEIGHTS_EXTENSIONS = {"safetensors": ".safetensors", "torch": ".pt"}  # checkpoint.weights_format -> extension

@dataclass(frozen=True)
class ModelDescription:
    """What every weights file of a run says about its model: fixed once the data config is known."""

    spec: BackboneSpec
    class_names: list[str]
    data_config: dict[str, Any]  # the preprocessing inference must reproduce
    versions: dict[str, str]

    def metadata(self, *, monitor: str | None = None, value: float | None = None,
                 epoch: int | None = None) -> dict[str, str]:
        """String metadata for a weights file: enough to rebuild the model and its preprocessing."""
        spec = self.spec
        return {
            "format": WEIGHTS_FORMAT, "model_name": spec.name, "model_source": spec.source,
            "num_classes": str(spec.num_classes), "in_chans": str(spec.in_chans),
            "class_names": json.dumps(self.class_names), "head": json.dumps(spec.head),
            "classifier": spec.classifier, "first_conv": spec.first_conv,
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
    def from_metadata(cls, meta: dict[str, str], path: Path) -> ModelMeta:
        if meta.get("format") != WEIGHTS_FORMAT:
            raise UserError(f"'{path}' is not a finetune weights file (no '{WEIGHTS_FORMAT}' metadata): pass a file "
                            "a finetune run wrote (RUN_DIR/checkpoints/best.safetensors); to train from other "
                            "weights use model.weights=PATH")
        data_config = json.loads(meta["data_config"])
        data_config["input_size"] = tuple(data_config["input_size"])
        return cls(name=meta["model_name"], source=meta["model_source"], num_classes=int(meta["num_classes"]),
                   in_chans=int(meta["in_chans"]), class_names=json.loads(meta["class_names"]),
                   head=json.loads(meta["head"]), data_config=data_config,
                   extra={k: json.loads(meta[k]) for k in ("monitor", "value", "epoch", "versions") if k in meta})


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a fine-tuned model from a ``.safetensors`` weights file or a ``last.ckpt``.

    Returns the model in eval mode and its metadata (class names, data config for preprocessing).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    meta, tensors = _read_weights(path)
    input_size = meta.data_config["input_size"][-1]
    model, _ = build_model(name=meta.name, source=meta.source, num_classes=meta.num_classes,
                           in_chans=meta.in_chans, input_size=input_size, **meta.head)
    model.load_state_dict(tensors)  # strict: the file holds exactly this model's keys
    return model.to(device).eval(), meta


def _read_weights(path: Path) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    """The metadata and tensors of a weights file or training state; an unreadable file is one line."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = ModelMeta.from_metadata(f.metadata() or {}, path)
                return meta, {k: f.get_tensor(k) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch, safetensors and zip errors alike: one clear line
        raise UserError(f"'{path}' cannot be read as a finetune weights file ({describe_error(err)}): it is "
                        "truncated, corrupt, or not a plain-tensor file (load_model never runs pickled code)") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"'{path}' is not a finetune weights file or training state (no 'model' tensors)")
    return ModelMeta.from_metadata(state.get("weights_metadata") or {}, path), state["model"]
