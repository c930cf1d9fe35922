"""``python -m finetune.export format=triton out=DIR``: a Triton Inference Server model repository.

Writes ``DIR/<model_name>/1/model.onnx`` (`finetune.export.export` to ONNX: checked against the eager
model as every export is), ``DIR/<model_name>/labels.txt`` (the class names, one a line: Triton's
classification extension reads it), and ``DIR/<model_name>/config.pbtxt``: platform
``onnxruntime_onnx``, ``max_batch_size``, ``dynamic_batching``, and the input and output names,
datatypes and dims read back from the ONNX file itself (without the batch dimension, as Triton wants
them when ``max_batch_size`` > 0). KServe's ``tritonserver`` runtime takes the same folder.

The text is written here (a few fixed fields; Triton's protobuf module ships only with ``tritonclient``,
which an export should not need); tests/test_serve.py parses it with Triton's own ``model_config.proto``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.export import Exported, export
from finetune.files import atomic_write_text

ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64"}  # onnx.TensorProto -> Triton


@dataclass(frozen=True)
class TritonRepository:
    """What `export_triton` wrote."""

    folder: Path  # DIR/<model_name>
    model: Exported

    def report(self) -> str:
        root = self.folder.parent
        return (f"wrote Triton model repository {root} (model '{self.folder.name}': config.pbtxt, labels.txt, "
                f"1/model.onnx)\n{self.model.check}\nuse it: tritonserver --model-repository={root}  (or KServe's "
                "InferenceService with the tritonserver runtime and this folder as its storageUri)")


def export_triton(ckpt: str | Path, out: str | Path | None, *, model_name: str = "finetune", max_batch_size: int = 32,
                  max_queue_delay_us: int = 5000, atol: float = 1e-4, device: str = "cpu") -> TritonRepository:
    """The model of ``ckpt`` as a Triton model repository under ``out`` (see the module's docstring)."""
    root = check_arguments(out, model_name=model_name, max_batch_size=max_batch_size)
    version = root / model_name / "1"
    version.mkdir(parents=True, exist_ok=True)
    exported = export(ckpt, "onnx", out=version / "model.onnx", atol=atol, device=device)
    inputs, outputs, class_names = onnx_signature(exported.path)
    folder = root / model_name
    atomic_write_text(folder / "labels.txt", "".join(f"{name}\n" for name in class_names))
    atomic_write_text(folder / "config.pbtxt", config_text(model_name, inputs, outputs, max_batch_size=max_batch_size,
                                                           max_queue_delay_us=max_queue_delay_us))
    return TritonRepository(folder=folder, model=exported)


def check_arguments(out: str | Path | None, *, model_name: str, max_batch_size: int) -> Path:
    if out is None or str(out) == "":
        raise UserError("format=triton needs out=DIR: the model repository to write (made if missing)")
    if not model_name or not all(c.isalnum() or c in "-_." for c in model_name) or model_name.startswith("."):
        raise UserError(f"model_name '{model_name}' must be letters, digits, '-', '_' or '.' (a folder name)")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise UserError(f"max_batch_size must be a positive integer, got '{max_batch_size}'")
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def onnx_signature(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]], list[str]]:
    """``(name, Triton datatype, dims without the batch)`` of the ONNX file's inputs and outputs, and its
    class names (its finetune metadata)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def tensors(values) -> list[tuple[str, str, list[int]]]:
        found = []
        for value in values:
            kind = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
            found.append((value.name, ONNX_TYPES.get(kind.elem_type, "TYPE_INVALID"), dims[1:]))
        return found

    props = {p.key: p.value for p in model.metadata_props}
    return tensors(model.graph.input), tensors(model.graph.output), json.loads(props["class_names"])


def config_text(name: str, inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]], *,
                max_batch_size: int, max_queue_delay_us: int) -> str:
    """``config.pbtxt`` in protobuf text format (names and labels quoted as JSON strings, which it accepts)."""
    def tensor(entry: tuple[str, str, list[int]], extra: str = "") -> str:
        name, datatype, dims = entry
        return f"  {{\n    name: {json.dumps(name)}\n    data_type: {datatype}\n    dims: {dims}\n{extra}  }}"

    label = '    label_filename: "labels.txt"\n'
    listed_inputs = ",\n".join(tensor(i) for i in inputs)
    listed_outputs = ",\n".join(tensor(o, label) for o in outputs)
    return (f"name: {json.dumps(name)}\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: {max_batch_size}\n"
            f"input [\n{listed_inputs}\n]\noutput [\n{listed_outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")
