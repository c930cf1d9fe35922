"""The first ten minutes (issue 27): no mistake a newcomer makes passes silently.

A key the chosen option ignores (``data.root`` with the demo set), a key that does not exist (``+lr``),
argparse habits (``--lr 0.01``), a mistyped option (``model=resnt50``) and missing weights offline each
end in one line that says what to type instead; nothing trains on something other than what was typed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from conftest import compose_config, make_image_folder, run_cli, tiny_overrides
from finetune.__main__ import check_command_line, config_groups
from finetune.config import check_config, check_overrides_take_effect
from finetune.errors import UserError
from test_cli import assert_clean_error


@pytest.mark.parametrize("overrides, says", [
    (["data.root=/photos"], "data.root is set but has no effect with data.name=demo: data=demo trains on the "
                            "built-in demo set: add data=custom"),
    (["data.val_split=0.3"], "data.val_split is set but has no effect with data.name=demo"),
    (["data=custom", "data.root=/photos", "data.demo.num_classes=3"], "data.demo.num_classes is set but has no "
                                                                      "effect with data.name=custom"),
    (["data=custom", "data.root=/photos", "data.cache_dir=/c"], "data.cache_dir is set but has no effect"),
    (["head.hidden=[64]"], "head.hidden is set but has no effect with head.name=linear: they shape an MLP head: "
                           "add head=mlp"),
    (["freeze.until=layer2"], "freeze.until is set but has no effect with freeze.name=none: add freeze=until"),
    (["freeze=until", "freeze.until=layer2", "freeze.include=[x]"], "freeze.include is set but has no effect"),
    (["optim.momentum=0.5"], "optim.momentum is set but has no effect with optim.name=adamw"),
    (["optim=sgd", "optim.betas=[0.9,0.99]"], "optim.betas is set but has no effect with optim.name=sgd"),
    (["optim.lr_find.num_updates=50"], "optim.lr_find.num_updates is set but has no effect with optim.lr=0.001"),
    (["sched.decay_epochs=3"], "sched.decay_epochs is set but has no effect with sched.name=cosine"),
    (["sched=none", "sched.min_lr=0.1"], "sched.min_lr is set but has no effect with sched.name=none"),
    (["trainer.ema_decay=0.9"], "trainer.ema_decay is set but has no effect with trainer.ema=false"),
    (["trainer.compile_mode=max-autotune"], "trainer.compile_mode is set but has no effect with trainer.compile=false"),
])
def test_an_override_the_composed_config_ignores_is_refused(overrides, says):
    with pytest.raises(UserError) as err:
        check_overrides_take_effect(compose_config(overrides), overrides)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["data=custom", "data.root=/photos", "data.val_split=0.3"], ["head=mlp", "head.hidden=[64]"],
    ["freeze=until", "freeze.until=layer2"], ["optim=sgd", "optim.momentum=0.5"], ["optim.betas=[0.9,0.99]"],
    ["optim.lr=auto", "optim.lr_find.num_updates=50"], ["sched=step", "sched.decay_epochs=3"],
    ["trainer.ema=true", "trainer.ema_decay=0.9"], ["trainer.early_stopping.patience=2", "checkpoint.min_delta=0.1"],
    ["+experiment=example", "data.root=/photos"],
])
def test_the_same_keys_pass_where_they_take_effect(overrides):
    check_overrides_take_effect(compose_config(overrides), overrides)


def test_every_shipped_option_composes_and_passes_the_checks():
    """No option file sets a key the schema lacks; composing each one alone is a valid config."""
    for group, options in config_groups().items():
        for option in options:
            if group in ("experiment", "hparams_search"):
                overrides = [f"+{group}={option}"] if group == "experiment" else [f"{group}={option}"]
            else:
                overrides = [f"{group}={option}"]
            overrides += ["freeze.until=layer1"] if (group, option) == ("freeze", "until") else []
            overrides += ["freeze.include=[x]"] if (group, option) == ("freeze", "patterns") else []
            overrides += ["data=table", "data.file=t.csv"] if (group, option) == ("task", "multilabel") else []
            check_config(compose_config(overrides))


@pytest.mark.parametrize("args, says", [
    (["+lr=0.01"], "'+lr=0.01' sets 'lr', which is not a config key: did you mean optim.lr?"),
    (["lr=0.01"], "'lr=0.01' sets 'lr', which is not a config key: did you mean optim.lr?"),
    (["++trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
    (["trainer.early_stopping.min_delta=0.1"], "did you mean checkpoint.min_delta?"),  # moved: one rule for "better"
    (["data.rot=/x"], "did you mean data.root"),
    (["--lr", "0.01"], "'--lr 0.01' is argparse style; finetune takes Hydra overrides: write optim.lr=0.01"),
    (["--lr=0.01"], "'--lr=0.01' is argparse style; finetune takes Hydra overrides: write optim.lr=0.01"),
    (["--max-epochs", "3"], "write trainer.max_epochs=3"),
    (["--data.root", "/x"], "write data.root=/x"),
    (["model=resnt50"], "'model=resnt50': model has no option 'resnt50': did you mean model=resnet50"),
    (["model=resnt50"], "model.name= takes any timm or torchvision architecture"),
    (["-m", "freeze=none,hedonly"], "freeze has no option 'hedonly': did you mean freeze=head_only?"),
    (["+experiment=exmple"], "did you mean experiment=example?"),
])
def test_the_command_line_is_checked_before_hydra(args, says):
    with pytest.raises(UserError) as err:
        check_command_line(args)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args", [["--cfg", "job"], ["-m", "optim.lr=1e-3,3e-4", "freeze=none,head_only"],
                                  ["+experiment=example"], ["hydra/launcher=joblib"], ["hydra.run.dir=x"],
                                  ["model.weights.0.path=x"], ["freeze.schedule.2=all"], ["--info", "plugins"],
                                  ["-cd", "/mine", "model=my_own"], ["hparams_search=lr_freeze"],
                                  ["model=resnet18,resnet50"], ["~sched.min_lr"], ["freeze=choice(none,head_only)"]])
def test_what_hydra_accepts_passes(args):
    check_command_line(args)


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["data.root=PHOTOS"], "data.root is set but has no effect with data.name=demo"),
    (["+lr=0.01"], "did you mean optim.lr?"),
    (["--lr", "0.01"], "write optim.lr=0.01"),
    (["model=resnt50"], "did you mean model=resnet50"),
])
def test_the_cli_refuses_in_one_line_and_trains_nothing(tmp_path, args, says):
    """Today `data.root=DIR` trained on the demo shapes and reported a believable accuracy, `+lr=0.01`
    ran with optim.lr unchanged, `--lr` dumped argparse's usage and `model=resnt50` Hydra's search path."""
    root = make_image_folder(tmp_path / "photos", classes=2, train=2, val=1, size=16)
    args = [a.replace("PHOTOS", str(root)) for a in args]
    result = run_cli(args + ["trainer.max_epochs=1", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path)
    assert_clean_error(result, says)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------ pretrained weights offline
def cache_timm_weights(cache: Path, name: str) -> Path:
    """``name``'s pretrained file in a Hugging Face cache laid out as the hub client leaves it (random
    weights of the right shapes: what matters is where it is)."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cache / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(timm.create_model(name).state_dict(), snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def offline_env(cache: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}


def test_weights_fetch_finds_cached_weights_offline_and_names_the_folder_to_copy(tmp_path):
    cache = tmp_path / "hub"
    file = cache_timm_weights(cache, "test_resnet")
    result = subprocess.run([sys.executable, "-m", "finetune.weights", "fetch", "test_resnet"], cwd=tmp_path,
                            capture_output=True, text=True, env=os.environ | offline_env(cache), timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"test_resnet: {file}" in result.stdout and f"cache: {cache} (copy this folder" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "finetune.weights", "fetch", "test_vit"], cwd=tmp_path,
                             capture_output=True, text=True, env=os.environ | offline_env(cache), timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "python -m finetune.weights fetch test_vit" in missing.stderr


@pytest.mark.slow
def test_offline_training_points_to_fetching_the_weights_not_to_random_init(tmp_path):
    """Today the message said to set model.pretrained=false, which trains without transfer learning."""
    cache = tmp_path / "hub"
    root = make_image_folder(tmp_path / "images", classes=2, train=2, val=1, size=32)
    base = [a for a in tiny_overrides(root, epochs=1) if a != "model.pretrained=false"] + ["model.pretrained=true"]
    result = run_cli(base + ["model.name=test_vit", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path,
                     env=offline_env(cache))
    line = assert_clean_error(result, "python -m finetune.weights fetch test_vit", "model.weights=PATH")
    assert "model.pretrained=false would train from random weights: no transfer learning" in line
    file = cache_timm_weights(cache, "test_resnet")  # once fetched (here: placed) the same run loads it offline
    result = run_cli(base + [f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, env=offline_env(cache))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "b" / "load_report.json").read_text())
    assert [s["path"] for s in report["sources"]] == [str(file)] and report["loaded_fraction"] == 1.0



# ------------------------------------------------------------ what a run says it is about to do, and where files go
def test_a_run_starts_by_saying_what_it_will_do(tmp_path, caplog):
    """Data root and layout, classes with their counts, model and weights, what trains, device, length:
    each line checked against the data and the model it describes."""
    import logging

    from finetune.run import run

    root = make_image_folder(tmp_path / "images", classes=3, train=5, val=2)
    (root / "train" / "class_2" / "4.png").unlink()  # uneven: 5, 5, 4 train images
    caplog.set_level(logging.INFO, logger="finetune")
    run(compose_config(tiny_overrides(root, epochs=1) + ["freeze=head_only"]), run_dir=tmp_path / "run")
    block = caplog.text[caplog.text.index("---- starting: fine-tune test_resnet (timm) ----"):]
    lines = dict(line.split(None, 1) for line in block.splitlines()[1:7])
    assert lines["data"] == f"{root} (train/ and val/ folders): 3 classes, 14 train / 6 val images"
    assert lines["classes"] == "class_0 (5/2), class_1 (5/2), class_2 (4/2)"
    assert lines["weights"].startswith("random initialisation (no transfer learning")
    model = timm.create_model("test_resnet", num_classes=3)
    total, head = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.fc.parameters())
    assert lines["params"] == f"{head:,} of {total:,} trainable (freeze=head_only)"
    assert lines["compute"] == "cpu, precision 32, input 3x32x32"
    assert lines["schedule"] == "1 epochs of 4 updates (batch 4), adamw at lr 0.001"  # 14 images: 4 + 4 + 4 + 2


@pytest.mark.slow
def test_evaluate_and_predict_write_beside_the_run_and_say_where(tmp_path):
    """Before, both wrote into ./outputs/... of wherever they were started."""
    root = make_image_folder(tmp_path / "images", classes=2, train=3, val=2)
    run_dir = tmp_path / "run"
    assert run_cli(tiny_overrides(root, epochs=1) + [f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    for module, kind, name, args in (("finetune.evaluate", "eval", "metrics.json", []),
                                     ("finetune.predict", "predict", "predictions.csv", [f"inputs={root / 'val'}"])):
        result = subprocess.run([sys.executable, "-m", module, f"ckpt={run_dir}", *args], cwd=work,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (written,) = (run_dir / kind).glob(f"*/{name}")
        assert str(written.parent) in result.stdout + result.stderr
    assert list(work.iterdir()) == []  # nothing where they were started
