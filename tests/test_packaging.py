"""The configs ship in the wheel, recipes (``+experiment=NAME``) compose, and a user's own
config directory joins the shipped tree without editing the package."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import REPO, compose_config, make_image_folder, run_cli, tiny_overrides
from finetune.__main__ import CONFIG_DIR
from finetune.config import check_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))

# A user's own options, kept outside the package: a model and a recipe that uses it.
USER_MODEL = {"name": "test_resnet", "source": "timm", "pretrained": False, "weights": None, "input_size": 32}
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: mynet
  - override /data: custom
optim:
  lr: 0.0123
data:
  img_size: 32
  batch_size: 4
  num_workers: 0
trainer:
  max_epochs: 1
logger:
  progress_bar: false
"""


def write_user_configs(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "model" / "mynet.yaml").write_text(yaml.safe_dump(USER_MODEL))
    (root / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    return root


def test_pyproject_lists_every_subpackage():
    """The package list is explicit (conf/ is mapped into it), so a new subpackage must be added."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("finetune", "hydra_plugins") for p in (REPO / top).rglob("__init__.py")}
    assert on_disk | {"finetune.conf", "hydra_plugins"} == listed, \
        f"pyproject.toml [tool.setuptools] packages: add {sorted(on_disk - listed)}"


def test_config_dir_is_the_tree_the_cli_loads():
    """Tests compose CONFIG_DIR, the app loads pkg://finetune.conf: the same configs."""
    assert Path(CONFIG_DIR) == Path(str(importlib.resources.files("finetune.conf")))
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
        from_package = compose(config_name="config", overrides=["+experiment=example"])
    from_dir = compose_config(["+experiment=example"])
    assert OmegaConf.to_container(from_package) == OmegaConf.to_container(from_dir)


def test_example_experiment_holds_only_deltas():
    cfg = compose_config(["+experiment=example", "data.root=/somewhere"])
    assert (cfg.model.name, cfg.data.name, cfg.freeze.name, cfg.optim.name) == ("resnet18", "custom", "head_only", "sgd")
    assert (cfg.optim.lr, cfg.data.img_size, cfg.trainer.max_epochs) == (0.05, 160, 10)
    default = compose_config([])
    assert (cfg.head, cfg.sched, cfg.checkpoint) == (default.head, default.sched, default.checkpoint)
    assert compose_config(["+experiment=example", "optim.lr=0.2"]).optim.lr == 0.2  # the command line wins
    check_config(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_shipped_experiment_composes_and_validates(name):
    check_config(compose_config([f"+experiment={name}", "data.root=/somewhere"]))


@pytest.mark.slow
def test_example_experiment_from_the_command_line(tmp_path):
    result = run_cli(["+experiment=example", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["model"]["name"], cfg["freeze"]["name"], cfg["optim"]["lr"]) == ("resnet18", "head_only", 0.05)


@pytest.mark.slow
def test_unknown_experiment_names_the_available_ones(tmp_path):
    result = run_cli(["+experiment=no_such_recipe", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("error: '+experiment=no_such_recipe': experiment has no option "
                                     "'no_such_recipe': options: example"), result.stderr


@pytest.mark.slow
def test_user_config_dir_on_the_search_path_trains(tmp_path):
    user = write_user_configs(tmp_path / "my_conf")
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    result = run_cli([f"hydra.searchpath=[file://{user}]", "+experiment=mine", f"data.root={root}",
                      f"hydra.run.dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "best.safetensors").is_file()
    saved = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert (saved["model"]["name"], saved["optim"]["lr"], saved["trainer"]["max_epochs"]) == ("test_resnet", 0.0123, 1)


@pytest.mark.slow
def test_user_config_dir_by_flag_adds_options_beside_the_shipped_ones(tmp_path):
    user = write_user_configs(tmp_path / "my_conf")
    result = run_cli(["--config-dir", str(user), "+experiment=mine", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["model"]["name"], cfg["model"]["input_size"], cfg["optim"]["lr"]) == ("test_resnet", 32, 0.0123)
    shipped = run_cli(["--config-dir", str(user), "+experiment=example", "--cfg", "job"], cwd=tmp_path)
    assert shipped.returncode == 0 and yaml.safe_load(shipped.stdout)["model"]["name"] == "resnet18"


def copy_project(dest: Path) -> Path:
    """What a wheel is built from, copied so the build writes nothing into the working tree
    (pip builds in place: build/ and *.egg-info next to the sources)."""
    dest.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "finetune", "hydra_plugins", "conf"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=skip)
        elif source.is_file():
            shutil.copy2(source, dest / name)
    return dest


def pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_wheel_ships_the_configs_and_runs_outside_the_repository(tmp_path):
    source = copy_project(tmp_path / "src")
    # --no-build-isolation: the build uses this environment's setuptools, nothing is downloaded
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("finetune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"finetune/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert {"finetune/conf/config.yaml", "finetune/conf/experiment/example.yaml"} <= configs
    assert configs <= names, sorted(configs - names)
    modules = {p.relative_to(REPO).as_posix()
               for top in ("finetune", "hydra_plugins") for p in (REPO / top).rglob("*.py")}
    assert modules <= names, f"missing from pyproject's package list: {sorted(modules - names)}"

    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    assert REPO not in work.resolve().parents
    env = {"PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import finetune, finetune.__main__ as m; "
                            "print(finetune.__file__); print(m.CONFIG_DIR)"],
                           cwd=work, capture_output=True, text=True, env={**os.environ, **env})
    assert probe.returncode == 0, probe.stderr
    module_file, config_dir = probe.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(config_dir) == site / "finetune" / "conf"

    # A recipe only the installed copy has: the CLI must read its configs from there.
    (site / "finetune" / "conf" / "experiment" / "installed_only.yaml").write_text("# @package _global_\nseed: 4242\n")
    shown = run_cli(["+experiment=installed_only", "--cfg", "job"], cwd=work, env=env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "model:" in shown.stdout and "max_epochs" in shown.stdout and "seed: 4242" in shown.stdout

    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    result = run_cli(tiny_overrides(root, epochs=1) + [f"hydra.run.dir={out}"], cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "best.safetensors").is_file()

    # The torch-free predictor, as installed from the wheel, predicts the export of that run with every
    # import of torch, torchvision and timm refused (test_predict_onnx.TORCH_FREE records any attempt).
    from test_predict_onnx import TORCH_FREE

    exported = subprocess.run([sys.executable, "-m", "finetune.export", f"ckpt={out}", f"out={tmp_path / 'm.onnx'}"],
                              cwd=work, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    predicted = subprocess.run([sys.executable, "-c", TORCH_FREE, "finetune.onnx_predict", str(tmp_path / "m.onnx"),
                                str(root / "val")], cwd=work, capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=300)
    assert predicted.returncode == 0 and "not torch-free" not in predicted.stderr, predicted.stderr[-3000:]
    rows = predicted.stdout.splitlines()
    assert rows[0].startswith("path,label,prob") and len(rows) == 1 + 9
    assert all(row.startswith(str(root / "val")) for row in rows[1:])

