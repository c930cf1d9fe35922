"""Optimizer from named, stable parameter groups, and a per-update timm scheduler.

Every parameter is in exactly one group whether it is trainable now or not, so the
optimizer-state layout never depends on what is frozen when it is built or restored
(frozen parameters get no gradient, hence no update and no state, until unfrozen).

Groups are ``{backbone, head} x {decay, no_decay}``; with ``layer_decay`` the backbone
is split per layer of timm's fine ``group_matcher`` (or per stage for models without
one) and each layer gets ``lr_scale = backbone_lr_mult * layer_decay ** (depth from
the top)``. Unlike timm's ``param_groups_layer_decay`` the layer count and scales
come from *all* parameters, frozen ones included (timm#2691), so they do not change
with what is frozen. A group's rate is ``lr * lr_scale``; timm schedulers apply
``lr_scale`` on every update.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm.optim
import timm.scheduler
import torch
from timm.models import group_parameters
from torch import nn

from finetune.errors import UserError
from finetune.freezing import find_stages, group_label
from finetune.weights.remap import is_under


def layer_ids(model: nn.Module, *, head: str) -> tuple[dict[str, int], dict[int, str]]:
    """``{parameter: layer id}`` (0 = input side; the head on the top layer) and a readable name per layer.

    Uses timm's fine ``group_matcher`` when the model has one, else the stages of
    ``finetune.freezing.find_stages`` (torchvision: top-level children).
    """
    matcher = model.group_matcher(coarse=False) if hasattr(model, "group_matcher") else {}
    if matcher:
        layers = group_parameters(model, matcher)
        layers = {i: names for i, (_, names) in enumerate(sorted(layers.items()))}
    else:
        layers = {i: stage.params for i, stage in enumerate(find_stages(model, head=head))}
    ids = {name: i for i, names in layers.items() for name in names}
    labels = {i: group_label(names, matcher, first=i == 0) for i, names in layers.items()}
    return ids, labels


def build_param_groups(model: nn.Module, *, head: str, weight_decay: float, decay_norm_and_bias: bool = False,
                       head_lr_scale: float = 1.0, backbone_lr_mult: float = 1.0,
                       layer_decay: float | None = None) -> list[dict]:
    """Split parameters into named groups, each with ``lr_scale``; norms, biases and a timm model's
    ``no_weight_decay()`` names skip weight decay unless ``decay_norm_and_bias``.

    >>> import timm
    >>> groups = build_param_groups(timm.create_model("test_resnet"), head="fc", weight_decay=0.05)
    >>> [g["name"] for g in groups]
    ['backbone', 'backbone_no_decay', 'head', 'head_no_decay']
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ids, labels = layer_ids(model, head=head) if layer_decay is not None else ({}, {})
    top = max(ids.values(), default=0)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        no_decay = not decay_norm_and_bias and (param.ndim <= 1 or name in skip)
        if is_under(name, head):
            part, scale = "head", head_lr_scale
        elif layer_decay is None:
            part, scale = "backbone", backbone_lr_mult
        else:
            layer = ids.get(name, top)
            part, scale = f"backbone.{labels.get(layer, layer)}", backbone_lr_mult * layer_decay ** (top - layer)
        key = f"{part}_no_decay" if no_decay else part
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [], "lr_scale": scale,
                                        "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def takes_betas(name: str) -> bool:
    """Whether ``optim.betas`` reaches the optimizer ``name`` (Adam-style ones and LAMB)."""
    return "adam" in name or "lamb" in name


def takes_momentum(name: str) -> bool:
    """Whether ``optim.momentum`` reaches the optimizer ``name`` (the SGD family)."""
    return name in ("sgd", "momentum", "nesterov")


def build_optimizer(param_groups: list[dict], *, name: str, lr: float, momentum: float = 0.9,
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Any optimizer timm knows by name (adamw, sgd, lamb, ...) over the given groups."""
    kwargs = {"betas": tuple(betas)} if takes_betas(name) else {}
    if name in ("sgd", "nesterov") and not momentum > 0:  # torch would fail deep inside with a ValueError
        raise UserError(f"optim.name={name} is SGD with Nesterov momentum, which needs optim.momentum > 0 (got "
                        f"'{momentum}'): for plain SGD use optim.name=momentum optim.momentum=0")
    if takes_momentum(name):
        kwargs["momentum"] = momentum
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups]
    for group in groups:  # timm schedulers start from initial_lr and multiply by lr_scale on every update
        group |= {"lr": lr * group.get("lr_scale", 1.0), "initial_lr": lr}
    return timm.optim.create_optimizer_v2(groups, opt=name, lr=lr, **kwargs)


# sched.name: the timm schedules stepped per update that take these arguments, or none (constant rate)
SCHEDULERS = ("cosine", "step", "multistep", "poly", "tanh", "none")


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str, epochs: int, updates_per_epoch: int,
                    warmup_epochs: float, warmup_lr: float, min_lr: float = 0.0,
                    decay_epochs: float = 30.0, decay_rate: float = 0.1) -> timm.scheduler.Scheduler | None:
    """A timm scheduler stepped per optimizer update (``step_update``); ``none`` = constant rate."""
    if name == "none":
        return None
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs, decay_epochs=decay_epochs, decay_rate=decay_rate,
        min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
        warmup_prefix=True, step_on_epochs=False, updates_per_epoch=updates_per_epoch)  # decay starts at the peak
    return scheduler
