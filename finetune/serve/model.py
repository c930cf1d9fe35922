"""The model a server answers with: ``finetune.predict``'s classifier, preprocessing and outputs.

`load_served_model` loads what ``ckpt`` names on a backend: ``torch`` (the eager model, as
``finetune.predict`` runs a weights file) or ``onnx`` (onnxruntime, as ``finetune.predict`` runs an
``.onnx`` file). ``auto`` takes an ``.onnx`` file as it is, and exports a weights file to ONNX first,
verified against the eager model by ``finetune.export`` (into a temporary folder, removed once the
session has read it); when that export fails it serves with torch and says why.

An image is read from its bytes as ``finetune.predict`` reads a file (`finetune.data.dataset.load_transformed`:
EXIF orientation, the model's channels, a large JPEG decoded at a reduced size, the checkpoint's own eval
transform), and a batch's probabilities are ``finetune.predict.batch_probabilities``; labels and top-k
are ``finetune.predict.top_k_rows``. So the service answers what ``predict`` writes for the same file.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from finetune.data.dataset import MAX_IMAGE_PIXELS, load_transformed
from finetune.errors import UserError, describe_error, message_of
from finetune.inference import Classifier, checkpoint_file, eval_transform, load_classifier
from finetune.predict import batch_probabilities, top_k_rows
from finetune.serve.errors import RequestError, bad_request

log = logging.getLogger("finetune")

# What finetune.predict reads (finetune.data.folder.IMAGE_EXTENSIONS), by content: Pillow tries no other
# decoder on a stranger's bytes (no EPS, which would run Ghostscript).
SERVED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass
class ServedModel:
    """A classifier ready to answer: its backend, its preprocessing, its outputs."""

    classifier: Classifier
    backend: str  # "onnx" | "torch"
    source: Path  # the checkpoint or .onnx file the user named (a run dir resolved to its weights)

    def __post_init__(self) -> None:
        if self.classifier.multilabel:
            raise UserError(f"'{self.source}' is a task=multilabel model, and finetune.serve answers single-label "
                            "models only (yet): use python -m finetune.predict, or the exported ONNX file")
        self.transform = eval_transform(self.classifier.meta)

    @property
    def name(self) -> str:
        return self.classifier.meta.name

    @property
    def label_names(self) -> list[str]:
        return self.classifier.label_names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one preprocessed image."""
        channels, height, width = self.classifier.meta.data_config["input_size"]
        return int(channels), int(height), int(width)

    def read(self, data: bytes, *, name: str) -> torch.Tensor:
        """An encoded image file as the model's ``(C, H, W)`` input; `RequestError` (400) naming ``name``
        when it is not an image of a served format, cannot be decoded, or has too many pixels."""
        return read_image(data, self.transform, self.input_shape[0], name=name)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """``(N, classes)`` float32 probabilities of a preprocessed batch (runs the model: call it off the
        event loop)."""
        return batch_probabilities(self.classifier, batch)

    def top_k(self, probs: torch.Tensor, names: Sequence[str], *, topk: int) -> list[dict[str, Any]]:
        """``finetune.predict``'s rows (``path`` = ``names[i]``, ``label``, ``prob``, ``top2``, ...)."""
        return top_k_rows(list(names), probs, self.label_names, topk=topk)

    def labels(self, probs: torch.Tensor) -> list[str]:
        """The ``label`` column of ``predictions.csv`` for each row of ``probs``."""
        return [row["label"] for row in self.top_k(probs, [""] * len(probs), topk=1)]


def read_image(data: bytes, transform: Callable[[Any], torch.Tensor], channels: int, *, name: str) -> torch.Tensor:
    """``load_transformed`` on bytes, refusing what ``finetune.predict`` would not read, with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is lower
            with Image.open(io.BytesIO(data), formats=SERVED_FORMATS):  # the header only
                pass
    except Image.DecompressionBombError as err:
        raise too_many_pixels(name, err) from None
    except Image.UnidentifiedImageError:
        raise bad_request(f"{name} is not an image: send a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a header it cannot parse
        raise bad_request(f"{name} is not a readable image ({describe_error(err, limit=100)}): send a JPEG, "
                          "PNG, WebP, BMP, GIF or TIFF file") from None
    try:
        return load_transformed(io.BytesIO(data), transform, channels)
    except Image.DecompressionBombError as err:
        raise too_many_pixels(name, err) from None
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data: whatever the decoder raised
        raise bad_request(f"{name} cannot be decoded ({describe_error(err, limit=100)}): the file is truncated "
                          "or corrupt") from None


def too_many_pixels(name: str, err: Exception) -> RequestError:
    return bad_request(f"{name} has too many pixels ({describe_error(err, limit=120)}; the limit is "
                       f"{MAX_IMAGE_PIXELS}, as in training): downscale it first")


# ------------------------------------------------------------ loading, per backend
def load_served_model(ckpt: str | Path | None, *, backend: str = "auto", device: str = "auto") -> ServedModel:
    """The model in ``ckpt`` (a run dir, a weights file, ``last.ckpt`` or an exported ``.onnx``) on ``backend``."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {' | '.join(BACKENDS)}, got '{backend}'")
    path = checkpoint_file(ckpt)
    classifier, used = BACKENDS[backend](path, device)
    return ServedModel(classifier=classifier, backend=used, source=path)


def load_torch(path: Path, device: str) -> tuple[Classifier, str]:
    if path.suffix == ".onnx":
        raise UserError(f"backend=torch needs a weights file, and ckpt '{path}' is an ONNX file: pass "
                        "ckpt=RUN_DIR (or a .safetensors file), or backend=onnx")
    return load_classifier(path, device=device), "torch"


def load_onnx(path: Path, device: str) -> tuple[Classifier, str]:
    """An ``.onnx`` file as it is; a weights file exported first (`finetune.export.export`, verified)."""
    if path.suffix == ".onnx":
        return load_classifier(path, device=device), "onnx"
    from finetune.export import export

    with tempfile.TemporaryDirectory(prefix="finetune-serve-") as folder:
        exported = export(path, "onnx", out=Path(folder) / "model.onnx")
        log.info(f"backend onnx: exported '{path}' and checked it ({exported.check})")
        return load_classifier(exported.path, device=device), "onnx"  # onnxruntime has read the file


def load_auto(path: Path, device: str) -> tuple[Classifier, str]:
    """onnxruntime when the file is ONNX or exports to a verified one; torch otherwise (with the reason)."""
    try:
        return load_onnx(path, device)
    except UserError as err:
        if path.suffix == ".onnx":
            raise
        log.warning(f"backend=auto: serving with torch, since the ONNX export failed: {message_of(err)}")
        return load_torch(path, device)


BACKENDS: dict[str, Callable[[Path, str], tuple[Classifier, str]]] = {
    "auto": load_auto, "onnx": load_onnx, "torch": load_torch}
