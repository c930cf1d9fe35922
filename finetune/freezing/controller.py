"""`FreezeController`: the trainer hook that unfreezes on schedule and proves frozen tensors stayed put.

Proof is bit-exact and cheap: each frozen tensor's `fingerprint` (two sums over its raw
bits) is taken when training starts and compared after every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from finetune.errors import UserError
from finetune.freezing.apply import batchnorm_layers, bn_mode, is_bn_frozen, unfreeze_bn
from finetune.freezing.plan import FreezePlan
from finetune.freezing.stages import Stage
from finetune.trainer import TrainerHook

log = logging.getLogger("finetune")


class FrozenParametersChanged(UserError):
    """A parameter or BatchNorm statistic that should be frozen was modified."""


class FreezeController(TrainerHook):
    """Unfreezes on schedule at epoch start, and verifies the frozen tensors after every epoch.

    Resume: ``state_dict()`` records which schedule entries were applied; ``load_state_dict``
    re-applies them at once. Entries due by ``state.epoch`` are also applied by
    ``on_epoch_start``, so a restored ``TrainState`` alone puts the model right.
    The run holds it by name (``TrainingParts.freeze``); it is also one of the trainer's hooks.
    Under DDP every process unfreezes at the same epoch start, and the trainer then wraps the model
    in DistributedDataParallel again (DDP only synchronises the parameters that trained when it wrapped).
    """

    def __init__(self, model: nn.Module, plan: FreezePlan, *, bn: str, verify: bool = True):
        self.model, self.plan, self.bn, self.verify_each_epoch = model, plan, bn, verify
        self.frozen = set(plan.frozen)
        self.applied: list[int] = []
        self.fingerprints: dict[str, torch.Tensor] | None = None
        self.table_logged = False

    # ------------------------------------------------------------ hooks
    def on_epoch_start(self, state: Any) -> None:
        """Apply the schedule entries due by ``state.epoch``, fingerprint what is frozen, log the table."""
        due = [e for e in sorted(self.plan.schedule) if e <= state.epoch and e not in self.applied]
        for epoch in due:
            self.unfreeze(epoch)
        if self.fingerprints is None:  # first epoch of this process: what is frozen now must stay so
            self.fingerprints = self._fingerprints()
        if due or (self.frozen and not self.table_logged):
            self.table_logged = True
            log.info(f"trainable and frozen parameters at epoch {state.epoch + 1}:\n"
                     + freeze_table(self.model, self.plan.stages))

    def on_epoch_end(self, state: Any, logs: dict, result: Any, improved: bool) -> None:
        """Check that the frozen tensors are bit-identical (unless built with ``verify=False``)."""
        if self.verify_each_epoch:
            self.verify(epoch=state.epoch)

    # ------------------------------------------------------------ actions
    def unfreeze(self, epoch: int) -> None:
        """Apply the schedule entry of ``epoch``: its parameters and their BN layers start learning."""
        names = self.plan.schedule[epoch]
        bn_before = {n for n in batchnorm_layers(self.model) if is_bn_frozen(self.model, n, self.frozen)}
        params = dict(self.model.named_parameters())
        for name in names:
            params[name].requires_grad_(True)
        self.frozen -= names
        for name in bn_before:
            if not is_bn_frozen(self.model, name, self.frozen):
                unfreeze_bn(self.model, name)
        if self.fingerprints is not None:  # the rest keeps the value it had when frozen
            keep = frozen_tensors(self.model, self.frozen, bn=self.bn)
            self.fingerprints = {k: v for k, v in self.fingerprints.items() if k in keep}
        self.applied.append(epoch)
        log.info(f"freeze.schedule: epoch {epoch} unfreezes '{self.plan.schedule_spec[epoch]}' "
                 f"({len(names)} parameter tensors)")

    def verify(self, epoch: int | None = None) -> None:
        """Raise ``FrozenParametersChanged`` naming the tensors that moved since they were frozen."""
        if not self.fingerprints:
            return
        current = frozen_tensors(self.model, self.frozen, bn=self.bn)
        changed = [n for n, fp in self.fingerprints.items() if not torch.equal(fingerprint(current[n]), fp)]
        if changed:
            where = f" after epoch {epoch}" if epoch is not None else ""
            raise FrozenParametersChanged(
                f"{len(changed)} frozen tensor(s) changed{where}, e.g. {', '.join(changed[:3])}: something outside "
                "the optimizer writes to them (a custom hook, EMA swap, or BatchNorm in train mode: "
                "use freeze.bn=eval)")

    def _fingerprints(self) -> dict[str, torch.Tensor]:
        return {n: fingerprint(t) for n, t in frozen_tensors(self.model, self.frozen, bn=self.bn).items()}

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The schedule entries applied so far and the configured schedule, for a resume."""
        return {"applied": list(self.applied),
                "schedule": {str(k): str(v) for k, v in self.plan.schedule_spec.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Re-apply the schedule entries a checkpoint had applied.

        Raises:
            UserError: The checkpoint was trained with a different ``freeze.schedule``.
        """
        saved = dict(state.get("schedule", {}))
        configured = {str(k): str(v) for k, v in self.plan.schedule_spec.items()}
        if saved != configured:
            raise UserError(f"freeze.schedule {configured} differs from the one the checkpoint was trained with "
                            f"{saved}: resume with the same freeze settings")
        for epoch in state.get("applied", []):
            if int(epoch) not in self.applied:
                self.unfreeze(int(epoch))


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the raw bits (plain and position-weighted): any changed or moved bit shows.

    Computed where the tensor lives; costs one pass, no copy of the weights is kept.
    """
    flat = tensor.detach().contiguous().view(-1)
    if flat.is_floating_point() or flat.is_complex():  # reinterpret the bits, never convert the values
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()])
    bits = flat.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    return torch.stack([bits.sum(), (bits * weights).sum()])


def frozen_tensors(model: nn.Module, frozen: set[str], *, bn: str) -> dict[str, torch.Tensor]:
    """Frozen parameters, plus the buffers of frozen BN layers unless ``bn=train`` lets them move."""
    tensors = {n: p for n, p in model.named_parameters() if n in frozen}
    if bn != "train":
        for name, module in batchnorm_layers(model).items():
            if is_bn_frozen(model, name, frozen):
                tensors |= {f"{name}.{k}": b for k, b in module.named_buffers(recurse=False) if b is not None}
    return tensors


def freeze_table(model: nn.Module, stages: Sequence[Stage]) -> str:
    """Per stage: parameter tensors, trainable and frozen element counts, BN layers by mode."""
    params = dict(model.named_parameters())
    bn_stage: dict[str | None, list[str]] = {}
    for name, module in batchnorm_layers(model).items():
        stage = next((s.name for s in stages if f"{name}.weight" in s.params), None)
        bn_stage.setdefault(stage, []).append(bn_mode(module))
    rows = [("stage", "tensors", "trainable", "frozen", "batchnorm")]
    for stage in stages:
        trainable = sum(params[n].numel() for n in stage.params if params[n].requires_grad)
        frozen = sum(params[n].numel() for n in stage.params if not params[n].requires_grad)
        modes = bn_stage.get(stage.name, [])
        bns = ", ".join(f"{modes.count(m)} {m}" for m in ("train", "eval", "frozen") if m in modes) or "-"
        rows.append((stage.name, str(len(stage.params)), f"{trainable:,}", f"{frozen:,}", bns))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
