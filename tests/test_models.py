"""Backbones from timm and torchvision with new heads; names checked; offline fails fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import timm.models
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_config, make_image_folder, tiny_overrides
from finetune.checkpoint import load_model
from finetune.errors import UserError
from finetune.models import build_model, check_model_name, hub_reachable, locate_library_weights
from finetune.run import run


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"])
def test_timm_backbones_get_a_new_head(name):
    model, spec = build_model(name=name, source="timm", num_classes=4, input_size=64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    head = model.get_submodule(spec.classifier)
    assert head.weight.shape[0] == 4
    assert spec.data_config["input_size"] == (3, 64, 64) and len(spec.data_config["mean"]) == 3


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("squeezenet1_0", "classifier.1")])
def test_torchvision_backbones_get_their_head_replaced(name, head):
    model, spec = build_model(name=name, source="torchvision", num_classes=5)
    assert spec.classifier == head
    assert model.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_torchvision_grayscale_input_and_head_dropout():
    model, spec = build_model(name="resnet18", source="torchvision", num_classes=3, in_chans=1, dropout=0.3)
    assert model.get_submodule(spec.first_conv).in_channels == 1
    assert spec.classifier == "fc.1" and spec.data_config["input_size"][0] == 1
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UserError, match=r"model.name 'resnt50' is not a timm model; did you mean: resnet50"):
        check_model_name("resnt50", "timm")
    with pytest.raises(UserError, match=r"'vit_b_16' is a torchvision model.*model.source=torchvision"):
        check_model_name("vit_b_16", "timm")
    with pytest.raises(UserError, match=r"'resnet50d' is a timm model"):
        check_model_name("resnet50d", "torchvision")


def test_library_weights_offline_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    assert hub_reachable("huggingface.co") is False
    with pytest.raises(UserError, match=r"run `python -m finetune.weights fetch test_resnet` and copy the cache "
                                        r"folder it prints to this one, or give a weights file with model.weights=PATH"):
        locate_library_weights("test_resnet", "timm")
    with pytest.raises(UserError, match="torchvision's weights for 'resnet18'"):
        locate_library_weights("resnet18", "torchvision")


def test_cached_torchvision_weights_are_used_without_network(monkeypatch, tmp_path):
    import torchvision

    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "torch" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    assert locate_library_weights("resnet18", "torchvision") == cached


def test_unreachable_host_answers_within_the_deadline():
    assert hub_reachable("host.invalid", timeout=0.5) is False


# ------------------------------------------------ timm pretrained tags and hf-hub: names (issue 21)
def cache_repo(cache: Path, repo: str, files: dict[str, dict[str, torch.Tensor] | dict]) -> Path:
    """Hugging Face Hub repository ``repo`` in ``cache`` laid out as the hub client leaves it (refs/main,
    one snapshot): ``.safetensors`` entries hold tensors, ``.json`` ones the dict. Returns the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        if name.endswith(".json"):
            (snapshot / name).write_text(json.dumps(content))
        else:
            save_file(content, snapshot / name)
    return snapshot


def hub_files(scratch: Path, name: str, **pretrained_cfg) -> dict:
    """config.json and model.safetensors of timm's ``name`` as ``timm.models.save_for_hf`` writes them for
    the hub (random weights: what matters is where they are), written in ``scratch`` and read back."""
    timm.models.save_for_hf(timm.create_model(name), scratch, safe_serialization=True,
                            model_config={"pretrained_cfg": pretrained_cfg})
    return {"config.json": json.loads((scratch / "config.json").read_text()),
            "model.safetensors": load_file(scratch / "model.safetensors")}


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache in tmp_path, the hub unreachable (no test downloads)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("name", ["resnet50.a1_in1k", "convnext_tiny.fb_in22k", "test_resnet.r160_in1k"])
def test_timm_pretrained_tags_are_model_names(name):
    check_model_name(name, "timm")  # before: "model.name 'resnet50.a1_in1k' is not a timm model"
    assert name in timm.list_models(pretrained=True)


def test_a_tagged_model_is_built_with_its_tags_pretrained_config():
    model, spec = build_model(name="test_resnet.r160_in1k", source="timm", num_classes=3, input_size=32)
    assert spec.name == "test_resnet.r160_in1k" and spec.classifier == "fc"
    assert model.pretrained_cfg["tag"] == "r160_in1k" and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name, says", [
    ("test_resnet.r160_in1j", "model.name 'test_resnet.r160_in1j': timm has no pretrained tag 'r160_in1j' for "
                              "'test_resnet'; did you mean: test_resnet.r160_in1k?"),
    ("test_resnt.r160_in1k", "model.name 'test_resnt.r160_in1k' is not a timm model; did you mean: "
                             "test_resnet.r160_in1k"),
    ("resnet50.a1_in1k_xyz_nothing_like_it", "timm has no pretrained tag 'a1_in1k_xyz_nothing_like_it' for "
                                             "'resnet50'; its tags: resnet50.a1_in1k, resnet50.a1h_in1k, "),
    ("test_resnet.laion2b_ft_in22k_in1k", "timm has no pretrained tag 'laion2b_ft_in22k_in1k' for 'test_resnet'; "
                                          "its tags: test_resnet.r160_in1k"),
    ("timm/test_resnet.r160_in1k", "Use 'hf-hub:timm/test_resnet.r160_in1k' to load from the Hub"),
    ("hf-hb:timm/test_resnet", "Unknown model source 'hf-hb'"),
])
def test_mistyped_tags_and_names_say_what_was_meant(name, says):
    with pytest.raises(UserError) as err:
        check_model_name(name, "timm")
    assert says in str(err.value), str(err.value)


def test_a_tagged_timm_name_given_to_torchvision_says_it_is_timms():
    with pytest.raises(UserError, match=r"'resnet50.a1_in1k' is a timm model, not a torchvision one"):
        check_model_name("resnet50.a1_in1k", "torchvision")


def test_library_weights_are_exactly_the_tags_found_offline(offline_hub):
    tensors = {"w": torch.zeros(1)}
    a1 = cache_repo(offline_hub, "timm/resnet18.a1_in1k", {"model.safetensors": tensors})
    tv = cache_repo(offline_hub, "timm/resnet18.tv_in1k", {"model.safetensors": tensors})
    assert locate_library_weights("resnet18.tv_in1k", "timm") == tv / "model.safetensors"
    assert locate_library_weights("resnet18.a1_in1k", "timm") == a1 / "model.safetensors"
    assert locate_library_weights("resnet18", "timm") == a1 / "model.safetensors"  # timm's default tag
    with pytest.raises(UserError, match=r"timm's weights for 'resnet18.a2_in1k' from the Hugging Face Hub "
                                        r"\(timm/resnet18.a2_in1k\), which is not reachable and not cached: on a "
                                        r"machine with internet run `python -m finetune.weights fetch "
                                        r"resnet18.a2_in1k`"):
        locate_library_weights("resnet18.a2_in1k", "timm")


def test_a_hub_name_builds_the_architecture_its_cached_config_names(offline_hub, tmp_path):
    """A repository whose name says nothing of its architecture: the config says test_resnet, and its
    preprocessing (mean) is the run's."""
    files = hub_files(tmp_path / "saved", "test_resnet.r160_in1k", mean=[0.1, 0.2, 0.3])
    snapshot = cache_repo(offline_hub, "someone/cats-v2", files)
    for name in ("hf-hub:someone/cats-v2", "hf-hub:someone/cats-v2@main"):
        model, spec = build_model(name=name, source="timm", num_classes=3, input_size=32)
        assert type(model).__name__ == "ResNet" and spec.name == name and spec.classifier == "fc"
        assert spec.data_config["mean"] == (0.1, 0.2, 0.3) and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
        assert locate_library_weights(name, "timm") == snapshot / "model.safetensors"
    reference = timm.create_model("test_resnet", num_classes=3)
    assert model.state_dict().keys() == reference.state_dict().keys()
    with pytest.raises(UserError) as err:
        build_model(name="hf-hub:someone/not-cached", source="timm", num_classes=3)
    assert str(err.value) == (
        "model.name 'hf-hub:someone/not-cached' names its architecture in config.json on the Hugging Face Hub "
        "(someone/not-cached), which is not reachable and not cached: on a machine with internet run "
        "`python -m finetune.weights fetch hf-hub:someone/not-cached` and copy the cache folder it prints to this one")


def test_a_hub_config_naming_an_unknown_architecture_is_refused(offline_hub):
    cache_repo(offline_hub, "someone/future", {"config.json": {"architecture": "resnet9000", "pretrained_cfg": {}}})
    with pytest.raises(UserError, match=r"model.name 'hf-hub:someone/future': its config names the architecture "
                                        r"'resnet9000', which timm [0-9.a-z]+ does not have: upgrade timm"):
        check_model_name("hf-hub:someone/future", "timm")


@pytest.mark.parametrize("name", ["test_resnet.r160_in1k", "hf-hub:timm/test_resnet.r160_in1k"])
def test_a_run_from_a_tag_or_hub_name_loads_that_repositorys_weights_offline(offline_hub, tmp_path, name):
    files = hub_files(tmp_path / "saved", "test_resnet.r160_in1k")
    snapshot = cache_repo(offline_hub, "timm/test_resnet.r160_in1k", files)
    root = make_image_folder(tmp_path / "images", classes=2, train=2, val=1)
    overrides = [o for o in tiny_overrides(root, epochs=1) if o != "model.pretrained=false"]
    run(compose_config(overrides + ["model.pretrained=true", f"model.name={name}"]), run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "load_report.json").read_text())
    assert [s["path"] for s in report["sources"]] == [str(snapshot / "model.safetensors")]
    assert report["loaded_fraction"] == 1.0
    model, meta = load_model(tmp_path / "run" / "checkpoints" / "last.safetensors")  # rebuilt offline
    assert meta.name == name and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_weights_fetch_takes_tags_and_hub_names(tmp_path):
    cache = tmp_path / "hub"
    tagged = cache_repo(cache, "timm/test_resnet.r160_in1k", {"model.safetensors": {"w": torch.zeros(1)}})
    hub = cache_repo(cache, "someone/cats-v2", hub_files(tmp_path / "saved", "test_resnet.r160_in1k"))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "finetune.weights", "fetch", "test_resnet.r160_in1k",
                             "hf-hub:someone/cats-v2"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [f"test_resnet.r160_in1k: {tagged / 'model.safetensors'}",
                                              f"hf-hub:someone/cats-v2: {hub / 'model.safetensors'}"]


def test_a_local_dir_name_builds_from_the_folders_config_and_weights(tmp_path):
    folder = tmp_path / "exported"
    hub_files(folder, "test_resnet.r160_in1k", std=[0.2, 0.2, 0.2])
    model, spec = build_model(name=f"local-dir:{folder}", source="timm", num_classes=3, input_size=32)
    assert type(model).__name__ == "ResNet" and spec.data_config["std"] == (0.2, 0.2, 0.2)
    assert locate_library_weights(f"local-dir:{folder}", "timm") == folder / "model.safetensors"
    with pytest.raises(UserError, match=rf"model.name 'local-dir:{tmp_path}': '{tmp_path / 'config.json'}' does "
                                        "not exist"):
        check_model_name(f"local-dir:{tmp_path}", "timm")
