"""Freezing by function: frozen tensors stay bit-identical through real training steps, the schedule
unfreezes on time, a resume mid-schedule continues exactly, and bad names fail naming what exists."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.errors import UserError
from finetune.freezing import (FreezeController, FrozenBatchNorm2d, FrozenParametersChanged, apply_freeze,
                               find_stages, plan_freeze)
from finetune.models import build_model
from finetune.optim import build_optimizer, build_param_groups
from finetune.trainer import Trainer, TrainerHook, TrainState
from conftest_weights import single_thread  # noqa: F401  (autouse: one thread for tiny models)

MODELS = [("timm", "test_resnet"), ("torchvision", "resnet18")]


def tiny_batches(n: int = 3, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def loader(seed: int = 0) -> DataLoader:
    x, y = zip(*tiny_batches(seed=seed))
    return DataLoader(TensorDataset(torch.cat(x), torch.cat(y)), batch_size=4, shuffle=False)


def frozen_model(source: str, name: str, *, bn: str, mode: str = "until", until: str = "layer2",
                 schedule: dict | None = None, max_epochs: int = 4):
    torch.manual_seed(0)
    model, spec = build_model(name=name, source=source, num_classes=3, input_size=32)
    plan = plan_freeze(model, mode=mode, head=spec.classifier, until=until, schedule=schedule,
                       max_epochs=max_epochs)
    apply_freeze(model, plan, bn=bn)
    groups = build_param_groups(model, head=spec.classifier, weight_decay=0.05)
    optimizer = build_optimizer(groups, name="adamw", lr=1e-2)
    return model, spec, plan, optimizer


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for inputs, target in tiny_batches(steps):
        model.train()  # every step: pinned BatchNorm must survive it
        nn.functional.cross_entropy(model(inputs), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source,name", MODELS)
@pytest.mark.parametrize("bn", ["eval", "frozen"])
def test_frozen_parameters_and_batchnorm_buffers_stay_bit_identical(source, name, bn):
    model, _, plan, optimizer = frozen_model(source, name, bn=bn)
    controller = FreezeController(model, plan, bn=bn)
    controller.on_epoch_start(TrainState())
    before = snapshot(model)
    train_steps(model, optimizer)
    after = model.state_dict()
    frozen_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.")
    frozen_keys = [k for k in before if k.startswith(frozen_prefixes)]
    assert frozen_keys and any("running_mean" in k for k in frozen_keys)
    for key in frozen_keys:
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    for key in ("layer4.0.bn1.running_mean", "layer4.0.conv1.weight", "fc.weight"):
        assert not torch.equal(before[key], after[key]), f"trainable {key} did not train"
    controller.verify()  # and the cheap check agrees
    swapped = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bool(swapped) == (bn == "frozen")
    assert set(before) == set(after)  # FrozenBatchNorm2d keeps the BatchNorm2d state-dict keys


@pytest.mark.parametrize("name,size", [("test_efficientnet", 32), ("test_vit", 160)])
def test_head_only_keeps_every_backbone_tensor_of_other_architectures(name, size):
    """timm's BatchNormAct2d (pinned to eval under bn=frozen) and a BN-free ViT."""
    torch.manual_seed(0)
    model, spec = build_model(name=name, source="timm", num_classes=3)
    plan = plan_freeze(model, mode="head_only", head=spec.classifier)
    apply_freeze(model, plan, bn="frozen")
    optimizer = build_optimizer(build_param_groups(model, head=spec.classifier, weight_decay=0.05), name="adamw",
                                lr=1e-2)
    before = snapshot(model)
    for inputs, target in tiny_batches(2, size=size):
        model.train()
        nn.functional.cross_entropy(model(inputs), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{spec.classifier}.weight", f"{spec.classifier}.bias"}


def test_bn_train_updates_statistics_of_frozen_parts_but_not_their_parameters():
    model, _, plan, optimizer = frozen_model("timm", "test_resnet", bn="train")
    controller = FreezeController(model, plan, bn="train")
    controller.on_epoch_start(TrainState())
    before = snapshot(model)
    train_steps(model, optimizer)
    after = model.state_dict()
    assert not torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert torch.equal(before["layer1.0.bn1.weight"], after["layer1.0.bn1.weight"])
    assert torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    controller.verify()  # moving statistics are what bn=train asks for, not an error


@pytest.mark.parametrize("key", ["layer1.0.conv1.weight", "layer1.0.bn1.running_var"])
def test_verification_fails_loudly_naming_a_frozen_tensor_that_changed(key):
    model, _, plan, _ = frozen_model("timm", "test_resnet", bn="eval")
    controller = FreezeController(model, plan, bn="eval")
    controller.on_epoch_start(TrainState())
    with torch.no_grad():
        tensor = model.state_dict()[key]
        tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], torch.tensor(float("inf")))  # one ulp
    with pytest.raises(FrozenParametersChanged, match=key.replace(".", r"\.")):
        controller.on_epoch_end(TrainState(epoch=1), {}, None, False)
    assert isinstance(FrozenParametersChanged("x"), UserError)


class Recorder(TrainerHook):
    """What is trainable while each epoch trains, and the weights after each epoch."""

    def __init__(self, model: nn.Module):
        self.model, self.trainable, self.weights = model, {}, {}

    def on_epoch_start(self, state):
        self.trainable[state.epoch] = {n for n, p in self.model.named_parameters() if p.requires_grad}

    def on_epoch_end(self, state, logs, result, improved):
        self.weights[state.epoch] = snapshot(self.model)


def make_trainer(model, optimizer, hooks, max_epochs):
    return Trainer(model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), device=torch.device("cpu"),
                   num_classes=3, max_epochs=max_epochs, hooks=hooks, progress_bar=False)


@pytest.mark.parametrize("bn", ["eval", "frozen"])
def test_schedule_unfreezes_each_stage_at_its_epoch(bn):
    schedule = {1: "layer4", 2: "all"}
    model, _, plan, optimizer = frozen_model("timm", "test_resnet", bn=bn, mode="head_only", schedule=schedule)
    initial = snapshot(model)
    recorder = Recorder(model)
    make_trainer(model, optimizer, [FreezeController(model, plan, bn=bn), recorder], 3).fit(loader(), loader(1))
    head = {"fc.weight", "fc.bias"}
    layer4 = {n for n, _ in model.named_parameters() if n.startswith("layer4.")}
    assert recorder.trainable[0] == head
    assert recorder.trainable[1] == head | layer4
    assert recorder.trainable[2] == {n for n, _ in model.named_parameters()}
    after1, after2 = recorder.weights[1], recorder.weights[2]
    assert torch.equal(after1["layer4.0.conv1.weight"], initial["layer4.0.conv1.weight"])
    assert torch.equal(after1["layer4.0.bn1.running_mean"], initial["layer4.0.bn1.running_mean"])
    assert not torch.equal(after2["layer4.0.conv1.weight"], initial["layer4.0.conv1.weight"])
    assert not torch.equal(after2["layer4.0.bn1.running_mean"], initial["layer4.0.bn1.running_mean"])
    assert torch.equal(after2["layer1.0.conv1.weight"], initial["layer1.0.conv1.weight"])
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # all swapped back


def test_resume_in_the_middle_of_a_schedule_restores_groups_and_optimizer_state_exactly():
    schedule = {1: "layer4", 2: "all"}

    def build():
        model, _, plan, optimizer = frozen_model("timm", "test_resnet", bn="frozen", mode="head_only",
                                                 schedule=schedule)
        return model, optimizer, FreezeController(model, plan, bn="frozen")

    straight, straight_opt, straight_ctl = build()
    make_trainer(straight, straight_opt, [straight_ctl], 3).fit(loader(), loader(1))

    first, first_opt, first_ctl = build()
    state = make_trainer(first, first_opt, [first_ctl], 2).fit(loader(), loader(1))  # layer4 has trained
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": first_opt.state_dict(),
                           "freeze": first_ctl.state_dict(), "state": state.to_dict()})

    resumed, resumed_opt, resumed_ctl = build()
    resumed.load_state_dict(saved["model"])
    resumed_ctl.load_state_dict(saved["freeze"])
    resumed_opt.load_state_dict(saved["optimizer"])
    assert ({n for n, p in resumed.named_parameters() if p.requires_grad}
            == {n for n, p in first.named_parameters() if p.requires_grad})
    assert resumed_opt.state_dict()["param_groups"] == first_opt.state_dict()["param_groups"]
    for a, b in zip(resumed_opt.state_dict()["state"].values(), first_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(saved["optimizer"]["state"]) == len(list(first.layer4.parameters())) + 2  # layer4 + head

    make_trainer(resumed, resumed_opt, [resumed_ctl], 3).fit(loader(), loader(1), state=TrainState(**saved["state"]))
    final, expected = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resumed run differs from the straight one"


def test_resume_with_a_different_schedule_is_refused():
    model, _, plan, _ = frozen_model("timm", "test_resnet", bn="eval", mode="head_only", schedule={1: "layer4"})
    with pytest.raises(UserError, match="freeze.schedule"):
        FreezeController(model, plan, bn="eval").load_state_dict({"applied": [], "schedule": {"2": "layer4"}})


def test_stages_of_timm_and_torchvision_backbones():
    timm_model, timm_spec = build_model(name="test_resnet", source="timm", num_classes=3)
    tv_model, tv_spec = build_model(name="resnet18", source="torchvision", num_classes=3)
    assert [s.name for s in find_stages(timm_model, head=timm_spec.classifier)] == [
        "stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [s.name for s in find_stages(tv_model, head=tv_spec.classifier)] == [
        "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"]
    stages = find_stages(tv_model, head=tv_spec.classifier)
    assert sorted(n for s in stages for n in s.params) == sorted(n for n, _ in tv_model.named_parameters())


def test_patterns_freeze_included_minus_excluded():
    model, spec = build_model(name="test_resnet", source="timm", num_classes=3)
    plan = plan_freeze(model, mode="patterns", head=spec.classifier, include=[r"^layer[12]\.", "stem"],
                       exclude=[r"\.bn\d\."])
    assert "conv1.0.weight" in plan.frozen and "layer2.0.conv1.weight" in plan.frozen
    assert "layer1.0.bn1.weight" not in plan.frozen and "layer3.0.conv1.weight" not in plan.frozen


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "until", "until": "layer9"}, "freeze.until 'layer9' is not a stage of this model; its stages are: "
                                           "stem, layer1, layer2, layer3, layer4"),
    ({"mode": "patterns", "include": ["^nothing"]}, "freeze.include '^nothing' is neither a stage nor a pattern"),
    ({"mode": "patterns", "include": ["layer1"], "exclude": ["layer3"]}, "freeze.exclude 'layer3' matches none"),
    ({"mode": "head_only", "schedule": {2: "blocks.9"}}, "freeze.schedule[2] 'blocks.9' is neither a stage"),
    ({"mode": "head_only", "schedule": {4: "layer4"}}, "freeze.schedule epoch 4 is outside 1..3"),
    ({"mode": "until", "until": "layer1", "schedule": {1: "layer4"}}, "unfreezes nothing"),
    ({"mode": "frozen_stages"}, "freeze.name 'frozen_stages' is not known"),
])
def test_bad_freeze_settings_fail_naming_the_value_and_what_exists(kwargs, message):
    model, spec = build_model(name="test_resnet", source="timm", num_classes=3)
    with pytest.raises(UserError) as err:
        plan_freeze(model, head=spec.classifier, max_epochs=4, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stage_error_lists_torchvision_stage_names():
    model, spec = build_model(name="resnet18", source="torchvision", num_classes=3)
    with pytest.raises(UserError, match="conv1, bn1, layer1, layer2, layer3, layer4"):
        plan_freeze(model, mode="until", head=spec.classifier, until="stem")


# ---------------------------------------------------------------------- through the real config
def test_gradual_unfreezing_run_from_the_config(tmp_path):
    from safetensors.torch import load_file

    from conftest import compose_config, make_image_folder, tiny_overrides
    from finetune.run import run
    from finetune.runtime import seed_everything

    root = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(root, epochs=2) + ["freeze=until", "freeze.until=layer2", "freeze.bn=frozen",
                                                  "+freeze.schedule={1: layer2}", "optim.layer_decay=0.7"]
    run(compose_config(overrides), run_dir=tmp_path / "out")
    log_text = (tmp_path / "out" / "train.log").read_text()
    assert "freeze.schedule: epoch 1 unfreezes 'layer2'" in log_text
    assert "stage" in log_text and "batchnorm" in log_text  # the per-stage table
    seed_everything(0)
    initial, _ = build_model(name="test_resnet", source="timm", num_classes=3, input_size=32)
    trained = load_file(tmp_path / "out" / "checkpoints" / "last.safetensors")
    for key, value in initial.state_dict().items():
        if key.startswith(("conv1.", "bn1.", "layer1.")):
            assert torch.equal(trained[key], value), f"frozen {key} changed"
    assert not torch.equal(trained["layer2.0.conv1.weight"], initial.state_dict()["layer2.0.conv1.weight"])


def test_a_stage_that_does_not_exist_stops_the_run_before_training(tmp_path):
    from conftest import compose_config, make_image_folder, tiny_overrides
    from finetune.run import run

    root = make_image_folder(tmp_path / "images")
    with pytest.raises(UserError, match="freeze.until 'layer9' is not a stage of this model; its stages are: stem"):
        run(compose_config(tiny_overrides(root, epochs=1) + ["freeze=until", "freeze.until=layer9"]),
            run_dir=tmp_path / "out")


def test_resume_mid_schedule_through_the_run_continues_bit_identical(tmp_path):
    """Saved mid-epoch while layer4 had just been unfrozen; 'all' is still to come."""
    import shutil

    from conftest import compose_config, make_image_folder, tiny_overrides
    from finetune.run import run
    from test_checkpoint import assert_same_result

    root = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(root, epochs=3) + [
        "freeze=head_only", "freeze.bn=frozen", "+freeze.schedule={1: layer4, 2: all}", "optim.layer_decay=0.8",
        "checkpoint.every_n_steps=2", "checkpoint.keep_last_k=null"]
    run(compose_config(overrides), run_dir=tmp_path / "ref")
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", out)
    state = out / "checkpoints" / "epoch001-step000006.ckpt"  # 1 epoch done, 1 batch into the second
    saved = torch.load(state, weights_only=True)
    assert saved["freeze"]["applied"] == [1]
    assert len(saved["optimizer"]["state"]) == len([k for k in saved["model"] if k.startswith("layer4.")
                                                    and not k.endswith(("running_mean", "running_var",
                                                                        "num_batches_tracked"))]) + 2
    run(compose_config(overrides + [f"resume={state}"]), run_dir=out)
    assert_same_result(out, tmp_path / "ref")


def test_unfreezing_a_frozen_batchnorm_after_a_move_keeps_the_moved_tensors_and_the_same_parameters():
    model, _, plan, _ = frozen_model("timm", "test_resnet", bn="frozen", mode="head_only", schedule={1: "all"})
    weight = model.layer1[0].bn1.weight
    controller = FreezeController(model, plan, bn="frozen")
    model.double()  # like .to("cuda"): buffers are replaced, parameters keep their identity
    controller.unfreeze(1)
    bn = model.layer1[0].bn1
    assert type(bn) is nn.BatchNorm2d and bn.weight is weight and bn.weight.requires_grad
    assert bn.running_mean.dtype == torch.float64 and bn.training == model.training


def test_a_frozen_groups_rate_is_logged_as_zero_until_it_unfreezes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import compose_config, make_image_folder, tiny_overrides
    from finetune.run import run

    root = make_image_folder(tmp_path / "images")  # 5 updates per epoch
    run(compose_config(tiny_overrides(root, epochs=3) + ["freeze=head_only", "+freeze.schedule={1: layer4, 2: all}",
                                                         "optim.layer_decay=0.8"]),
        run_dir=tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tb"), size_guidance={"scalars": 0}).Reload()
    rates = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("lr/")}
    unfrozen_from = {"lr/head": 1, "lr/backbone.layer4.0": 6, "lr/backbone.stem": 11}  # the update it trains from
    for tag, step in unfrozen_from.items():
        assert len(rates[tag]) == 15, tag  # one rate per update
        assert [r > 0.0 for r in rates[tag]] == [False] * (step - 1) + [True] * (16 - step), (tag, rates[tag])
        assert all(r == 0.0 for r in rates[tag][:step - 1]), tag
