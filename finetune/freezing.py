"""What stays fixed while fine-tuning.

Frozen parameters get ``requires_grad=False``; frozen BatchNorm layers in ``eval``
mode keep their running statistics. The BN choice survives every later
``model.train()`` because each frozen BN layer's own ``train`` is pinned to eval.
"""

from __future__ import annotations

import types

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import UserError


def _in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def apply_freeze(model: nn.Module, *, mode: str, head: str, bn: str = "eval") -> list[str]:
    """Freeze according to ``mode`` (``none`` | ``head_only``); returns the frozen parameter names."""
    if mode == "none":
        return []
    if mode != "head_only":
        raise UserError(f"freeze.name '{mode}' is not known: use none or head_only")
    frozen = []
    for name, param in model.named_parameters():
        if not _in_head(name, head):
            param.requires_grad_(False)
            frozen.append(name)
    if bn == "eval":
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and not _in_head(name, head):
                pin_eval(module)
    return frozen


def pin_eval(module: nn.Module) -> None:
    """Keep ``module`` in eval mode whatever ``train()`` is called on it or its parents."""
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()
