"""Parameter groups by function: every parameter in one stable group, per-group rates equal base x scale
(layer decay included, frozen parameters or not), no weight decay on norms, biases and timm's skip list."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from finetune.errors import UserError
from finetune.freezing import apply_freeze, plan_freeze
from finetune.models import build_model
from finetune.optim import build_optimizer, build_param_groups, build_scheduler
from conftest_weights import single_thread  # noqa: F401  (autouse: one thread for tiny models)


def scales_by_param(groups: list[dict]) -> dict[str, float]:
    return {n: g["lr_scale"] for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("name,head", [("test_vit", "head"), ("test_resnet", "fc"), ("test_convnext", "head.fc")])
def test_layer_decay_scales_equal_timms_when_nothing_is_frozen(name, head):
    model = timm.create_model(name, num_classes=3)
    ours = scales_by_param(build_param_groups(model, head=head, weight_decay=0.05, layer_decay=0.6))
    timms = {}
    for group in param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.6):
        ids = {id(p) for p in group["params"]}
        timms |= {n: group["lr_scale"] for n, p in model.named_parameters() if id(p) in ids}
    assert ours == pytest.approx(timms)
    assert len(set(ours.values())) > 3  # the decay really spreads the rates


def test_layer_decay_scales_and_groups_do_not_change_when_parameters_are_frozen():
    model = timm.create_model("test_vit", num_classes=3)
    free = build_param_groups(model, head="head", weight_decay=0.05, layer_decay=0.6)
    plan = plan_freeze(model, mode="until", head="head", until="blocks.2")
    apply_freeze(model, plan, bn="eval")
    frozen = build_param_groups(model, head="head", weight_decay=0.05, layer_decay=0.6)
    assert [(g["name"], g["lr_scale"], g["param_names"]) for g in frozen] == [
        (g["name"], g["lr_scale"], g["param_names"]) for g in free]
    assert sum(len(g["params"]) for g in frozen) == len(list(model.parameters()))  # frozen ones included


@pytest.mark.parametrize("freeze", ["none", "until"])
def test_group_rates_equal_base_times_scale_through_the_schedule(freeze):
    model = timm.create_model("test_vit", num_classes=3)
    apply_freeze(model, plan_freeze(model, mode=freeze, head="head", until="blocks.1"), bn="eval")
    groups = build_param_groups(model, head="head", weight_decay=0.05, layer_decay=0.5, head_lr_scale=3.0,
                                backbone_lr_mult=0.1)
    optimizer = build_optimizer(groups, name="adamw", lr=1e-3)
    for group in optimizer.param_groups:  # before any scheduler
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    scheduler = build_scheduler(optimizer, name="cosine", epochs=4, updates_per_epoch=5, warmup_epochs=1,
                                warmup_lr=1e-5, min_lr=0.0)
    for step in (1, 3, 7, 12):
        scheduler.step_update(num_updates=step)
        base = scheduler._get_values(step, on_epoch=False)[0]
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(base * group["lr_scale"]), (step, group["name"])
    scales = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}
    assert scales["head"] == pytest.approx(3.0)
    assert scales["backbone.blocks.5"] == pytest.approx(0.1 * 0.5)  # top block: one step below the head
    assert scales["backbone.stem"] == pytest.approx(0.1 * 0.5 ** 7)


def test_head_rate_and_backbone_multiplier_without_layer_decay():
    model = timm.create_model("test_resnet", num_classes=3)
    groups = build_param_groups(model, head="fc", weight_decay=0.05, head_lr_scale=10.0, backbone_lr_mult=0.5)
    optimizer = build_optimizer(groups, name="sgd", lr=0.01)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({"backbone": 0.005, "backbone_no_decay": 0.005, "head": 0.1, "head_no_decay": 0.1})


def test_no_weight_decay_on_norms_biases_and_timms_skip_list_unless_asked():
    model = timm.create_model("test_vit", num_classes=3)
    decay = {n: g["weight_decay"] for g in build_param_groups(model, head="head", weight_decay=0.05)
             for n in g["param_names"]}
    assert decay["pos_embed"] == 0.0 and decay["cls_token"] == 0.0  # model.no_weight_decay()
    assert decay["blocks.0.norm1.weight"] == 0.0 and decay["blocks.0.attn.qkv.bias"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["head.weight"] == 0.05
    everything = build_param_groups(model, head="head", weight_decay=0.05, decay_norm_and_bias=True)
    assert {g["weight_decay"] for g in everything} == {0.05}


def test_torchvision_layer_decay_follows_its_stages():
    model, spec = build_model(name="resnet18", source="torchvision", num_classes=3)
    groups = build_param_groups(model, head=spec.classifier, weight_decay=0.0, layer_decay=0.5)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales["head"] == 1.0 and scales["backbone.layer4"] == 0.5 and scales["backbone.conv1"] == 0.5 ** 6
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_frozen_parameters_get_no_update_and_no_state_but_keep_their_group():
    model = timm.create_model("test_resnet", num_classes=3)
    apply_freeze(model, plan_freeze(model, mode="head_only", head="fc"), bn="eval")
    optimizer = build_optimizer(build_param_groups(model, head="fc", weight_decay=0.1), name="adamw", lr=0.1)
    before = model.conv1[0].weight.clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert torch.equal(model.conv1[0].weight, before)  # weight decay does not touch it either
    assert set(optimizer.state) == {model.fc.weight, model.fc.bias}


def test_nesterov_sgd_without_momentum_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match=r"optim.name=sgd .* needs optim.momentum > 0 \(got '0'\).*optim.name=momentum"):
        build_optimizer([{"params": list(model.parameters())}], name="sgd", lr=0.1, momentum=0)
    plain = build_optimizer([{"params": list(model.parameters())}], name="momentum", lr=0.1, momentum=0)
    assert plain.param_groups[0]["momentum"] == 0 and not plain.param_groups[0]["nesterov"]
