"""Static INT8 quantization of an ONNX export: ``python -m finetune.export format=onnx quantize=int8``.

onnxruntime's own ``quantize_static`` does the work (QDQ format, per-channel int8 weights, uint8
activations, MinMax ranges), calibrated on ``calib_images`` of the run's training images preprocessed
exactly as evaluation does (`finetune.inference.eval_loader`). The int8 file is kept only if, on the
run's validation images (the same list ``finetune.evaluate`` uses: ``split.json`` or ``val/``), its top-1
agrees with the fp32 model's on at least `MIN_AGREEMENT` of them and its accuracy is at most
`MAX_ACC_DROP` points lower; otherwise a `UserError` names both numbers and nothing is written.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from finetune.checkpoint import ModelMeta
from finetune.errors import UserError, describe_error
from finetune.inference import INPUT_NAME, OUTPUT_NAME, eval_loader

MIN_AGREEMENT = 0.99  # top-1 equal to fp32's on at least this fraction of the validation images
MAX_ACC_DROP = 1.0  # accuracy points (of 100) the int8 model may lose
CALIB_SEED = 0  # which training images calibrate: a seeded sample, the same every export
BATCH = 16  # images per onnxruntime call while calibrating and checking
Sample = tuple[str, int]


def check_calib_images(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"calib_images must be a positive integer (training images to calibrate on), got '{value}'")
    return value


def run_images(source: Path, meta: ModelMeta, calib_images: int) -> tuple[list[Sample], list[Sample]]:
    """(calibration images: a seeded sample of the run's training images, the run's validation images)."""
    from finetune.config import DataConfig
    from finetune.evaluate import TrainingRun, choose_images, to_checkpoint_labels

    training = TrainingRun.find(None, source)
    if training.path is None:
        raise UserError(f"quantize=int8 calibrates on the training images of the checkpoint's run, and '{source}' "
                        "is not inside a run dir (no split.json): export ckpt=RUN_DIR")
    data = training.data_config(OmegaConf.structured(DataConfig(name="custom")))
    train, val = (to_checkpoint_labels(choose_images(data, training, split=s), meta.class_names)
                  for s in ("train", "val"))
    return random.Random(CALIB_SEED).sample(train, min(calib_images, len(train))), val


def batches(samples: list[Sample], meta: ModelMeta) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for inputs, target in eval_loader(samples, meta, batch_size=BATCH):
        yield inputs.numpy(), target.numpy()


def quantize_int8(fp32: Path, out: Path, scratch: Path, *, meta: ModelMeta, calib: list[Sample],
                  val: list[Sample]) -> str:
    """Quantize ``fp32`` into ``out`` (``scratch``: the pre-processed model), then check it against
    ``fp32`` on ``val``; returns the check's line, raises `UserError` if it fails."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = (x for x, _ in batches(calib, meta))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.inputs, None)
            return None if x is None else {INPUT_NAME: x}

    try:
        quant_pre_process(str(fp32), str(scratch))  # shape inference + graph optimisation, as onnxruntime advises
        quantize_static(str(scratch), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    except Exception as err:  # onnxruntime's errors are many: one line, the cause chained
        raise UserError(f"onnxruntime cannot quantize this model to int8 ({describe_error(err)}): export it "
                        "without quantize=") from err
    sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, out)]
    predicted: list[list[np.ndarray]] = [[], []]
    targets = []
    for x, target in batches(val, meta):
        for session, into in zip(sessions, predicted):
            into.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].argmax(1))
        targets.append(target)
    fp32_top, int8_top, labels = (np.concatenate(p) for p in (*predicted, targets))
    return verdict(float((fp32_top == int8_top).mean()), float((fp32_top == labels).mean()),
                   float((int8_top == labels).mean()), images=len(labels), calib=len(calib))


def verdict(agreement: float, acc_fp32: float, acc_int8: float, *, images: int, calib: int) -> str:
    """The check's line; a `UserError` with both numbers when the int8 model is not good enough.

    >>> verdict(1.0, 0.5, 0.5, images=4, calib=8)  # doctest: +ELLIPSIS
    'int8 vs fp32 on 4 validation images: top-1 agreement 100.0% (>= 99% needed), acc1 50.00% -> 50.00% ...'
    """
    drop = 100 * (acc_fp32 - acc_int8)
    line = (f"int8 vs fp32 on {images} validation images: top-1 agreement {agreement:.1%} (>= {MIN_AGREEMENT:.0%} "
            f"needed), acc1 {acc_fp32:.2%} -> {acc_int8:.2%} (drop {drop:.2f} points, <= {MAX_ACC_DROP:g} allowed)")
    if agreement < MIN_AGREEMENT or drop > MAX_ACC_DROP + 1e-9:
        raise UserError(f"the int8 model is refused: {line}; nothing written: calibrate on more images "
                        f"(calib_images=, now {calib}), or export fp32 (no quantize=)")
    return f"{line}; calibrated on {calib} training images"
