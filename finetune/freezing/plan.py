"""Resolve ``freeze.*`` against a model into a `FreezePlan`: what is frozen, and when it thaws.

Every stage name, regex and schedule entry must match something; a typo fails here,
naming the stages the model has, before anything is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from finetune.errors import UserError
from finetune.freezing.stages import HEAD_STAGE, Stage, find_stages

ALL = "all"  # schedule value: everything still frozen


@dataclass
class FreezePlan:
    """What is frozen at the start, and what each scheduled epoch unfreezes (parameter names)."""

    stages: list[Stage]
    frozen: set[str]
    schedule: dict[int, set[str]] = field(default_factory=dict)
    schedule_spec: dict[int, Any] = field(default_factory=dict)  # as configured, for resume checks

    def within(self, trainable: set[str], *, owner: str) -> FreezePlan:
        """This plan acting only on ``trainable`` (what ``owner``, e.g. LoRA, left to train): nothing else is
        frozen by it or thawed by its schedule; a schedule entry left with nothing to thaw is an error."""
        schedule = {epoch: names & trainable for epoch, names in self.schedule.items()}
        for epoch, names in schedule.items():
            if not names:
                raise UserError(f"freeze.schedule[{epoch}] '{self.schedule_spec[epoch]}' thaws only weights that "
                                f"{owner} keeps frozen: schedule stages whose {owner} weights are frozen")
        return FreezePlan(self.stages, self.frozen & trainable, schedule, dict(self.schedule_spec))


def resolve_target(value: str, stages: Sequence[Stage], names: Sequence[str], *, what: str) -> set[str]:
    """Parameter names of a stage name, ``all``, or a regex searched in parameter names; never empty."""
    by_name = {s.name: s.params for s in stages}
    if value == ALL:
        return set(names)
    if value in by_name:
        return set(by_name[value])
    try:
        pattern = re.compile(value)
    except re.error as err:
        raise UserError(f"{what}: '{value}' is not a valid regular expression ({err}) nor a stage name: use a stage "
                        f"({', '.join(by_name)}, or 'all') or a Python regex searched in parameter names") from None
    matched = {n for n in names if pattern.search(n)}
    if not matched:
        raise UserError(f"{what} '{value}' is neither a stage nor a pattern matching any parameter; the stages of "
                        f"this model are: {', '.join(by_name)} (or 'all')")
    return matched


# The freeze modes share one signature so FREEZE_MODES can pick one by name.
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

    Args:
        model: The built model, new head included.
        mode: ``none``, ``head_only``, ``until`` or ``patterns`` (see `FREEZE_MODES`).
        head: Module name of the new classifier (the last stage).
        until: The last stage to freeze (``mode=until``).
        include: Stage names or regexes to freeze (``mode=patterns``).
        exclude: Stage names or regexes kept trainable among ``include`` (``mode=patterns``).
        schedule: Maps an epoch (epochs completed: ``{2: layer4}`` trains layer4 from the
            third epoch on) to a stage name, a regex, ``all``, or a list of them.
        max_epochs: When given, every scheduled epoch must fall in ``1..max_epochs-1``.

    Returns:
        The stages, the parameters frozen at the start and what each epoch unfreezes.

    Raises:
        UserError: An unknown mode, or a name, pattern or schedule entry that matches nothing.
    """
    if mode not in FREEZE_MODES:
        raise UserError(f"freeze.name '{mode}' is not known: use {', '.join(FREEZE_MODES)}")
    stages = find_stages(model, head=head)
    names = [n for n, _ in model.named_parameters()]
    frozen = FREEZE_MODES[mode](stages, names, until, include, exclude)
    plan = FreezePlan(stages=stages, frozen=frozen)
    still_frozen = set(frozen)
    for epoch in sorted(schedule or {}):
        unfrozen = _scheduled_unfreeze(epoch, schedule[epoch], stages, names, still_frozen,
                                       mode=mode, max_epochs=max_epochs)
        plan.schedule[epoch], plan.schedule_spec[epoch] = unfrozen, schedule[epoch]
        still_frozen -= unfrozen
    return plan


def _scheduled_unfreeze(epoch: int, spec: Any, stages: list[Stage], names: list[str], still_frozen: set[str], *,
                        mode: str, max_epochs: int | None) -> set[str]:
    """The parameters one schedule entry unfreezes; it must be in range and unfreeze something."""
    if max_epochs is not None and not 1 <= epoch < max_epochs:
        raise UserError(f"freeze.schedule epoch {epoch} is outside 1..{(max_epochs or 1) - 1}: trainer.max_epochs "
                        f"is {max_epochs}, so that unfreeze would never happen")
    values = [spec] if isinstance(spec, str) else list(spec)
    targets = set().union(*(resolve_target(str(v), stages, names, what=f"freeze.schedule[{epoch}]")
                            for v in values))
    unfrozen = (still_frozen if ALL in values else targets) & still_frozen
    if not unfrozen:
        raise UserError(f"freeze.schedule[{epoch}] '{spec}' unfreezes nothing: none of its parameters "
                        f"is frozen then (freeze.name={mode})")
    return unfrozen
