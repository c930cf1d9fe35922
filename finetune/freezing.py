"""What stays fixed while fine-tuning, when it starts to learn, and proof that it stayed fixed.

A backbone is cut into ordered *stages* (timm's coarse ``group_matcher``; for models
without one, e.g. torchvision's, the top-level children in order), the new head
last. ``plan_freeze`` turns ``freeze.*`` into the set of frozen parameters plus an
unfreeze schedule, failing on any name or pattern that matches nothing;
``apply_freeze`` applies it before the optimizer exists. Frozen parameters get
``requires_grad=False`` and stay in the optimizer (no gradient, no update, no state),
so its layout never depends on what is frozen.

BatchNorm of frozen parts (``bn``): ``train`` keeps normalising with batch statistics
and updating running ones; ``eval`` pins the layer in eval mode, so every later
``model.train()`` leaves it alone; ``frozen`` swaps plain ``BatchNorm2d`` for
``FrozenBatchNorm2d`` (other BN types are pinned to eval, which computes the same).

``FreezeController`` is the ``TrainerHook`` that unfreezes on schedule, logs the
per-stage table and checks after each epoch that every frozen tensor is bit-identical
to its value when frozen. Its ``state_dict()`` is what a resume must restore.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d as _TvFrozenBatchNorm2d

from finetune.errors import UserError
from finetune.trainer import TrainerHook

log = logging.getLogger("finetune")

HEAD_STAGE = "head"
ALL = "all"  # schedule value: everything still frozen
BN_MODES = ("train", "eval", "frozen")


class FrozenParametersChanged(UserError):
    """A parameter or BatchNorm statistic that should be frozen was modified."""


def _under(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


# ------------------------------------------------------------------------ stages
@dataclass
class Stage:
    """A named, ordered slice of the model's parameters."""

    name: str
    params: list[str] = field(default_factory=list)


def find_stages(model: nn.Module, *, head: str) -> list[Stage]:
    """The model's stages from input to output; the new classifier is the last one, ``head``.

    >>> import timm
    >>> [s.name for s in find_stages(timm.create_model("test_resnet"), head="fc")]
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
    """
    body = [(n, p) for n, p in model.named_parameters() if not _under(n, head)]
    if hasattr(model, "group_matcher"):
        matcher = model.group_matcher(coarse=True)
        groups = group_parameters(_Named(body), matcher)
        stages = [Stage(group_label(names, matcher, first=i == 0), names)
                  for i, (_, names) in enumerate(sorted(groups.items()))]
    else:
        stages = _child_stages(model, [n for n, _ in body])
    head_params = [n for n, _ in model.named_parameters() if _under(n, head)]
    stages += [Stage(HEAD_STAGE, head_params)] if head_params else []
    return _unique(stages)


class _Named:
    """Adapter so ``timm.models.group_parameters`` groups an explicit ``(name, param)`` list."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.named = named

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        return iter(self.named)


def _child_stages(model: nn.Module, names: list[str]) -> list[Stage]:
    """Top-level children in order; in a ``features`` + ``classifier`` layout (at most three children with
    parameters) the ``Sequential`` children are opened one level, so ``features.0``... are stages."""
    with_params = [c for _, c in model.named_children() if any(True for _ in c.parameters())]
    prefixes = []
    for child_name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1 and len(with_params) <= 3:
            prefixes += [f"{child_name}.{sub}" for sub, _ in child.named_children()]
        else:
            prefixes.append(child_name)
    stages = [Stage(p, [n for n in names if _under(n, p)]) for p in prefixes]
    direct = [n for n in names if "." not in n]  # parameters on the root module itself
    return ([Stage("root", direct)] if direct else []) + [s for s in stages if s.params]


def group_label(names: list[str], matcher: Mapping[str, Any], *, first: bool = False) -> str:
    """A readable name for a group of parameters: what the matcher's numbered regex matched
    (``layer1``, ``blocks.3``), else ``stem`` for the first group, else their common module path."""
    return _matched_name(matcher, names[0]) or _stage_name(names, "stem" if first else None)


def _matched_name(matcher: Mapping[str, Any], name: str) -> str | None:
    """The text a ``group_matcher`` regex with a layer number matched (``layer1``, ``blocks.3``), if any."""
    for spec in matcher.values():
        patterns = [p for p, _ in spec] if isinstance(spec, (list, tuple)) else [spec] if spec else []
        for pattern in patterns:
            found = re.match(pattern, name)
            if found:
                text = found.group(0).rstrip(".")
                return text if found.groups() and name.startswith(text + ".") else None
    return None


def _stage_name(names: list[str], fallback: str | None) -> str:
    """The longest common module path of ``names``, else ``fallback``, else their top-level modules joined."""
    modules = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*modules):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if common:
        return ".".join(common)
    return fallback or "+".join(dict.fromkeys(n.split(".")[0] for n in names))


def _unique(stages: list[Stage]) -> list[Stage]:
    seen: dict[str, int] = {}
    for stage in stages:
        seen[stage.name] = seen.get(stage.name, 0) + 1
        if seen[stage.name] > 1:
            stage.name = f"{stage.name}#{seen[stage.name]}"
    return stages


# ------------------------------------------------------------------------- plan
@dataclass
class FreezePlan:
    """What is frozen at the start, and what each scheduled epoch unfreezes (parameter names)."""

    stages: list[Stage]
    frozen: set[str]
    schedule: dict[int, set[str]] = field(default_factory=dict)
    schedule_spec: dict[int, Any] = field(default_factory=dict)  # as configured, for resume checks


def resolve_target(value: str, stages: Sequence[Stage], names: Sequence[str], *, what: str) -> set[str]:
    """Parameter names of a stage name, ``all``, or a regex searched in parameter names; never empty."""
    by_name = {s.name: s.params for s in stages}
    if value == ALL:
        return set(names)
    if value in by_name:
        return set(by_name[value])
    try:
        pattern = re.compile(value)
    except re.error:
        pattern = None
    matched = {n for n in names if pattern is not None and pattern.search(n)}
    if not matched:
        raise UserError(f"{what} '{value}' is neither a stage nor a pattern matching any parameter; the stages of "
                        f"this model are: {', '.join(by_name)} (or 'all')")
    return matched


def _freeze_head_only(stages: list[Stage], names: list[str], until: str | None, include: Sequence[str],
                      exclude: Sequence[str]) -> set[str]:
    return {n for s in stages if s.name != HEAD_STAGE for n in s.params}


def _freeze_until(stages: list[Stage], names: list[str], until: str | None, include: Sequence[str],
                  exclude: Sequence[str]) -> set[str]:
    order = [s.name for s in stages]
    listed = ", ".join(n for n in order if n != HEAD_STAGE)
    if until is None:
        raise UserError(f"freeze=until needs freeze.until=STAGE, the last stage to freeze; this model's stages are: "
                        f"{listed}")
    if until not in order or until == HEAD_STAGE:
        raise UserError(f"freeze.until '{until}' is not a stage of this model; its stages are: {listed}")
    return {n for s in stages[:order.index(until) + 1] for n in s.params}


def _freeze_patterns(stages: list[Stage], names: list[str], until: str | None, include: Sequence[str],
                     exclude: Sequence[str]) -> set[str]:
    if not include:
        raise UserError("freeze=patterns needs freeze.include: regexes of the parameters to freeze")
    frozen = set().union(*(resolve_target(p, stages, names, what="freeze.include") for p in include))
    for pattern in exclude:
        kept = resolve_target(pattern, stages, names, what="freeze.exclude")
        if not kept & frozen:
            raise UserError(f"freeze.exclude '{pattern}' matches none of the parameters freeze.include freezes")
        frozen -= kept
    return frozen


FREEZE_MODES = {
    "none": lambda *args: set(),
    "head_only": _freeze_head_only,
    "until": _freeze_until,
    "patterns": _freeze_patterns,
}


def plan_freeze(model: nn.Module, *, mode: str, head: str, until: str | None = None,
                include: Sequence[str] = (), exclude: Sequence[str] = (),
                schedule: Mapping[int, Any] | None = None, max_epochs: int | None = None) -> FreezePlan:
    """Resolve ``freeze.*`` against this model; every name or pattern must match something.

    ``schedule`` maps an epoch (epochs completed: ``{2: layer4}`` trains layer4 from the
    third epoch on) to a stage name, a regex, ``all``, or a list of them.
    """
    if mode not in FREEZE_MODES:
        raise UserError(f"freeze.name '{mode}' is not known: use {', '.join(FREEZE_MODES)}")
    stages = find_stages(model, head=head)
    names = [n for n, _ in model.named_parameters()]
    frozen = FREEZE_MODES[mode](stages, names, until, include, exclude)
    plan = FreezePlan(stages=stages, frozen=frozen)
    still_frozen = set(frozen)
    for epoch in sorted(schedule or {}):
        if max_epochs is not None and not 1 <= epoch < max_epochs:
            raise UserError(f"freeze.schedule epoch {epoch} is outside 1..{(max_epochs or 1) - 1}: trainer.max_epochs "
                            f"is {max_epochs}, so that unfreeze would never happen")
        values = schedule[epoch]
        values = [values] if isinstance(values, str) else list(values)
        targets = set().union(*(resolve_target(str(v), stages, names, what=f"freeze.schedule[{epoch}]")
                                for v in values))
        unfrozen = (still_frozen if ALL in values else targets) & still_frozen
        if not unfrozen:
            raise UserError(f"freeze.schedule[{epoch}] '{schedule[epoch]}' unfreezes nothing: none of its parameters "
                            f"is frozen then (freeze.name={mode})")
        plan.schedule[epoch], plan.schedule_spec[epoch] = unfrozen, schedule[epoch]
        still_frozen -= unfrozen
    return plan


# ---------------------------------------------------------------- BatchNorm
class FrozenBatchNorm2d(_TvFrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` that keeps the original affine *Parameters* and state-dict keys.

    Keeping the same ``Parameter`` objects (with ``requires_grad=False``) means the optimizer
    still holds them and they resume learning when unfrozen; keeping ``num_batches_tracked``
    means the state dict has exactly the keys of the ``BatchNorm2d`` it replaced.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, eps=bn.eps)
        self.training = False
        self.source_bn = [bn]  # a list, so the replaced module is not registered as a child
        for key in ("weight", "bias"):
            del self._buffers[key]
            setattr(self, key, getattr(bn, key))
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(key, getattr(bn, key))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        nn.Module._load_from_state_dict(self, *args, **kwargs)  # keep num_batches_tracked


def pin_eval(module: nn.Module) -> None:
    """Keep ``module`` in eval mode whatever ``train()`` is called on it or its parents."""
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()


def unpin(module: nn.Module, training: bool) -> None:
    """Undo ``pin_eval``: the module follows ``train()`` again."""
    module.__dict__.pop("train", None)
    nn.Module.train(module, training)


def _bn_frozen(model: nn.Module, bn_name: str, frozen: set[str]) -> bool:
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
    return {n: m for n, m in model.named_modules() if isinstance(m, (_BatchNorm, _TvFrozenBatchNorm2d))}


def freeze_bn(model: nn.Module, name: str, bn: str) -> None:
    """Apply ``bn`` mode to the BN layer ``name`` of a frozen part."""
    module = model.get_submodule(name)
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
        for key in ("weight", "bias"):  # the current tensors (a .to(device) may have replaced the buffers)
            original._parameters[key] = module._parameters[key]
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            original._buffers[key] = module._buffers[key]
        setattr(model.get_submodule(parent), leaf, original)
        original.train(model.training)
    else:
        unpin(module, model.training)


# ------------------------------------------------------------------- apply
def apply_freeze(model: nn.Module, plan: FreezePlan | None = None, *, bn: str = "eval", mode: str | None = None,
                 head: str | None = None) -> list[str]:
    """Freeze ``plan.frozen`` (or, for short, ``mode`` with ``head``); returns the frozen parameter names.

    Call it before building the optimizer.
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
            if _bn_frozen(model, name, plan.frozen):
                freeze_bn(model, name, bn)
    return sorted(plan.frozen)


# ------------------------------------------------------------------ verify
def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the raw bits (plain and position-weighted): any changed or moved bit shows.

    Computed where the tensor lives; costs one pass, no copy of the weights is kept.
    """
    flat = tensor.detach().contiguous().view(-1)
    if flat.is_floating_point() or flat.is_complex():
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()])
    bits = flat.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    return torch.stack([bits.sum(), (bits * weights).sum()])


def frozen_tensors(model: nn.Module, frozen: set[str], *, bn: str) -> dict[str, torch.Tensor]:
    """Frozen parameters, plus the buffers of frozen BN layers unless ``bn=train`` lets them move."""
    tensors = {n: p for n, p in model.named_parameters() if n in frozen}
    if bn != "train":
        for name, module in batchnorm_layers(model).items():
            if _bn_frozen(model, name, frozen):
                tensors |= {f"{name}.{k}": b for k, b in module.named_buffers(recurse=False) if b is not None}
    return tensors


def freeze_table(model: nn.Module, stages: Sequence[Stage]) -> str:
    """Per stage: parameter tensors, trainable and frozen element counts, BN layers by mode."""
    params = dict(model.named_parameters())
    bn_stage = {}
    for name, module in batchnorm_layers(model).items():
        mode = "frozen" if isinstance(module, _TvFrozenBatchNorm2d) else "eval" if "train" in module.__dict__ else "train"
        stage = next((s.name for s in stages if f"{name}.weight" in s.params), None)
        bn_stage.setdefault(stage, []).append(mode)
    rows = [("stage", "tensors", "trainable", "frozen", "batchnorm")]
    for stage in stages:
        trainable = sum(params[n].numel() for n in stage.params if params[n].requires_grad)
        frozen = sum(params[n].numel() for n in stage.params if not params[n].requires_grad)
        modes = bn_stage.get(stage.name, [])
        bns = ", ".join(f"{modes.count(m)} {m}" for m in ("train", "eval", "frozen") if m in modes) or "-"
        rows.append((stage.name, str(len(stage.params)), f"{trainable:,}", f"{frozen:,}", bns))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -------------------------------------------------------------- controller
class FreezeController(TrainerHook):
    """Unfreezes on schedule at epoch start, and verifies the frozen tensors after every epoch.

    Resume: ``state_dict()`` records which schedule entries were applied; ``load_state_dict``
    re-applies them at once. Entries due by ``state.epoch`` are also applied by
    ``on_epoch_start``, so a restored ``TrainState`` alone puts the model right.
    Reach it as ``next(h for h in trainer.hooks if hasattr(h, "freeze_controller"))``.
    """

    def __init__(self, model: nn.Module, plan: FreezePlan, *, bn: str, verify: bool = True):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if plan.schedule and distributed and torch.distributed.get_world_size() > 1:
            # DDP registers only the parameters that require grad when it wraps the model; ones
            # unfrozen later would train unsynchronised on every rank.
            raise UserError("freeze.schedule is not supported with several processes (DDP) yet: "
                            "run the schedule on one device, or use freeze without a schedule")
        self.model, self.plan, self.bn, self.verify_each_epoch = model, plan, bn, verify
        self.frozen = set(plan.frozen)
        self.applied: list[int] = []
        self.fingerprints: dict[str, torch.Tensor] | None = None
        self.table_logged = False

    @property
    def freeze_controller(self) -> "FreezeController":
        return self

    # ------------------------------------------------------------ hooks
    def on_epoch_start(self, state: Any) -> None:
        due = [e for e in sorted(self.plan.schedule) if e <= state.epoch and e not in self.applied]
        for epoch in due:
            self.unfreeze(epoch)
        if self.fingerprints is None:
            self.fingerprints = self._fingerprints()
        if due or (self.frozen and not self.table_logged):
            self.table_logged = True
            log.info(f"trainable and frozen parameters at epoch {state.epoch + 1}:\n"
                     + freeze_table(self.model, self.plan.stages))

    def on_epoch_end(self, state: Any, logs: dict, result: Any, improved: bool) -> None:
        if self.verify_each_epoch:
            self.verify(epoch=state.epoch)

    # ------------------------------------------------------------ actions
    def unfreeze(self, epoch: int) -> None:
        """Apply the schedule entry of ``epoch``: its parameters and their BN layers start learning."""
        names = self.plan.schedule[epoch]
        bn_before = {n for n in batchnorm_layers(self.model) if _bn_frozen(self.model, n, self.frozen)}
        params = dict(self.model.named_parameters())
        for name in names:
            params[name].requires_grad_(True)
        self.frozen -= names
        for name in bn_before:
            if not _bn_frozen(self.model, name, self.frozen):
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
                "the optimizer writes to them (a custom hook, EMA swap, or BatchNorm in train mode: use freeze.bn=eval)")

    def _fingerprints(self) -> dict[str, torch.Tensor]:
        return {n: fingerprint(t) for n, t in frozen_tensors(self.model, self.frozen, bn=self.bn).items()}

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"applied": list(self.applied), "schedule": {str(k): str(v) for k, v in self.plan.schedule_spec.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = dict(state.get("schedule", {}))
        configured = {str(k): str(v) for k, v in self.plan.schedule_spec.items()}
        if saved != configured:
            raise UserError(f"freeze.schedule {configured} differs from the one the checkpoint was trained with "
                            f"{saved}: resume with the same freeze settings")
        for epoch in state.get("applied", []):
            if int(epoch) not in self.applied:
                self.unfreeze(int(epoch))
