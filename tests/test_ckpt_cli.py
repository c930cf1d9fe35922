"""python -m finetune.ckpt inspect | diff | convert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest_weights import single_thread  # noqa: F401  (autouse fixture)
from conftest_weights import TinyNet, randomize
from finetune.ckpt import main
from finetune.weights import read_checkpoint, read_state_dict


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "run.ckpt"
    state = {f"module.{k}": v for k, v in randomize(TinyNet()).state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, path)
    return path


def test_inspect_json(ckpt: Path, capsys) -> None:
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torch-zip" and info["container"] == "state_dict"
    assert info["tensors"] == 9 and info["parameters"] == 8 * 27 + 8 + 8 * 4 + 4 + 8 * 4 + 1
    assert info["dtypes"] == {"float32": 8, "int64": 1}
    assert info["wrappers"] == {"module.": 9} and info["metadata"] == {"epoch": "3"}


def test_inspect_text(ckpt: Path, capsys) -> None:
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "format:       torch-zip" in out and "tensors:      9" in out


def test_diff_is_a_dry_run_with_exit_status(tmp_path: Path, capsys) -> None:
    import timm

    source = randomize(timm.create_model("test_resnet.r160_in1k"))
    torch.save({f"model.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
    assert main(["diff", str(tmp_path / "w.pth"), "--model", "test_resnet", "--num-classes", "3", "--in-chans", "1"]) == 0
    out = capsys.readouterr().out
    assert "head reinit" in out and "adapted" in out and "'model.' x" in out
    assert main(["diff", str(tmp_path / "w.pth"), "--model", "test_efficientnet"]) == 1
    assert "another architecture" in capsys.readouterr().out


def test_convert_shards_with_a_hugging_face_index(ckpt: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "out"
    assert main(["convert", str(ckpt), str(out_dir), "--max-shard-size", "200", "--strip-wrappers"]) == 0
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out_dir / s).exists() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_state_dict(ckpt).values())
    converted = read_checkpoint(out_dir)
    assert converted.format == "sharded-safetensors"
    original = read_state_dict(ckpt)
    assert all(torch.equal(converted.tensors[k.removeprefix("module.")], v) for k, v in original.items())


def test_convert_small_file_to_one_safetensors(ckpt: Path, tmp_path: Path) -> None:
    assert main(["convert", str(ckpt), str(tmp_path / "w.safetensors")]) == 0
    assert read_checkpoint(tmp_path / "w.safetensors").format == "safetensors"
    assert not (tmp_path / "w.safetensors.index.json").exists()


def test_bad_input_is_one_error_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    result = subprocess.run([sys.executable, "-m", "finetune.ckpt", "inspect", str(tmp_path / "cat.png")],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "PNG image" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["inspect", "MISSING"], ["diff", "MISSING", "--model", "test_resnet"],
                                  ["convert", "MISSING", "out.safetensors"], ["diff", "CKPT", "--model", "no_such_model"]])
def test_each_command_reports_bad_input(ckpt: Path, tmp_path: Path, capsys, args: list[str]) -> None:
    args = [str(ckpt) if a == "CKPT" else str(tmp_path / "missing.pth") if a == "MISSING" else a for a in args]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: ")
