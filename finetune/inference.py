"""What evaluate, predict and export share: finding a checkpoint, rebuilding its model, its preprocessing,
and the metadata an exported file carries.

``ckpt`` may be a weights file (``best.safetensors``, ``last.safetensors``, a ``.pt`` release file), a
training state (``last.ckpt``), or a run dir (its best weights, as its manifest names them).
Exported files carry the same facts as string ``metadata`` (`export_metadata`), so a consumer
without torch (``finetune.onnx_predict``) preprocesses exactly as training evaluated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.checkpoint import Manifest, ModelMeta, load_model
from finetune.checkpoint.weights_file import MAX_CLASSES, MetadataError, check_classes, check_data_config
from finetune.errors import UserError, describe_error

EXPORT_FORMAT = "finetune.export/1"
# Keys of an exported file's metadata (ONNX metadata_props, torch.export / TorchScript extra files):
# each value a string, JSON where it is not one already.
EXPORT_KEYS = ("format", "model_name", "class_names", "data_config", "versions", "source_checkpoint")
INPUT_NAME, OUTPUT_NAME = "input", "logits"  # an exported model's one input (N, C, H, W) and output (N, classes)


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """The weights file ``ckpt`` names: itself, or a run dir's best weights (its manifest's ``best``,
    else ``checkpoints/best.safetensors``). A missing file is one line naming it."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        manifest = directory / "manifest.json"
        best = Manifest(manifest).data.get("best") if manifest.is_file() else None
        candidate = directory / (best or "best.safetensors")
        if not candidate.is_file():
            raise UserError(f"run dir '{path}' has no best weights ('{candidate}' does not exist): pass "
                            "ckpt=FILE (a .safetensors weights file or last.ckpt)")
        return candidate
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist: pass ckpt=RUN_DIR or a weights file")
    return path


def load_checkpoint(ckpt: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta, Path]:
    """The model (eval mode, on ``device``), its metadata and the file it came from."""
    path = resolve_checkpoint(ckpt)
    model, meta = load_model(path, device=device)
    return model, meta, path


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint file lives in (``RUN_DIR/checkpoints/FILE``), if it looks like one."""
    parent = checkpoint.resolve().parent
    if parent.name == "checkpoints" and (parent.parent / "split.json").is_file():
        return parent.parent
    return None


def eval_transform(meta: ModelMeta) -> Callable[[Any], torch.Tensor]:
    """The preprocessing the model was evaluated with in training: resize, centre crop, normalise."""
    return meta.transform()


def read_image(path: str | Path, meta: ModelMeta) -> Any:
    """An image file as training read it: EXIF orientation applied, converted to the model's channels."""
    return meta.read_image(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_metadata(meta: ModelMeta, *, source: Path) -> dict[str, str]:
    """What an exported file says about its model: class names, preprocessing, versions (strings)."""
    from finetune.runtime import package_versions

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in meta.data_config.items()}
    return {"format": EXPORT_FORMAT, "model_name": meta.name, "class_names": json.dumps(meta.class_names),
            "data_config": json.dumps(config), "versions": json.dumps(package_versions()),
            "source_checkpoint": json.dumps({"name": source.name, "sha256": sha256_of(source)})}


def read_export_metadata(props: dict[str, str], *, path: Path) -> dict[str, Any]:
    """The parsed metadata of an exported file, checked as a weights file's is (`check_data_config`,
    `check_classes`); a file without it, or with a field out of range, is one line naming it."""
    missing = [k for k in EXPORT_KEYS if k not in props]
    if props.get("format") != EXPORT_FORMAT or missing:
        raise UserError(f"'{path}' was not exported by finetune (missing metadata: {', '.join(missing) or 'format'}): "
                        "export it with python -m finetune.export, or evaluate the weights file instead")
    try:
        facts = {k: _json_prop(props, k) for k in ("class_names", "data_config", "versions", "source_checkpoint")}
        check_data_config(facts["data_config"])
        check_classes(facts["class_names"], num_classes=MAX_CLASSES)
        for key in ("versions", "source_checkpoint"):
            if not isinstance(facts[key], dict):
                raise MetadataError(f"{key} is a {type(facts[key]).__name__}, not a mapping")
        if not isinstance(props["model_name"], str):
            raise MetadataError("model_name is not a string")
    except MetadataError as err:
        raise UserError(f"'{path}' is refused: in its finetune metadata, {err}, which finetune never writes: the "
                        "file is damaged or forged; export it again with python -m finetune.export") from err
    return {"model_name": props["model_name"], **facts}


def _json_prop(props: dict[str, str], key: str) -> Any:
    try:
        return json.loads(props[key])
    except (TypeError, ValueError, RecursionError) as err:  # not a string; not JSON; nested too deep
        raise MetadataError(f"'{key}' is not JSON ({describe_error(err, limit=80)})") from err
