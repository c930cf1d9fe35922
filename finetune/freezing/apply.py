"""Apply a `FreezePlan`: ``requires_grad=False``, and BatchNorm that stays frozen through ``train()``.

A BN layer counts as frozen with its affine parameters (see `is_bn_frozen`); how it is
kept frozen is the ``freeze.bn`` mode (`BN_MODES`), and `unfreeze_bn` undoes it exactly.
"""

from __future__ import annotations

import types

from torch import nn
from torchvision.ops import FrozenBatchNorm2d as _TvFrozenBatchNorm2d

from finetune._torch_compat import ModuleStateLoading, is_batch_norm
from finetune.errors import UserError
from finetune.freezing.plan import FreezePlan, plan_freeze

BN_MODES = ("train", "eval", "frozen")


def apply_freeze(model: nn.Module, plan: FreezePlan | None = None, *, bn: str = "eval", mode: str | None = None,
                 head: str | None = None) -> list[str]:
    """Freeze ``plan.frozen`` (or, for short, ``mode`` with ``head``); returns the frozen parameter names.

    Call it before building the optimizer.

    Args:
        model: The model to freeze in place.
        plan: What to freeze (`plan_freeze`); None plans ``mode`` with ``head`` here.
        bn: How BatchNorm of frozen parts behaves: one of `BN_MODES`.
        mode: Shorthand for a plan without a schedule, used only when ``plan`` is None.
        head: Module name of the new classifier, used only when ``plan`` is None.

    Returns:
        The frozen parameter names, sorted.

    Raises:
        UserError: ``bn`` is not one of `BN_MODES`.
    """
    if bn not in BN_MODES:
        raise UserError(f"freeze.bn '{bn}' is not known: use {', '.join(BN_MODES)}")
    if plan is None:
        plan = plan_freeze(model, mode=mode or "none", head=head or "")
    params = dict(model.named_parameters())
    for name in plan.frozen:
        params[name].requires_grad_(False)
    if bn != "train":
        for name in batchnorm_layers(model):
            if is_bn_frozen(model, name, plan.frozen):
                freeze_bn(model, name, bn)
    return sorted(plan.frozen)


class FrozenBatchNorm2d(ModuleStateLoading, _TvFrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` that keeps the original affine *Parameters* and state-dict keys.

    Keeping the same ``Parameter`` objects (with ``requires_grad=False``) means the optimizer
    still holds them and they resume learning when unfrozen; keeping ``num_batches_tracked``
    means the state dict has exactly the keys of the ``BatchNorm2d`` it replaced, and it loads
    like any module's (`ModuleStateLoading`: torchvision's class would drop it from the dict).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, eps=bn.eps)
        self.training = False
        self.source_bn = [bn]  # a list, so the replaced module is not registered as a child
        for key in ("weight", "bias"):
            delattr(self, key)  # torchvision's buffer, replaced by the Parameter
            setattr(self, key, getattr(bn, key))
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(key, getattr(bn, key))


def pin_eval(module: nn.Module) -> None:
    """Keep ``module`` in eval mode whatever ``train()`` is called on it or its parents."""
    # An instance attribute shadows the class's train(); `unpin` removes it again.
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()


def unpin(module: nn.Module, training: bool) -> None:
    """Undo ``pin_eval``: the module follows ``train()`` again."""
    module.__dict__.pop("train", None)
    nn.Module.train(module, training)


def bn_mode(module: nn.Module) -> str:
    """How a BN layer behaves now: ``frozen`` (swapped), ``eval`` (pinned by `pin_eval`) or ``train``."""
    if isinstance(module, _TvFrozenBatchNorm2d):
        return "frozen"
    return "eval" if "train" in module.__dict__ else "train"


def is_bn_frozen(model: nn.Module, bn_name: str, frozen: set[str]) -> bool:
    """A BN layer is frozen with its affine parameters; without any, with its nearest parent that has some."""
    parts = bn_name.split(".")
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(parts[:depth])
        module = model.get_submodule(prefix)
        owned = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
        if owned:
            return all(n in frozen for n in owned)
    return False


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer (frozen swaps included), by module name."""
    return {n: m for n, m in model.named_modules() if is_batch_norm(m) or isinstance(m, _TvFrozenBatchNorm2d)}


def freeze_bn(model: nn.Module, name: str, bn: str) -> None:
    """Apply ``bn`` mode to the BN layer ``name`` of a frozen part."""
    module = model.get_submodule(name)
    # Only a plain affine BatchNorm2d with running statistics has a FrozenBatchNorm2d twin;
    # subclasses (timm's BatchNormAct2d, ...) add behaviour a swap would lose.
    if bn == "frozen" and type(module) is nn.BatchNorm2d and module.affine and module.track_running_stats:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, FrozenBatchNorm2d(module))
    elif bn in ("eval", "frozen") and not isinstance(module, _TvFrozenBatchNorm2d):
        pin_eval(module)


def unfreeze_bn(model: nn.Module, name: str) -> None:
    """Give the BN layer ``name`` back its own training behaviour (and type)."""
    module = model.get_submodule(name)
    if isinstance(module, FrozenBatchNorm2d):
        parent, _, leaf = name.rpartition(".")
        original = module.source_bn[0]
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(original, key, getattr(module, key))  # the current tensors (a .to(device) may have replaced them)
        setattr(model.get_submodule(parent), leaf, original)
        original.train(model.training)
    else:
        unpin(module, model.training)
