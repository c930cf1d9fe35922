"""The real CLI in a subprocess: a full run, Hydra's --help/--cfg, and one test per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder, run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def assert_clean_error(result, *fragments: str, code: int = 2) -> str:
    """Non-zero exit, one ``error:`` line naming the problem, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_end_to_end_run_writes_every_file_and_each_loads(tmp_path):
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    result = run_cli(tiny_overrides(root) + [f"hydra.run.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/best.safetensors",
                 "checkpoints/last.safetensors", "checkpoints/last.ckpt", "checkpoints/manifest.json",
                 "metrics.jsonl", "summary.json", "load_report.json", "train.log", "split.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert load_file(out / "checkpoints" / "best.safetensors")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["epoch"] == 2
    for name in ("summary.json", "load_report.json", "checkpoints/manifest.json"):
        json.loads((out / name).read_text())
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    log = (out / "train.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log
    assert "epoch 2/2" in result.stdout  # the per-epoch line on the console too

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "train.log"}
    again = run_cli(tiny_overrides(root) + [f"hydra.run.dir={out}", "optim.lr=0.5"], cwd=tmp_path)
    assert_clean_error(again, f"'{out}' already holds the checkpoints of a run", "resume=auto")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "train.log"} == before


def test_default_model_runs_from_the_packaged_weights(tmp_path):
    out = tmp_path / "run"
    args = ["trainer.max_epochs=1", "data.demo.train_per_class=4", "data.demo.val_per_class=2",
            "data.img_size=64", "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}",
            "logger.progress_bar=false", f"hydra.run.dir={out}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "load_report.json").read_text())
    assert report["loaded_fraction"] == 1.0 and not report["missing"]
    assert [h["key"] for h in report["head"]] == ["classifier.weight", "classifier.bias"]
    assert "backbone parameters loaded: 100.0%" in result.stdout


def test_help_and_cfg_job_behave_like_hydra(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0 and "finetune" in result.stdout
    assert "model: " in result.stdout and "efficientnet_lite0" in result.stdout  # groups and options
    result = run_cli(["--cfg", "job", "optim.lr=0.01"], cwd=tmp_path)
    assert result.returncode == 0
    assert "lr: 0.01" in result.stdout and "name: tf_efficientnet_lite0" in result.stdout
    assert not (tmp_path / "outputs").exists()  # --cfg prints, runs nothing


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images", classes=2, train=3, val=2, size=16)


def test_unknown_model_name_suggests_close_timm_names(tmp_path, folder):
    result = run_cli(tiny_overrides(folder) + ["model.name=resnt18"], cwd=tmp_path)
    assert_clean_error(result, "model.name 'resnt18' is not a timm model", "resnet18")


def test_data_custom_without_root(tmp_path):
    result = run_cli(["data=custom", "model=resnet18", "model.pretrained=false"], cwd=tmp_path)
    assert_clean_error(result, "data.root")


def test_missing_data_root(tmp_path):
    result = run_cli(tiny_overrides(tmp_path / "nowhere"), cwd=tmp_path)
    assert_clean_error(result, str(tmp_path / "nowhere"))


def test_empty_data_root(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(tiny_overrides(tmp_path / "empty"), cwd=tmp_path)
    assert_clean_error(result, str(tmp_path / "empty"), "class folders")


def test_single_class(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=1, size=16)
    result = run_cli(tiny_overrides(root), cwd=tmp_path)
    assert_clean_error(result, "at least 2 classes", "class_0")


def test_misspelled_config_key_is_named(tmp_path, folder):
    result = run_cli(tiny_overrides(folder) + ["optim.lrr=0.1"], cwd=tmp_path)
    assert_clean_error(result, "'optim.lrr=0.1' sets 'optim.lrr', which is not a config key: did you mean optim.lr?")
    assert not (tmp_path / "outputs").exists()


def test_wrong_type_is_named(tmp_path, folder):
    result = run_cli(tiny_overrides(folder) + ["data.batch_size=big"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "data.batch_size" in result.stderr and "big" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be positive, got '0.0'"),
    ("optim.lr=-0.1", "optim.lr must be positive, got '-0.1'"),
    ("data.batch_size=0", "data.batch_size must be positive, got '0'"),
    ("trainer.precision=8", "trainer.precision must be one of 32, bf16, 16; got '8'"),
])
def test_non_positive_or_unknown_values(tmp_path, folder, override, message):
    result = run_cli(tiny_overrides(folder) + [override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert_clean_error(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any work


def test_unreadable_image_is_listed(tmp_path, folder):
    bad = folder / "train" / "class_0" / "broken.png"
    bad.write_bytes(b"not a png at all")
    result = run_cli(tiny_overrides(folder), cwd=tmp_path)
    assert_clean_error(result, "broken.png", "data.skip_bad_images=true")
    out = tmp_path / "skipped"
    result = run_cli(tiny_overrides(folder, epochs=1) + ["data.skip_bad_images=true", f"hydra.run.dir={out}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "broken.png" in (out / "train.log").read_text()  # the skip warning is in the log


def test_pretrained_weights_unreachable_offline_fail_fast(tmp_path, folder):
    overrides = [o for o in tiny_overrides(folder) if not o.startswith("model.pretrained")]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    result = run_cli(overrides + ["model.pretrained=true"], cwd=tmp_path, env=env, timeout=60)
    assert_clean_error(result, "model.pretrained=true", "model.weights=PATH", "model.pretrained=false")
    tv = ["model=tv_resnet50", "model.name=resnet18", "data=custom", f"data.root={folder}", "data.img_size=32"]
    result = run_cli(tv, cwd=tmp_path, env=env, timeout=60)
    assert_clean_error(result, "torchvision's weights for 'resnet18'", "model.weights=PATH")


def test_user_error_has_a_traceback_only_when_asked(tmp_path, folder):
    result = run_cli(tiny_overrides(folder) + ["optim.lr=0"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback (most recent call last):" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "finetune.errors.UserError: optim.lr must be positive, got '0.0'"
    assert "in check_config" in result.stderr  # the traceback of the error that was asked about, not of a crash


def test_the_entry_points_docstring_examples_hold():
    """pytest's --doctest-modules never collects a ``__main__.py``: their examples run here. Importing
    one runs nothing (``main()`` is behind ``if __name__ == "__main__"``)."""
    import doctest

    import finetune.__main__
    import finetune.lr_find.__main__
    import finetune.weights.__main__

    results = {m.__name__: doctest.testmod(m) for m in (finetune.__main__, finetune.lr_find.__main__,
                                                         finetune.weights.__main__)}
    assert all(r.failed == 0 for r in results.values()), results
    assert results["finetune.__main__"].attempted >= 1
