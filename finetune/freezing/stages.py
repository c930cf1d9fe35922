"""Cut a model into ordered, named stages: the units that freezing and layer decay speak of.

timm models are cut by their coarse ``group_matcher``; models without one (torchvision)
by their top-level children. The new classifier is always the last stage, ``head``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from timm.models import group_parameters
from torch import nn

from finetune.weights.remap import is_under

HEAD_STAGE = "head"


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
    body = [(n, p) for n, p in model.named_parameters() if not is_under(n, head)]
    if hasattr(model, "group_matcher"):
        matcher = model.group_matcher(coarse=True)
        groups = group_parameters(_Named(body), matcher)
        stages = [Stage(group_label(names, matcher, first=i == 0), names)
                  for i, (_, names) in enumerate(sorted(groups.items()))]
    else:
        stages = _child_stages(model, [n for n, _ in body])
    head_params = [n for n, _ in model.named_parameters() if is_under(n, head)]
    stages += [Stage(HEAD_STAGE, head_params)] if head_params else []
    return _unique(stages)


class _Named:
    """Adapter so ``timm.models.group_parameters`` groups an explicit ``(name, param)`` list."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.named = named

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        return iter(self.named)


def _child_stages(model: nn.Module, names: list[str]) -> list[Stage]:
    """Top-level children in order.

    In a ``features`` + ``classifier`` layout (at most three children with parameters)
    the ``Sequential`` children are opened one level, so ``features.0``... are stages.
    """
    with_params = [c for _, c in model.named_children() if any(True for _ in c.parameters())]
    prefixes = []
    for child_name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1 and len(with_params) <= 3:
            prefixes += [f"{child_name}.{sub}" for sub, _ in child.named_children()]
        else:
            prefixes.append(child_name)
    stages = [Stage(p, [n for n in names if is_under(n, p)]) for p in prefixes]
    direct = [n for n in names if "." not in n]  # parameters on the root module itself
    return ([Stage("root", direct)] if direct else []) + [s for s in stages if s.params]


def group_label(names: list[str], matcher: Mapping[str, Any], *, first: bool = False) -> str:
    """A readable name for a group of parameters.

    What the matcher's numbered regex matched (``layer1``, ``blocks.3``), else ``stem``
    for the first group, else their common module path.
    """
    return _matched_name(matcher, names[0]) or _stage_name(names, "stem" if first else None)


def _matched_name(matcher: Mapping[str, Any], name: str) -> str | None:
    """The text a ``group_matcher`` regex with a layer number matched (``layer1``, ``blocks.3``), if any."""
    for spec in matcher.values():
        patterns = [p for p, _ in spec] if isinstance(spec, (list, tuple)) else [spec] if spec else []
        for pattern in patterns:
            found = re.match(pattern, name)
            if found:
                text = found.group(0).rstrip(".")
                # Only a regex that captures a layer number names a layer, and only when the
                # match ends at a module boundary; other groups (the stem) are named by path.
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
    """Suffix repeated stage names (``blocks``, ``blocks#2``) so a name picks exactly one stage."""
    seen: dict[str, int] = {}
    for stage in stages:
        seen[stage.name] = seen.get(stage.name, 0) + 1
        if seen[stage.name] > 1:
            stage.name = f"{stage.name}#{seen[stage.name]}"
    return stages
