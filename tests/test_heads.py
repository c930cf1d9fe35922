"""Heads by function: output shapes of every head and pooling, how a head starts, and the subset warm
start reproducing the pretrained logits of the classes it knows (weights built locally, no download)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from finetune import builders
from finetune.errors import UserError
from finetune.heads import final_layer, init_head, match_classes, warm_start_subset
from finetune.models import build_model
from finetune.weights import load_pretrained
from conftest import compose_config
from conftest_weights import single_thread  # noqa: F401  (autouse: one thread for tiny models)

INPUT = {"test_resnet": 32, "test_vit": 160, "test_convnext": 32, "resnet18": 32}
HEADS = [("linear", {}), ("mlp", {"hidden": [16, 8], "norm": "batch", "activation": "gelu"}),
         ("mlp", {"hidden": [16], "norm": "layer"})]


@pytest.mark.parametrize("source,name", [("timm", "test_resnet"), ("timm", "test_vit"), ("timm", "test_convnext"),
                                         ("torchvision", "resnet18")])
@pytest.mark.parametrize("head,kwargs", HEADS)
def test_each_head_gives_one_logit_per_class(source, name, head, kwargs):
    model, spec = build_model(name=name, source=source, num_classes=5, head=head, dropout=0.1, **kwargs)
    size = INPUT[name]
    assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 5)
    assert isinstance(final_layer(model, spec.classifier), nn.Linear)
    assert final_layer(model, spec.classifier).out_features == 5


@pytest.mark.parametrize("source,name,width", [("timm", "test_resnet", 96), ("timm", "test_vit", 64),
                                               ("torchvision", "resnet18", 512)])
def test_features_head_returns_embeddings(source, name, width):
    model, spec = build_model(name=name, source=source, num_classes=5, head="features")
    size = INPUT[name]
    assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, width)
    assert spec.num_classes == 0


@pytest.mark.parametrize("name,pool,width", [("test_resnet", "avgmax", 3), ("test_resnet", "catavgmax", 3),
                                             ("test_resnet", "max", 3), ("test_vit", "token", 3),
                                             ("test_vit", "avg", 3)])
def test_pooling_choices(name, pool, width):
    """The logits are the classifier applied to the features pooled as head.pool says, pooled here by hand."""
    torch.manual_seed(0)
    model, spec = build_model(name=name, source="timm", num_classes=width, pool=pool)
    size = INPUT[name]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.eval().forward_features(x)
        if name == "test_vit":  # tokens (batch, tokens, dim): the class token, or the mean of the patch tokens
            pooled = features[:, 0] if pool == "token" else features[:, model.num_prefix_tokens:].mean(dim=1)
            pooled = model.fc_norm(pooled)
        else:  # a feature map (batch, channels, height, width)
            avg, top = features.mean(dim=(2, 3)), features.amax(dim=(2, 3))
            pooled = {"avg": avg, "max": top, "avgmax": (avg + top) / 2, "catavgmax": torch.cat([avg, top], 1)}[pool]
        expected = model.get_submodule(spec.classifier)(pooled)
        assert expected.shape == (2, width)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_mlp_settings_are_recorded_so_the_same_model_rebuilds():
    model, spec = build_model(name="test_resnet", source="timm", num_classes=4, head="mlp", hidden=[16],
                              norm="batch")
    again, _ = build_model(name="test_resnet", source="timm", num_classes=4, **spec.head)
    again.load_state_dict(model.state_dict())  # strict: the same modules
    assert spec.head["head"] == "mlp" and spec.head["hidden"] == [16]
    _, linear = build_model(name="test_resnet", source="timm", num_classes=4)
    assert linear.head == {"pool": None, "dropout": 0.0}  # older weights files still rebuild


@pytest.mark.parametrize("mode", ["zeros", "trunc_normal"])
def test_head_init_touches_only_the_final_layer(mode):
    torch.manual_seed(0)
    model, spec = build_model(name="test_resnet", source="timm", num_classes=3, head="mlp", hidden=[16])
    hidden = model.fc[0].weight.clone()
    init_head(model, spec.classifier, mode)
    final = final_layer(model, spec.classifier)
    assert torch.equal(model.fc[0].weight, hidden)
    assert torch.count_nonzero(final.bias) == 0
    assert (final.weight.abs().max() == 0) == (mode == "zeros")
    assert final.weight.abs().max() <= 0.04


def test_bad_head_settings_fail_clearly():
    with pytest.raises(UserError, match="head=mlp needs at least one hidden size"):
        build_model(name="test_resnet", source="timm", num_classes=3, head="mlp")
    with pytest.raises(UserError, match="head.activation 'nope'"):
        build_model(name="test_resnet", source="timm", num_classes=3, head="mlp", hidden=[4], activation="nope")


# ---------------------------------------------------------------------------- subset
CLASSES = ["tench", "my_own_class", "great_white_shark", "Goldfish"]  # rows 0, -, 2, 1 of ImageNet-1k


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 1000-class test_resnet with random weights, saved as 'pretrained' weights."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=1000).eval()
    with torch.no_grad():
        model.fc.bias.normal_()  # a bias worth reproducing
    path = tmp_path_factory.mktemp("weights") / "pretrained.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_subset_warm_start_reproduces_the_pretrained_logits_of_known_classes(pretrained):
    source_model, path = pretrained
    model, spec = build_model(name="test_resnet", source="timm", num_classes=len(CLASSES))
    report = load_pretrained(model, str(path), classifier=spec.classifier)
    init_head(model, spec.classifier, "zeros")
    warm = warm_start_subset(model, spec.classifier, class_names=CLASSES, subset="imagenet", report=report)
    assert warm["warm_started"] == {"tench": 0, "great_white_shark": 2, "Goldfish": 1}
    assert warm["not_found"] == ["my_own_class"]
    inputs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, logits = source_model(inputs), model.eval()(inputs)
    torch.testing.assert_close(logits[:, [0, 2, 3]], expected[:, [0, 2, 1]], rtol=0, atol=1e-5)
    assert torch.count_nonzero(logits[:, 1]) == 0  # the new class starts as head.init says


def test_subset_through_the_config_and_a_mapping_file(pretrained, tmp_path):
    _, path = pretrained
    mapping = tmp_path / "map.yaml"
    mapping.write_text("my_own_class: 7\nGoldfish: 'goldfish'\n")
    cfg = compose_config(["model=resnet18", "model.name=test_resnet", f"model.weights={path}",
                          f"head.subset={mapping}"])
    model, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=len(CLASSES))
    report = builders.init_weights(cfg.model, model, spec, head=cfg.head, class_names=CLASSES, run_dir=tmp_path)
    assert report["subset"]["warm_started"] == {"my_own_class": 7, "Goldfish": 1}
    saved = json.loads((tmp_path / "load_report.json").read_text())
    assert saved["subset"]["not_found"] == ["tench", "great_white_shark"]
    assert torch.equal(model.fc.weight[1], pretrained[0].fc.weight[7])


def test_subset_without_any_known_class_names_the_classes_and_the_label_set():
    with pytest.raises(UserError) as err:
        match_classes(["cats_of_mine", "dogs_of_mine"], "imagenet")
    message = str(err.value)
    assert "'cats_of_mine'" in message and "1000 imagenet class names" in message and "'tench'" in message


def test_subset_needs_a_linear_head(pretrained):
    _, path = pretrained
    model, spec = build_model(name="test_resnet", source="timm", num_classes=3, head="mlp", hidden=[8])
    report = load_pretrained(model, str(path), classifier=spec.classifier)
    with pytest.raises(UserError, match="head.subset needs head=linear"):
        warm_start_subset(model, spec.classifier, class_names=CLASSES[:3], subset="imagenet", report=report)
