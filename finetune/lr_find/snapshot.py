"""Everything a range test changes, taken before it and put back after (see `Snapshot`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune._torch_compat import kept_iterator, shutdown_loader_workers
from finetune.checkpoint.training_state import detached_copy, rng_state, set_rng_state

@dataclass
class Snapshot:
    """Everything a range test changes, taken before it and put back after.

    After `restore`, training is bit-identical (on the CPU) to training that never searched:

    - every parameter and buffer of the model (non-persistent buffers, BatchNorm's running
      statistics and ``num_batches_tracked`` included), copied back *into* the same tensors, so
      an optimizer built before still holds them; each parameter's ``requires_grad`` and
      ``.grad`` (usually None); each module's train/eval flag and whether it is pinned to eval
      (`finetune.freezing.pin_eval`: a trial that froze the backbone pinned its BatchNorm layers);
    - the python, numpy, torch CPU and CUDA random states (`rng_state`);
    - the train loader's own ``generator`` (each pass draws its workers' base seed from it)
      and its sampler's attributes (`EpochSampler`: ``epoch`` and ``start``; a
      ``torch.Generator`` attribute by its state). Workers that the test started for a loader
      with persistent workers are shut down, so that training starts fresh ones as it would
      have: exact when taken before the loader's first pass, as a run does;
    - ``extras``: anything else the step changes that has ``state_dict``/``load_state_dict``
      (a GradScaler, an EMA model).

    Not covered: the optimizer of the test (build a temporary one and drop it).

    >>> model = nn.Linear(2, 1)
    >>> before = model.weight.clone()
    >>> snapshot = Snapshot.take(model)
    >>> with torch.no_grad(): _ = model.weight.add_(1.0)
    >>> snapshot.restore(); torch.equal(model.weight, before)
    True
    """

    model: nn.Module
    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    training: dict[str, bool]
    pins: dict[str, Any]
    rng: dict[str, Any]
    loader: Any = None
    loader_state: dict[str, Any] = field(default_factory=dict)
    sampler_state: dict[str, Any] = field(default_factory=dict)
    extras: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def take(cls, model: nn.Module, loader: Any = None, *, extras: Sequence[Any] = ()) -> Snapshot:
        """Copy (to the CPU) what a range test changes of ``model``, the RNGs, ``loader`` and ``extras``."""
        params = dict(model.named_parameters())
        return cls(
            model=model, tensors=detached_copy(_named_tensors(model)),
            requires_grad={name: p.requires_grad for name, p in params.items()},
            grads={name: None if p.grad is None else detached_copy(p.grad) for name, p in params.items()},
            training={name: m.training for name, m in model.named_modules()}, pins=_pins(model), rng=rng_state(),
            loader=loader,
            loader_state=_loader_state(loader), sampler_state=_object_state(getattr(loader, "sampler", None)),
            extras=[(extra, detached_copy(extra.state_dict())) for extra in extras])

    def restore(self) -> None:
        """Put everything back; may be called again (the snapshot's own tensors are never handed out)."""
        self._restore_model()
        set_rng_state(self.rng)
        _restore_loader(self.loader, self.loader_state)
        _restore_object(getattr(self.loader, "sampler", None), self.sampler_state)
        for extra, state in self.extras:
            extra.load_state_dict(detached_copy(state))

    def _restore_model(self) -> None:
        current, modules = _named_tensors(self.model), dict(self.model.named_modules())
        changed = (current.keys() ^ self.tensors.keys()) | (modules.keys() ^ self.training.keys())
        if changed:
            raise RuntimeError(f"the model changed during the range test, cannot restore it: {sorted(changed)[:5]}")
        with torch.no_grad():
            for name, saved in self.tensors.items():
                current[name].copy_(saved)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.requires_grad[name])
            saved = self.grads[name]
            param.grad = None if saved is None else saved.to(param.device, copy=True)
        for name, training in self.training.items():
            modules[name].__dict__.pop("train", None)
            if name in self.pins:
                modules[name].train = self.pins[name]
            modules[name].training = training  # the flag itself: a pinned module's train() would ignore it


def _pins(model: nn.Module) -> dict[str, Any]:
    """The modules pinned to eval mode (an instance ``train`` that shadows the class's), with their pins."""
    return {name: m.__dict__["train"] for name, m in model.named_modules() if "train" in m.__dict__}


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, non-persistent buffers included (unlike ``state_dict``)."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


def _loader_state(loader: Any) -> dict[str, Any]:
    generator = getattr(loader, "generator", None)
    return {"generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
            # the iterator (and the worker processes) of persistent workers
            "iterator": kept_iterator(loader)}


def _restore_loader(loader: Any, state: dict[str, Any]) -> None:
    if state.get("generator") is not None:
        loader.generator.set_state(state["generator"])
    shutdown_loader_workers(loader, keep=state.get("iterator"))  # workers the range test started


def _object_state(obj: Any) -> dict[str, Any]:
    """An object's attributes, a ``torch.Generator`` among them by its state (a sampler's epoch, start, ...)."""
    return {name: value.get_state() if isinstance(value, torch.Generator) else value
            for name, value in getattr(obj, "__dict__", {}).items()}


def _restore_object(obj: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        current = getattr(obj, name, None)
        if isinstance(current, torch.Generator):
            current.set_state(value)
        else:
            setattr(obj, name, value)
