"""Backbones from timm and torchvision with new heads; names checked; offline fails fast."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import UserError
from finetune.models import build_model, check_model_name, hub_reachable, locate_library_weights


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
