"""Optimizer from named, stable parameter groups, and a per-update timm scheduler.

Groups are ``{backbone, head} x {decay, no_decay}``; every parameter is in exactly
one group whether it is trainable now or not, so the optimizer-state layout never
depends on what is frozen at the moment it is built or restored.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm.optim
import timm.scheduler
import torch
from torch import nn


def build_param_groups(model: nn.Module, *, head: str, weight_decay: float,
                       decay_norm_and_bias: bool = False) -> list[dict]:
    """Split parameters into named groups; norms and biases skip weight decay unless asked."""
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        part = "head" if name == head or name.startswith(head + ".") else "backbone"
        no_decay = param.ndim <= 1 and not decay_norm_and_bias  # biases, norm scales/shifts
        key = f"{part}_no_decay" if no_decay else part
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [],
                                        "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(param)
        group["param_names"].append(name)
    order = ("backbone", "backbone_no_decay", "head", "head_no_decay")
    return [groups[k] for k in order if k in groups]


def build_optimizer(param_groups: list[dict], *, name: str, lr: float, momentum: float = 0.9,
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Any optimizer timm knows by name (adamw, sgd, lamb, ...) over the given groups."""
    kwargs = {"betas": tuple(betas)} if "adam" in name or "lamb" in name else {}
    if name in ("sgd", "momentum", "nesterov"):
        kwargs["momentum"] = momentum
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups]
    optimizer = timm.optim.create_optimizer_v2(groups, opt=name, lr=lr, **kwargs)
    for group in optimizer.param_groups:  # the rate each group starts from, for schedulers and logs
        group.setdefault("initial_lr", group["lr"])
    return optimizer


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
