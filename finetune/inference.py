"""Inference: what evaluate, predict and export share. Finding a checkpoint, rebuilding its model and its
preprocessing, a `Classifier` (an eager model or an ONNX session) on a device, the evaluation loader,
and the metadata an exported file carries.

``ckpt`` may be a weights file (``best.safetensors``, ``last.safetensors``, a ``.pt`` release file), a
training state (``last.ckpt``), or a run dir (its best weights, as its manifest names them).
Exported files carry the same facts as string ``metadata`` (`export_metadata`), so a consumer
without torch (``finetune.onnx_predict``) preprocesses exactly as training evaluated.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.checkpoint import Manifest, ModelMeta, load_model
from finetune.checkpoint.weights_file import MAX_CLASSES, MetadataError, check_classes, check_data_config
from finetune.errors import UserError, describe_error
from finetune.files import check_inside, file_digest
from finetune.remote import fetch_checkpoint, in_cache, is_remote
from finetune.runtime import AUTOCAST_DTYPES, resolve_device

log = logging.getLogger("finetune")

EXPORT_FORMAT = "finetune.export/1"
# Keys of an exported file's metadata (ONNX metadata_props, torch.export / TorchScript extra files):
# each value a string, JSON where it is not one already.
EXPORT_KEYS = ("format", "model_name", "class_names", "data_config", "versions", "source_checkpoint")
INPUT_NAME, OUTPUT_NAME = "input", "logits"  # an exported model's one input (N, C, H, W) and output (N, classes)


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """The weights file ``ckpt`` names: itself, or a run dir's best weights (its manifest's ``best``,
    else ``checkpoints/best.safetensors``). A missing file is one line naming it."""
    if is_remote(str(ckpt)):
        return fetch_checkpoint(str(ckpt))
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


def output_dir(out: str | Path | None, *, checkpoint: Path, kind: str) -> Path:
    """Where evaluate (``kind`` ``eval``) or predict (``predict``) write: ``out`` when given (made if
    missing); else Hydra's run dir when one was given (``hydra.run.dir=DIR``); else a new folder beside
    the run the checkpoint belongs to, ``RUN_DIR/<kind>/<date_time>/`` (beside a loose file:
    ``DIR/<kind>/<date_time>/``; for one fetched by URL, the working directory), never a link out of it."""
    from hydra.core.hydra_config import HydraConfig

    if out is not None:
        path = Path(out).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    if HydraConfig.initialized() and Path(HydraConfig.get().runtime.output_dir).resolve() != Path.cwd().resolve():
        return Path(HydraConfig.get().runtime.output_dir)
    home = run_dir_of(checkpoint) or (Path.cwd() if in_cache(checkpoint) else checkpoint.resolve().parent)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1000):
        path = home / kind / (stamp if n == 0 else f"{stamp}_{n}")
        check_inside(home, path / "x")  # RUN_DIR/<kind> is not a link out of the run dir (someone else's, maybe)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise UserError(f"'{home / kind}' already holds 1000 folders named {stamp}: pass out=DIR")


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
    return file_digest(path, "sha256")


def export_metadata(meta: ModelMeta, *, source: Path) -> dict[str, str]:
    """What an exported file says about its model: class names, preprocessing, versions (strings)."""
    from finetune.runtime import package_versions

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in meta.data_config.items()}
    return {"format": EXPORT_FORMAT, "model_name": meta.name, "class_names": json.dumps(meta.class_names),
            "data_config": json.dumps(config), "versions": json.dumps(package_versions()),
            "source_checkpoint": json.dumps({"name": source.name, "sha256": sha256_of(source)})} | task_metadata(meta)


def task_metadata(meta: ModelMeta) -> dict[str, str]:
    """A multi-label model's ``task`` and decision ``thresholds`` (nothing for a single-label one)."""
    if meta.task == "multiclass":
        return {}
    return {"task": meta.task, "thresholds": json.dumps(meta.thresholds or [0.5] * meta.num_classes)}


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
        facts |= exported_task(props)
    except MetadataError as err:
        raise UserError(f"'{path}' is refused: in its finetune metadata, {err}, which finetune never writes: the "
                        "file is damaged or forged; export it again with python -m finetune.export") from err
    return {"model_name": props["model_name"], **facts}


def exported_task(props: dict[str, str]) -> dict[str, Any]:
    """``task`` and ``thresholds`` of an exported file, checked (a multi-label model has a threshold per class)."""
    task = props.get("task", "multiclass")
    if task not in ("multiclass", "multilabel"):
        raise MetadataError(f"task is {task!r:.40}, not multiclass or multilabel")
    thresholds = _json_prop(props, "thresholds") if "thresholds" in props else None
    if thresholds is not None and not (isinstance(thresholds, list) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0 for t in thresholds)):
        raise MetadataError("thresholds is not a list of numbers in [0, 1]")
    return {"task": task, "thresholds": thresholds}


def _json_prop(props: dict[str, str], key: str) -> Any:
    try:
        return json.loads(props[key])
    except (TypeError, ValueError, RecursionError) as err:  # not a string; not JSON; nested too deep
        raise MetadataError(f"'{key}' is not JSON ({describe_error(err, limit=80)})") from err


# ------------------------------------------------------------ a classifier: eager or ONNX
@dataclass
class Classifier:
    """Logits of preprocessed batches, from an eager model or an ONNX session, with the metadata
    (class names, preprocessing) of the file it came from."""

    meta: ModelMeta
    path: Path  # the file the weights came from (a run dir resolved to its best weights)
    num_classes: int  # outputs per image (``model.num_classes`` may exceed the class names)
    run: Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) float32 on the CPU -> float32 logits
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def label_names(self) -> list[str]:
        """A name per output: the class names, then ``#i`` for spare outputs (as the confusion image)."""
        names = list(self.meta.class_names)
        return names + [f"#{i}" for i in range(len(names), self.num_classes)]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    @property
    def multilabel(self) -> bool:
        return self.meta.task == "multilabel"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes; sigmoid per class for a multi-label model."""
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(dim=1)

    def thresholds(self, override: Any = None) -> list[float]:
        """A multi-label model's decision thresholds: ``override`` (a number for every class, a list, or a file
        with one number per line), else those tuned on its validation set, else 0.5."""
        if override is None:
            return list(self.meta.thresholds or [0.5] * self.num_classes)
        return parse_thresholds(override, self.num_classes)


def parse_thresholds(value: Any, num_classes: int) -> list[float]:
    """``thresholds=``: a number in [0, 1] for every class, a list of one per class, or a file of them (one a line).

    >>> parse_thresholds(0.3, 2), parse_thresholds([0.2, 0.7], 2)
    ([0.3, 0.3], [0.2, 0.7])
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, str) and not _is_number(value):
        from finetune.files import read_text_bounded

        text = read_text_bounded(Path(value).expanduser(), max_bytes=16 << 20, what="thresholds file")
        value = [line.strip() for line in text.splitlines() if line.strip()]
    values = [value] * num_classes if not isinstance(value, list) else value
    if len(values) != num_classes or not all(_is_number(v) and 0.0 <= float(v) <= 1.0 for v in values):
        raise UserError(f"thresholds must be a number in [0, 1], a list of {num_classes} of them (one per class) or "
                        f"a file with one per line, got '{value if not isinstance(value, list) else values[:8]}'")
    return [float(v) for v in values]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def checkpoint_file(ckpt: str | Path | None) -> Path:
    """The file ``ckpt`` names: an exported ``.onnx`` file, or what `resolve_checkpoint` finds."""
    if ckpt is None or str(ckpt) == "":
        raise UserError("ckpt is required: pass ckpt=RUN_DIR (its best weights), ckpt=FILE.safetensors, "
                        "ckpt=last.ckpt or ckpt=MODEL.onnx")
    if is_remote(str(ckpt)):
        return fetch_checkpoint(str(ckpt))
    path = Path(ckpt).expanduser()
    return path if path.suffix == ".onnx" and path.is_file() else resolve_checkpoint(path)


def load_classifier(ckpt: str | Path | None, *, device: str = "auto", precision: str = "32",
                    channels_last: bool = False) -> Classifier:
    """The classifier in ``ckpt`` (see `checkpoint_file`) on ``device``; ``precision`` (``32``, ``bf16``,
    ``16``) and ``channels_last`` as training evaluated (eager models only)."""
    path = checkpoint_file(ckpt)
    target = resolve_device(device, key="device")
    if path.suffix == ".onnx":
        return load_onnx(path, device=target)
    model, meta, path = load_checkpoint(path, device=target)
    dtype = autocast_dtype(precision, target)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def run(batch: torch.Tensor) -> torch.Tensor:  # the lines of Trainer.evaluate that compute the logits
        inputs = batch.to(target, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device_type=target.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = model(inputs)
        return logits.float()

    return Classifier(meta=meta, path=path, num_classes=meta.num_classes, run=run, device=target)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if str(precision) not in AUTOCAST_DTYPES:
        raise UserError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got '{precision}'")
    dtype = AUTOCAST_DTYPES[str(precision)]
    if dtype is torch.float16 and device.type != "cuda":
        log.warning(f"precision 16 (fp16) needs CUDA: running in 32-bit on {device}")
        return None
    return dtype


def load_onnx(path: Path, *, device: torch.device) -> Classifier:
    """An exported ONNX file run by onnxruntime; its class names and preprocessing from its metadata."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"'{path}' is an ONNX file, which needs onnxruntime: pip install 'finetune[onnx]'") from None
    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider",) if device.type == "cuda" and p in available]
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers + ["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's own error types: one clear line
        raise UserError(f"'{path}' cannot be read as an ONNX model ({describe_error(err)}): it is truncated or "
                        "corrupt; export it again with python -m finetune.export") from None
    meta = onnx_meta(read_export_metadata(session.get_modelmeta().custom_metadata_map, path=path),
                     outputs=session.get_outputs()[0].shape[-1], path=path)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        try:
            (logits,) = session.run([output_name], {input_name: batch.float().contiguous().numpy()})
        except Exception as err:  # noqa: BLE001 - e.g. a fixed batch size
            raise UserError(f"ONNX model '{path}' rejected a batch of shape {tuple(batch.shape)} "
                            f"({describe_error(err)}): export it with a dynamic batch axis "
                            "(python -m finetune.export does), or use batch_size=1") from None
        return torch.from_numpy(logits).float()

    return Classifier(meta=meta, path=path, num_classes=meta.num_classes, run=run)


def onnx_meta(exported: dict[str, Any], *, outputs: Any, path: Path) -> ModelMeta:
    """An exported file's metadata (`read_export_metadata`, which checked it) as a `ModelMeta`: class names,
    preprocessing. The class count is the model's output width (or, when that is symbolic, the names')."""
    data_config = dict(exported["data_config"], input_size=tuple(exported["data_config"]["input_size"]))
    num_classes = outputs if isinstance(outputs, int) else len(exported["class_names"])
    try:
        check_classes(exported["class_names"], num_classes=num_classes)
    except MetadataError as err:
        raise UserError(f"'{path}' is refused: {err} (its model has {outputs!r:.40} outputs): the file is damaged or "
                        "forged; export it again with python -m finetune.export") from err
    return ModelMeta(name=exported["model_name"], source="onnx", in_chans=int(data_config["input_size"][0]),
                     num_classes=num_classes, class_names=list(exported["class_names"]), head={},
                     data_config=data_config,
                     extra={"versions": exported["versions"], "source_checkpoint": exported["source_checkpoint"]},
                     task=exported.get("task", "multiclass"), thresholds=exported.get("thresholds"))


# ------------------------------------------------------------ the evaluation loader
def eval_loader(samples: Sequence[tuple[str, int]], meta: ModelMeta, *, batch_size: int,
                num_workers: int | str = 0, images: Any = None) -> DataLoader:
    """Training's validation loader over ``(path, label)`` samples: its `ImageDataset` (images read upright
    by their EXIF orientation, in the model's channels, decoded as training decodes them), the checkpoint's
    eval transform, and batches of ``batch_size`` in order (`EvalBatches`). ``images``: reads a sample's key
    where it is not a path (a Hugging Face dataset's rows, `finetune.data.hf.HFImages`)."""
    from finetune.data.dataset import ImageDataset
    from finetune.data.loaders import worker_context
    from finetune.data.sampling import EvalBatches

    workers = worker_count(num_workers)
    dataset = ImageDataset(samples, eval_transform(meta), channels=int(meta.data_config["input_size"][0]),
                           images=images)
    return DataLoader(dataset, batch_sampler=EvalBatches(len(samples), batch_size), num_workers=workers,
                      multiprocessing_context=worker_context() if workers else None)


def worker_count(num_workers: int | str) -> int:
    """Loader processes: a count, or ``auto`` as ``data.num_workers=auto`` resolves it for training."""
    if num_workers == "auto":
        from finetune.data.loaders import resolve_num_workers

        return resolve_num_workers(num_workers)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be a non-negative integer or auto, got '{num_workers}'")
    return num_workers
