"""python -m finetune.export: every format equals the eager model, carries its metadata, and a bad
input or a failed check writes nothing.

One tiny run is trained per module; the export commands then run two at a time, and the tests read
their results. Each written file is loaded again here, the way its consumer would, and compared
with the eager model on the checkpoint's own preprocessing of real images. Bad input is checked
through the command for a missing key, a corrupt checkpoint and a failed check (exit 2, one line,
no traceback: one handler serves every `UserError`), and through `export()` for the rest (each
command costs seconds of torch's import on this 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_image_folder, run_cli, tiny_overrides
from finetune import load_model
from finetune.errors import UserError
from finetune.export import export
from finetune.inference import (INPUT_NAME, OUTPUT_NAME, eval_transform, load_checkpoint, read_export_metadata,
                                read_image)

pytestmark = pytest.mark.slow

CLASSES = ["class_0", "class_1", "class_2"]
CHECK_LINE = re.compile(r"(\w+) vs eager: batch 1 max\|diff\| (\S+), batch 3 max\|diff\| (\S+), "
                        r"(argmax equal|bit-identical)")


def run_export(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "finetune.export", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A trained run (``run/``), its images, a foreign and a truncated weights file, empty ``out/``,
    ``bad/`` and ``cwd/`` (where the commands run)."""
    root = tmp_path_factory.mktemp("export")
    images = make_image_folder(root / "images")
    trained = run_cli(tiny_overrides(images, epochs=1) + [f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for name in ("out", "bad", "cwd"):
        (root / name).mkdir()
    save_file({"weight": torch.zeros(3)}, root / "foreign.safetensors")  # a valid file, not ours
    data = (root / "run/checkpoints/best.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    return root


def cases(root: Path) -> dict[str, list[str]]:
    run, ckpts, out, bad = root / "run", root / "run/checkpoints", root / "out", root / "bad"
    return {
        # what works: each format, from a run dir, a weights file and a training state
        "onnx": [f"ckpt={run}"],  # default out: RUN_DIR/export/best.onnx
        "torch_export": [f"ckpt={ckpts / 'best.safetensors'}", "format=torch_export", f"out={out / 'model.pt2'}"],
        "torchscript": [f"ckpt={ckpts / 'last.ckpt'}", "format=torchscript", f"out={out / 'model.ts.pt'}"],
        "safetensors": [f"ckpt={ckpts / 'last.ckpt'}", "format=safetensors", f"out={out / 'release.safetensors'}"],
        # what must write nothing
        "no_ckpt": [f"out={bad / 'no_ckpt.onnx'}"],
        "truncated_ckpt": [f"ckpt={root / 'truncated.safetensors'}", f"out={bad / 'truncated_ckpt.onnx'}"],
        # onnxruntime's logits are not bit-identical to eager ones: atol=0 fails the check for real
        "failed_check": [f"ckpt={run}", "atol=0", f"out={bad / 'failed_check.onnx'}"],
    }


@pytest.fixture(scope="module")
def results(workspace: Path) -> dict[str, subprocess.CompletedProcess]:
    commands = cases(workspace)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores, one thread each
        done = {name: pool.submit(run_export, args, cwd=workspace / "cwd") for name, args in commands.items()}
    return {name: future.result() for name, future in done.items()}


def real_batches(root: Path, ckpt: Path) -> tuple[torch.nn.Module, object, list[torch.Tensor]]:
    """The eager model of ``ckpt`` and batches of 1 and 3 val images through its preprocessing."""
    model, meta, _ = load_checkpoint(ckpt)
    transform = eval_transform(meta)
    files = sorted((root / "images/val").rglob("*.png"))
    x = torch.stack([transform(read_image(f, meta)) for f in files[:4]])
    return model, meta, [x[:1], x[1:4]]


def assert_matches_eager(run, model: torch.nn.Module, batches: list[torch.Tensor], *, exact: bool = False) -> None:
    with torch.no_grad():
        for x in batches:
            expected, got = model(x), run(x)
            assert got.shape == expected.shape == (len(x), len(CLASSES))
            if exact:
                assert torch.equal(got, expected), f"batch {len(x)}: not bit-identical"
            else:
                assert (got - expected).abs().max().item() <= 1e-4, f"batch {len(x)}"
                assert torch.equal(got.argmax(1), expected.argmax(1)), f"batch {len(x)}"


def assert_written(result: subprocess.CompletedProcess, path: Path, format: str) -> None:
    """Exit 0, the file in place and no temporary file beside it, and the report names both."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert path.is_file() and path.stat().st_size > 0
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    assert f"wrote {path} " in result.stdout
    check = CHECK_LINE.search(result.stdout)
    assert check and check.group(1) == format, result.stdout
    assert all(float(check.group(i)) <= (0 if format == "safetensors" else 1e-4) for i in (2, 3))


def assert_metadata(props: dict[str, str], path: Path, meta) -> None:
    facts = read_export_metadata(props, path=path)
    assert facts["class_names"] == CLASSES == meta.class_names
    assert {**facts["data_config"], "input_size": tuple(facts["data_config"]["input_size"])} == meta.data_config
    assert facts["model_name"] == "test_resnet"


def test_onnx_equals_eager_with_a_dynamic_batch(workspace: Path, results) -> None:
    import onnx
    import onnxruntime

    path = workspace / "run/export/best.onnx"
    assert_written(results["onnx"], path, "onnx")
    assert "-m finetune.onnx_predict" in results["onnx"].stdout
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    model, meta, batches = real_batches(workspace, workspace / "run")
    assert_metadata({p.key: p.value for p in proto.metadata_props}, path, meta)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_matches_eager(lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]),
                         model, batches)


def test_torch_export_equals_eager(workspace: Path, results) -> None:
    path = workspace / "out/model.pt2"
    assert_written(results["torch_export"], path, "torch_export")
    extra = {"finetune.json": ""}
    program = torch.export.load(path, extra_files=extra)
    model, meta, batches = real_batches(workspace, workspace / "run/checkpoints/best.safetensors")
    assert_metadata(json.loads(extra["finetune.json"]), path, meta)
    assert_matches_eager(program.module(), model, batches)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_equals_eager_at_other_batch_sizes(workspace: Path, results) -> None:
    path = workspace / "out/model.ts.pt"
    assert_written(results["torchscript"], path, "torchscript")
    extra = {"finetune.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)  # traced at batch 2
    model, meta, batches = real_batches(workspace, workspace / "run/checkpoints/last.ckpt")
    assert_metadata(json.loads(extra["finetune.json"]), path, meta)
    assert_matches_eager(module, model, batches)


def test_safetensors_release_is_the_weights_bit_for_bit(workspace: Path, results) -> None:
    path = workspace / "out/release.safetensors"
    assert_written(results["safetensors"], path, "safetensors")
    source = workspace / "run/checkpoints/last.ckpt"
    model, meta, batches = real_batches(workspace, source)
    released, released_meta = load_model(path)
    assert released_meta.class_names == meta.class_names and released_meta.data_config == meta.data_config
    assert released_meta.extra == meta.extra  # the checkpoint's own metadata, verbatim
    with safe_open(str(path), framework="pt") as f:  # weights only: no optimizer or training state
        assert sorted(f.keys()) == sorted(model.state_dict())
    assert all(torch.equal(released.state_dict()[k], v) for k, v in model.state_dict().items())
    assert_matches_eager(released, model, batches, exact=True)
    assert path.stat().st_size < source.stat().st_size


BAD_COMMANDS = {
    "no_ckpt": "ckpt is required",
    "truncated_ckpt": "cannot be read as a finetune weights file",
    "failed_check": "differs from the eager model at batch",
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_input_is_one_line_and_writes_nothing(workspace: Path, results, case: str) -> None:
    result = results[case]
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_COMMANDS[case] in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list((workspace / "bad").iterdir()) == []  # no file at out, no temporary file either


def bad_calls(root: Path) -> dict[str, tuple[dict, str]]:
    """``export()`` arguments that must fail, and what the message must say."""
    run, bad = root / "run", root / "bad"
    return {
        "missing_ckpt": ({"ckpt": root / "nope", "out": bad / "a.onnx"}, "checkpoint '.*nope' does not exist"),
        "foreign_ckpt": ({"ckpt": root / "foreign.safetensors", "out": bad / "a.onnx"},
                         "is not a finetune weights file"),
        "unknown_format": ({"ckpt": run, "format": "tflite", "out": bad / "a.onnx"},
                           "format 'tflite' is not known: use one of onnx, torch_export, torchscript, safetensors"),
        "missing_out_dir": ({"ckpt": run, "out": root / "missing" / "a.onnx"}, "directory '.*missing' does not exist"),
        "out_is_the_ckpt": ({"ckpt": run / "checkpoints/best.safetensors", "format": "safetensors",
                             "out": run / "checkpoints/best.safetensors"}, "is the checkpoint being exported"),
        "release_suffix": ({"ckpt": run, "format": "safetensors", "out": bad / "a.pt"}, "must end in .safetensors"),
        "negative_atol": ({"ckpt": run, "out": bad / "a.onnx", "atol": -1}, "atol must be a number >= 0, got '-1'"),
        "opset_not_onnx": ({"ckpt": run, "format": "torchscript", "out": bad / "a.pt", "opset": 17},
                           "opset '17' applies to format=onnx only"),
        "bad_device": ({"ckpt": run, "out": bad / "a.onnx", "device": "gpu"}, "device 'gpu' is not a device"),
    }


@pytest.mark.parametrize("case", ["missing_ckpt", "foreign_ckpt", "unknown_format", "missing_out_dir",
                                  "out_is_the_ckpt", "release_suffix", "negative_atol", "opset_not_onnx",
                                  "bad_device"])
def test_bad_argument_names_the_problem_and_writes_nothing(workspace: Path, results, case: str) -> None:
    kwargs, message = bad_calls(workspace)[case]
    before = sorted((workspace / "run").rglob("*"))
    with pytest.raises(UserError, match=message):
        export(**kwargs)
    assert list((workspace / "bad").iterdir()) == [] and not (workspace / "missing").exists()
    assert sorted((workspace / "run").rglob("*")) == before


def test_a_failed_check_names_the_batch_the_difference_and_atol(results) -> None:
    line = results["failed_check"].stderr.strip()
    found = re.search(r"at batch ([13]): max\|diff\| (\S+) > atol 0;", line)
    assert found and float(found.group(2)) > 0, line


def test_an_export_writes_nothing_where_it_runs(workspace: Path, results) -> None:
    assert list((workspace / "cwd").iterdir()) == []  # no outputs/, no .hydra/
    assert sorted(p.name for p in (workspace / "run/export").iterdir()) == ["best.onnx"]
