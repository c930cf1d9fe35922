"""Sweep overrides -> optuna distributions, read with Hydra's own override parser.

=================================  ===========================================================
``interval(a, b)``                 ``FloatDistribution(a, b)``; ints (``int(interval(1, 9))``): ``IntDistribution``
``tag(log, interval(a, b))``       the same with ``log=True``
``range(a, b[, step])``            ``IntDistribution`` (``FloatDistribution`` for floats) over the values
                                   Hydra's ``range`` yields: ``b`` excluded, as in Hydra's basic sweeper
``choice(x, y, ...)``, ``x,y``     ``CategoricalDistribution``; each value goes to the job as Hydra wrote it
anything else                      a fixed override, passed to every job as typed
=================================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


@dataclass
class SearchSpace:
    """What each trial samples, and what every job gets as it is."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)  # override key -> distribution
    labels: dict[str, list[str]] = field(default_factory=dict)  # categorical key -> each choice as override text
    fixed: dict[str, str] = field(default_factory=dict)  # override key -> the override as typed

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A job's overrides for a trial's ``params``: the fixed ones, then the sampled ones."""
        return [*self.fixed.values(), *(f"{key}={self.render(key, value)}" for key, value in params.items())]

    def render(self, key: str, value: Any) -> str:
        """``value`` as Hydra override text (a float in full, so the job gets exactly what was sampled)."""
        dist = self.distributions.get(key)
        if isinstance(dist, CategoricalDistribution) and value in dist.choices:
            return self.labels[key][dist.to_internal_repr(value)]
        return repr(value) if isinstance(value, float) else str(value)

    def grid(self) -> dict[str, list]:
        """Every value of each param, for ``optuna.samplers.GridSampler``: ``choice()`` and ``range()`` only."""
        grid = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif dist.step is not None and not dist.log:
                count = round((dist.high - dist.low) / dist.step) + 1
                grid[key] = [dist.low + i * dist.step for i in range(count)]
            else:
                raise ValueError(f"GridSampler needs choice() or range() params; '{key}' is an interval")
        return grid


def parse_search_space(overrides: list[str], parser: OverridesParser) -> SearchSpace:
    """The search space of ``overrides`` (the sweeper's ``params``, then the command line's: a later
    override of the same key wins, so the command line can pin a param the config sweeps)."""
    space = SearchSpace()
    for override in parser.parse_overrides(overrides):
        key = override.get_key_element()
        space.distributions.pop(key, None), space.labels.pop(key, None), space.fixed.pop(key, None)
        if not override.is_sweep_override():
            space.fixed[key] = override.input_line
            continue
        try:
            space.distributions[key], labels = to_distribution(override)
        except ValueError as err:
            raise ValueError(f"sweep param '{override.input_line}': {err}") from None
        if labels is not None:
            space.labels[key] = labels
    return space


def to_distribution(override: Override) -> tuple[BaseDistribution, list[str] | None]:
    """The distribution of a sweep override, and for a categorical one each choice as override text."""
    value = override.value()
    log = "log" in value.tags
    if override.is_interval_sweep():
        ints = isinstance(value.start, int) and isinstance(value.end, int)
        return (IntDistribution if ints else FloatDistribution)(value.start, value.end, log=log), None
    if override.is_range_sweep() and not value.shuffle:
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError("the range is empty")
        if log and abs(value.step) != 1:
            raise ValueError("a log-scaled range() needs step 1 (optuna samples it log-uniformly)")
        floats = any(isinstance(v, float) for v in (value.start, value.stop, value.step))
        step = {"log": True} if log else {"step": abs(value.step)}
        return (FloatDistribution if floats else IntDistribution)(min(values), max(values), **step), None
    values = list(override.sweep_iterator())  # one pass: with shuffle(), choices and labels stay aligned
    return CategoricalDistribution([Transformer.encode(v) for v in values]), [Transformer.str(v) for v in values]
