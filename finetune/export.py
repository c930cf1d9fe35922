"""``python -m finetune.export ckpt=PATH format=onnx|torch_export|torchscript|safetensors out=PATH``.

A trained model as one deployable file, checked against the eager model before anyone can use it:
the file is written beside ``out`` under a temporary name, loaded back the way a consumer would
(onnxruntime, ``torch.export.load``, ``torch.jit.load``, ``finetune.load_model``), run at batch 1
and 3 on the checkpoint's own preprocessing of images, and moved onto ``out`` only when every
logit is within ``atol`` of the eager model's and the argmax is the same. A failed check leaves
nothing at ``out`` (a file already there is untouched).

Every file carries the facts a consumer needs (class names, preprocessing, versions): ONNX in its
``metadata_props``, torch.export and TorchScript in an extra file ``finetune.json``
(`finetune.inference.export_metadata`), the safetensors release file in the same metadata as the
checkpoint's, so ``finetune.load_model`` rebuilds it.

The example needs a trained run's directory (not run as a doctest):

>>> from finetune.export import export
>>> export("outputs/2026-11-28/10-00-00", "onnx").path  # doctest: +SKIP
PosixPath('outputs/2026-11-28/10-00-00/export/best.onnx')
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from finetune.checkpoint import ModelMeta, load_model, save_weights
from finetune.cli import command, exit_on_user_error, override
from finetune.files import check_inside, scratch_path, staged_path
from finetune.errors import UserError, describe_error
from finetune.remote import in_cache
from finetune.runtime import resolve_device
from finetune.inference import (INPUT_NAME, OUTPUT_NAME, eval_transform, export_metadata, load_checkpoint,
                                resolve_checkpoint, run_dir_of)

EXTRA_FILE = "finetune.json"  # torch.export / TorchScript: the extra file holding export_metadata(...) as JSON
CHECK_BATCHES = (1, 3)  # the exported file must match the eager model at both: the batch dimension is dynamic
QUANTIZE = (None, "int8")  # quantize=: null (fp32), or int8 (format=onnx: `finetune.quantize`)
EXAMPLE_BATCH = 2  # traced at 2, so that no exporter can specialise the batch to 1
ONNX_EXTRA = "pip install 'finetune[onnx]'"

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Format:
    """One export format: how to write it, how a consumer loads it back, and how to use it."""

    suffix: str  # of the default file name
    write: Callable[[nn.Module, torch.Tensor, Path, dict[str, str], int | None], None]
    load: Callable[[Path, torch.device], tuple[Runner, dict[str, str]]]  # -> (run, the file's metadata)
    describe: Callable[[ModelMeta, Path], dict[str, str]]  # the metadata the file carries, from the checkpoint
    usage: str  # how to use the file: {py} is its path as a Python string, {onnx_predict} and {predict} commands
    exact: bool = False  # must equal the eager model bit for bit, whatever atol says


@dataclass(frozen=True)
class Exported:
    """What `export` wrote."""

    path: Path
    format: str
    bytes: int
    check: str  # the verification line, e.g. "onnx vs eager: batch 1 max|diff| 2.1e-07, ..."

    def report(self) -> str:
        path = str(self.path)
        usage = FORMATS[self.format].usage.format(py=repr(path), onnx_predict=command("finetune.onnx_predict", path),
                                                  predict=command("finetune.predict", override("ckpt", path), "inputs=DIR"))
        return f"wrote {self.path} ({self.bytes / 1e6:.2f} MB, {self.format})\n{self.check}\nuse it: {usage}"


def export(ckpt: str | Path, format: str = "onnx", out: str | Path | None = None, *,
           opset: int | None = None, atol: float = 1e-4, device: str = "cpu", quantize: str | None = None,
           calib_images: int = 128) -> Exported:
    """Export the model of ``ckpt`` (a run dir, a weights file or ``last.ckpt``) to ``format``, verified.

    ``out``: the file to write; an existing directory gets the default name; None writes
    ``RUN_DIR/export/<checkpoint stem><suffix>`` (``DIR/export/...`` beside a loose checkpoint).
    ``quantize="int8"`` (format=onnx): the verified fp32 ONNX model quantized by onnxruntime, calibrated on
    ``calib_images`` training images and checked against fp32 on the run's validation images
    (`finetune.quantize`). Returns what was written; raises `UserError` (nothing written) on bad input or
    a failed check.
    """
    spec = format_spec(format, opset=opset)
    atol, torch_device = check_atol(atol), resolve_device(device, key="device")
    check_quantize(quantize, format)
    source = resolve_checkpoint(ckpt)
    target = output_path(out, source=source, format=format, quantize=quantize)
    if quantize is not None:
        return export_int8(source, target, opset=opset, atol=atol, device=torch_device,
                           calib_images=calib_images)
    if out is None:  # the run dir's export/ (perhaps someone else's run dir): never a link out of it
        check_inside(target.parent.parent, target)
    model, meta, source = load_checkpoint(source, device=torch_device)
    metadata = spec.describe(meta, source)
    example = sample_inputs(meta, EXAMPLE_BATCH, seed=0).to(torch_device)
    checks = [sample_inputs(meta, n, seed=n).to(torch_device) for n in CHECK_BATCHES]
    with staged_file(target) as tmp, ieee_fp32(torch_device):
        spec.write(model, example, tmp, metadata, opset)
        check = verify(spec, format, tmp, model, checks, metadata=metadata, atol=0.0 if spec.exact else atol,
                       device=torch_device)
    return Exported(path=target, format=format, bytes=target.stat().st_size, check=check)


def export_int8(source: Path, target: Path, *, opset: int | None, atol: float, device: torch.device,
                calib_images: int) -> Exported:
    """The fp32 ONNX export (verified as always, into a scratch file), quantized to int8 into ``target``
    and kept only if `finetune.quantize.verdict` accepts it."""
    from finetune.quantize import check_calib_images, quantize_int8, run_images

    calib_images = check_calib_images(calib_images)
    spec = FORMATS["onnx"]
    model, meta, source = load_checkpoint(source, device=device)
    calib, val = run_images(source, meta, calib_images)
    metadata = spec.describe(meta, source)
    example = sample_inputs(meta, EXAMPLE_BATCH, seed=0).to(device)
    checks = [sample_inputs(meta, n, seed=n).to(device) for n in CHECK_BATCHES]
    with (staged_file(target) as tmp, scratch_path(tmp, "fp32") as fp32, scratch_path(tmp, "prep") as prep,
          ieee_fp32(device)):
        spec.write(model, example, fp32, metadata, opset)
        check = verify(spec, "onnx", fp32, model, checks, metadata=metadata, atol=atol, device=device)
        check += "\n" + quantize_int8(fp32, tmp, prep, meta=meta, calib=calib, val=val)
        metadata = {**metadata, "quantization": f"int8 static (onnxruntime QDQ), {len(calib)} calibration images"}
        set_onnx_metadata(tmp, metadata)
        if spec.load(tmp, device)[1] != metadata:
            raise UserError("the int8 ONNX file's metadata does not read back as written: nothing written")
    return Exported(path=target, format="onnx", bytes=target.stat().st_size, check=check)


def check_quantize(quantize: str | None, format: str) -> None:
    if quantize not in QUANTIZE:
        raise UserError(f"quantize '{quantize}' is not known: use quantize=int8, or leave it unset (fp32)")
    if quantize is not None and format != "onnx":
        raise UserError(f"quantize={quantize} applies to format=onnx only, got format={format}")


def format_spec(format: str, *, opset: int | None) -> Format:
    if format not in FORMATS:
        raise UserError(f"format '{format}' is not known: use one of {', '.join(FORMATS)}")
    if opset is not None and (format != "onnx" or isinstance(opset, bool) or not isinstance(opset, int)):
        raise UserError(f"opset '{opset}' applies to format=onnx only, and must be an integer (null: torch's default)")
    return FORMATS[format]


def check_atol(atol: Any) -> float:
    try:
        value = float(atol)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0 or math.isinf(value):  # not: NaN fails every comparison
        raise UserError(f"atol must be a number >= 0, got '{atol}'")
    return value


def output_path(out: str | Path | None, *, source: Path, format: str, quantize: str | None = None) -> Path:
    """The file to write, checked: its directory exists, it is not the checkpoint itself."""
    default_name = f"{source.stem}{'.' + quantize if quantize else ''}{FORMATS[format].suffix}"
    if out is None:
        return (run_dir_of(source) or (Path.cwd() if in_cache(source) else source.parent)) / "export" / default_name
    path = Path(out).expanduser()
    if path.is_dir():
        path = path / default_name
    if not path.parent.is_dir():
        raise UserError(f"out '{out}': directory '{path.parent}' does not exist: create it, or leave out unset "
                        "to write into the run dir's export/")
    if path.resolve() == source.resolve():
        raise UserError(f"out '{out}' is the checkpoint being exported: choose another file")
    if format == "safetensors" and path.suffix != ".safetensors":
        raise UserError(f"out '{out}' must end in .safetensors for format=safetensors (load_model reads it by "
                        "its suffix)")
    return path


def exported_file_metadata(meta: ModelMeta, source: Path) -> dict[str, str]:
    return export_metadata(meta, source=source)


def weights_metadata(meta: ModelMeta, source: Path) -> dict[str, str]:
    """The checkpoint's own weights metadata, verbatim: a release file rebuilds exactly as the checkpoint does."""
    if source.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as f:
            return dict(f.metadata())
    state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)  # load_checkpoint read it already
    return dict(state["weights_metadata"])


def sample_inputs(meta: ModelMeta, count: int, *, seed: int) -> torch.Tensor:
    """``count`` random images through the checkpoint's own preprocessing (resize, crop, normalise)."""
    channels, height, width = meta.data_config["input_size"]
    rng = np.random.default_rng(seed)
    transform = eval_transform(meta)
    images = []
    for _ in range(count):  # larger than the input and not square: the resize and the crop both do something
        pixels = rng.integers(0, 256, (height * 5 // 4, width * 3 // 2, channels), dtype=np.uint8)
        images.append(transform(Image.fromarray(pixels[..., 0] if channels == 1 else pixels)))
    return torch.stack(images)


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """`finetune.files.staged_path` for ``target``, making a default ``export/`` directory first and
    removing it again if it stays empty (a failed check leaves nothing behind)."""
    made_dir = not target.parent.exists()
    target.parent.mkdir(exist_ok=True)
    try:
        with staged_path(target) as tmp:
            yield tmp
    finally:
        if made_dir and not target.exists() and not any(target.parent.iterdir()):
            target.parent.rmdir()


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions and matmuls without TF32 (cuDNN's default uses it), so that the
    eager reference is plain float32, as onnxruntime's CPU kernels are. (Not yet run on a GPU.)"""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def verify(spec: Format, format: str, path: Path, model: nn.Module, inputs: list[torch.Tensor], *,
           metadata: dict[str, str], atol: float, device: torch.device) -> str:
    """Load the written file back and compare it with the eager model on each batch of ``inputs``."""
    run, written = spec.load(path, device)
    if written != metadata:
        raise UserError(f"the {format} file's metadata does not read back as written: nothing written")
    parts = []
    for x in inputs:
        with torch.no_grad():
            expected = model(x).float().cpu()
            try:
                got = run(x).float().cpu()
            except Exception as err:  # whatever the runtime raises: the export does not generalise
                raise UserError(f"the {format} export fails at batch {len(x)} ({describe_error(err)}): "
                                "nothing written") from err
        parts.append(compare(got, expected, format=format, batch=len(x), atol=atol))
    return f"{format} vs eager: {', '.join(parts)}, {'bit-identical' if spec.exact else 'argmax equal'}"


def compare(got: torch.Tensor, expected: torch.Tensor, *, format: str, batch: int, atol: float) -> str:
    """``batch B max|diff| D``; a shape, tolerance or argmax mismatch is a `UserError`."""
    if got.shape != expected.shape:
        raise UserError(f"the {format} export gives shape {tuple(got.shape)} at batch {batch}, the eager model "
                        f"{tuple(expected.shape)}: nothing written")
    diff = (got - expected).abs().max().item()
    if not diff <= atol:  # not: a NaN fails
        raise UserError(f"the {format} export differs from the eager model at batch {batch}: max|diff| {diff:.3g} "
                        f"> atol {atol:g}; nothing written")
    if not torch.equal(got.argmax(1), expected.argmax(1)):
        raise UserError(f"the {format} export ranks the classes differently from the eager model at batch {batch} "
                        f"(max|diff| {diff:.3g}): nothing written")
    return f"batch {batch} max|diff| {diff:.2g}"


# --- ONNX -------------------------------------------------------------------------------------------

def import_onnx() -> tuple[Any, Any]:
    """``onnx`` and ``onnxruntime`` (and ``onnxscript``, which torch's exporter needs), or how to get them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx.export(dynamo=True) imports it
    except ImportError as err:
        raise UserError(f"format=onnx needs onnx, onnxscript and onnxruntime ({err}): {ONNX_EXTRA}") from None
    return onnx, onnxruntime


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
               opset: int | None) -> None:
    # dynamo=True: torch.export-based, torch's default and its only maintained exporter (the
    # TorchScript-based one is deprecated since torch 2.9). It exports timm's test models,
    # resnet18, (tf_)efficientnet_lite0, efficientnet_b0, mobilenetv3, convnext_tiny and
    # vit_small here with a dynamic batch, within 4e-5 of eager (random weights, 224 px).
    # timm's exportable flag changes nothing for these models with this torch: the layers it swaps
    # are torch's own, and TF "SAME" padding traces fine, so models are built as for training.
    onnx, _ = import_onnx()
    try:
        with quiet_loggers("onnxscript", "onnx_ir"):  # their optimizer logs each pass at INFO
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset, verbose=False)
        proto = program.model_proto  # one self-contained file (the exporter's save() splits off weights)
    except Exception as err:  # torch.export / onnxscript errors alike: one line, the cause chained
        raise UserError(f"torch.onnx.export cannot export this model ({describe_error(err)}): try "
                        "format=torch_export; HYDRA_FULL_ERROR=1 shows the trace") from err
    onnx.helper.set_model_props(proto, metadata)
    try:
        onnx.save_model(proto, str(path))
    except ValueError as err:  # over protobuf's 2 GB
        raise UserError(f"the ONNX model cannot be saved as one file ({describe_error(err)})") from err


def set_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the ONNX file's ``metadata_props`` with ``metadata`` (the file is our own staged one)."""
    onnx, _ = import_onnx()
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(path))


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise these loggers to ``level`` for the block."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)


def load_onnx(path: Path, device: torch.device) -> tuple[Runner, dict[str, str]]:
    """The file as a consumer runs it: checked (full), in onnxruntime on the CPU."""
    onnx, onnxruntime = import_onnx()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise UserError(f"the exported ONNX model fails onnx.checker ({describe_error(err)}): nothing written") from err
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0])

    return run, props


# --- torch.export, TorchScript, safetensors ---------------------------------------------------------

def write_torch_export(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
                       opset: int | None) -> None:
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as err:  # torch.export's errors are many: one line, the cause chained
        raise UserError(f"torch.export cannot export this model ({describe_error(err)}); "
                        "HYDRA_FULL_ERROR=1 shows the trace") from err
    torch.export.save(program, path, extra_files={EXTRA_FILE: json.dumps(metadata)})


def load_torch_export(path: Path, device: torch.device) -> tuple[Runner, dict[str, str]]:
    extra = {EXTRA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[EXTRA_FILE])


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
                      opset: int | None) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated: the README and --help say so once, not per call
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)  # checked below at batches 1 and 3
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(metadata)})


def load_torchscript(path: Path, device: torch.device) -> tuple[Runner, dict[str, str]]:
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    return module, json.loads(extra[EXTRA_FILE])


def write_safetensors(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
                      opset: int | None) -> None:
    save_weights(path, model, metadata)  # weights and metadata only: no optimizer, no training state


def load_safetensors(path: Path, device: torch.device) -> tuple[Runner, dict[str, str]]:
    from safetensors import safe_open

    model, _ = load_model(path, device=device)
    with safe_open(str(path), framework="pt") as f:
        return model, dict(f.metadata())


FORMATS: dict[str, Format] = {
    "onnx": Format(".onnx", write_onnx, load_onnx, exported_file_metadata,
                   usage="{onnx_predict} IMAGE_OR_DIR... (numpy, Pillow, onnxruntime; no torch)"),
    "torch_export": Format(".pt2", write_torch_export, load_torch_export, exported_file_metadata,
                           usage="torch.export.load({py}).module()(x)  (x: N,C,H,W, preprocessed)"),
    "torchscript": Format(".torchscript.pt", write_torchscript, load_torchscript, exported_file_metadata,
                          usage="torch.jit.load({py})(x)  (TorchScript is deprecated in torch: prefer "
                                "format=torch_export or onnx)"),
    "safetensors": Format(".safetensors", write_safetensors, load_safetensors, weights_metadata, exact=True,
                          usage="finetune.load_model({py}), or {predict}"),
}


# --- the command --------------------------------------------------------------------------------------

@hydra.main(version_base="1.3", config_path="pkg://finetune.conf", config_name="export")
def export_app(cfg: DictConfig) -> None:
    """``python -m finetune.export``: export, then print what was written and how to use it."""
    if cfg.format == "triton":  # a folder (a model repository around an ONNX export), not one file
        from finetune.triton_repository import export_triton

        arguments = export_arguments(cfg)
        exit_on_user_error(lambda: check_quantize(cfg.quantize, "triton"))
        print(exit_on_user_error(lambda: export_triton(
            arguments["ckpt"], arguments["out"], model_name=str(cfg.model_name), max_batch_size=cfg.max_batch_size,
            atol=arguments["atol"], device=arguments["device"])).report())
        return
    print(exit_on_user_error(lambda: export(**export_arguments(cfg))).report())


def export_arguments(cfg: DictConfig) -> dict[str, Any]:
    """`export`'s arguments from ``conf/export.yaml``; no ``ckpt`` is one line saying what to pass."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise UserError("ckpt is required: python -m finetune.export ckpt=RUN_DIR (or a weights file, or last.ckpt)")
    return {"ckpt": str(cfg.ckpt), "format": str(cfg.format), "out": None if cfg.out is None else str(cfg.out),
            "opset": cfg.opset, "atol": cfg.atol, "device": str(cfg.device), "quantize": cfg.quantize,
            "calib_images": cfg.calib_images}


if __name__ == "__main__":
    export_app()
