"""The real conf/ tree composes, and the schema stops bad configs before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from conftest import compose_config
from finetune.__main__ import CONFIG_DIR
from finetune.config import check_config
from finetune.errors import UserError

# experiment/ is a + group (whole recipes, tested in test_packaging.py); hydra/ is Hydra's own.
GROUP_OPTIONS = {group.name: sorted(p.stem for p in group.glob("*.yaml"))
                 for group in Path(CONFIG_DIR).iterdir() if group.is_dir() and group.name not in ("hydra", "experiment")}


def test_default_is_the_offline_demo():
    cfg = compose_config([])
    assert cfg.model.name == "tf_efficientnet_lite0" and cfg.model.weights == "builtin:efficientnet_lite0"
    assert cfg.model.pretrained is False and cfg.data.name == "demo"
    assert (cfg.head.name, cfg.freeze.name, cfg.optim.name, cfg.sched.name) == ("linear", "none", "adamw", "cosine")
    check_config(cfg)


def test_design_groups_have_their_options():
    for group, options in {"model": ["efficientnet_lite0", "resnet18", "resnet50", "efficientnet_b0",
                                     "convnext_tiny", "vit_small_patch16_224", "mobilenetv3_large_100"],
                           "data": ["demo", "custom"], "head": ["linear"], "freeze": ["none", "head_only"],
                           "optim": ["adamw", "sgd"], "sched": ["cosine"], "checkpoint": ["default"],
                           "trainer": ["default"], "logger": ["tensorboard"]}.items():
        assert set(options) <= set(GROUP_OPTIONS[group]), group


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    needs = {"custom": ["data.root=/somewhere"], "table": ["data.file=labels.csv"],
             "multilabel": ["data=table", "data.file=labels.csv"]}
    overrides = [f"{group}={option}"] + needs.get(option, [])
    check_config(compose_config(overrides))


def test_torchvision_models_say_so():
    cfg = compose_config(["model=tv_resnet50"])
    assert (cfg.model.source, cfg.model.name) == ("torchvision", "resnet50")


def test_misspelled_key_stops_composition_naming_it():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["trainer.max_epoch=3"])
    cause = info.value.__cause__
    assert isinstance(cause, ConfigAttributeError) and "full_key: trainer.max_epoch" in str(cause)


def test_misspelled_key_in_a_yaml_file_is_named(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = shutil.copytree(CONFIG_DIR, tmp_path / "conf")
    (conf / "optim" / "mine.yaml").write_text("name: adamw\nlr: 0.001\nweight_decya: 0.01\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            compose(config_name="config", overrides=["optim=mine"])
    assert "weight_decya" in str(info.value.__cause__) + str(info.value)


def test_wrong_type_stops_composition_naming_it():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["optim.weight_decay=fast"])
    assert isinstance(info.value.__cause__, ValidationError) and "optim.weight_decay" in str(info.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be positive, got '0.0'"),
    ("optim.lr=fast", "optim.lr must be a positive number or auto, got 'fast'"),  # lr takes auto too: checked here
    ("optim.lr=auto optim.head_lr=0.01", "optim.head_lr '0.01' needs a numeric optim.lr"),
    ("data.batch_size=-4", "data.batch_size must be positive, got '-4'"),
    ("trainer.accumulate=0", "trainer.accumulate must be positive, got '0'"),
    ("optim.weight_decay=-1", "optim.weight_decay must not be negative, got '-1.0'"),
    ("data.val_split=1.5", "data.val_split must be between 0 and 1, got '1.5'"),
    ("trainer.grad_clip=0", "trainer.grad_clip must be positive or null, got '0.0'"),
    ("model.source=keras", "model.source must be one of timm, torchvision; got 'keras'"),
    ("data.balance=oversample", "data.balance must be one of none, sampler, loss_weights; got 'oversample'"),
    ("trainer.precision=fp8", "trainer.precision must be one of 32, bf16, 16; got 'fp8'"),
    ("model.num_classes=1", "model.num_classes must be at least 2"),
])
def test_values_a_type_cannot_rule_out(override, message):
    with pytest.raises(UserError) as info:
        check_config(compose_config(override.split()))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_config_reference_is_the_schemas():
    """docs/config.md is generated from the schema (python scripts/config_reference.py): a key added,
    renamed or given another default without regenerating it fails here."""
    from conftest import REPO
    from finetune.config import reference_markdown, schema_keys

    written = (REPO / "docs" / "config.md").read_text()
    assert written == reference_markdown(), "docs/config.md is stale: run python scripts/config_reference.py"
    keys = [k for k in schema_keys() if not any(o.startswith(f"{k}.") for o in schema_keys())]
    assert all(f"| `{k}` |" in written for k in keys) and len(keys) > 80
