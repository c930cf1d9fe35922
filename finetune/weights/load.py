"""`load_pretrained`: read, remap, check, then copy weights into a built model.

The load is planned completely before any tensor is copied, so a load that fails
leaves the model untouched. Every target tensor ends up loaded, re-initialised as
part of the classifier (reported with both shapes), allowed missing by a pattern, or
listed in an error. There is no ``strict=False`` anywhere: tensors are copied in place
with ``Tensor.copy_`` (which also casts dtype and moves across devices).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from finetune.errors import UserError
from finetune.weights.formats import read_checkpoint
from finetune.weights.remap import is_under, remap_keys, reshapeable
from finetune.weights.report import LoadError, LoadReport
from finetune.weights.sources import SourceSpec, normalize_sources, to_plain

HEAD_ATTRS = ("fc", "classifier", "head", "heads")  # torchvision heads, when no pretrained_cfg says
ALWAYS_ALLOWED_MISSING = (r"(^|\.)num_batches_tracked$",)  # BN step counters: not weights
LOW_FIT = 0.5  # below this fraction of tensors placed, say "another architecture"


@dataclass
class _Placement:
    """One tensor that will be copied into the target."""

    source: int
    key: str
    tensor: torch.Tensor
    how: str  # "copy", "reshape" or "adapt"


@dataclass
class _Target:
    """What the planner needs to know about the model."""

    tensors: dict[str, torch.Tensor]
    heads: list[str]
    first_conv: str | None
    allow_mismatch: tuple[str, ...]


def load_pretrained(
    model: nn.Module,
    source: Any,
    *,
    remap: Any = "auto",
    allow_missing: Sequence[str] = (),
    allow_mismatch: Sequence[str] = (),
    trust_pickle: bool = False,
    classifier: str | Sequence[str] | None = None,
    first_conv: str | None = None,
    in_chans: int | None = None,
    dry_run: bool = False,
) -> LoadReport:
    """Load pretrained weights into ``model`` in place and account for every tensor.

    Args:
        model: The built model (new head, final ``in_chans``), on any device.
        source: A path, ``builtin:NAME``, or a list of ``{path, select, prefix, remap}``
            (later sources override earlier ones); OmegaConf containers accepted.
        remap: ``auto``, ``none``, a preset name or rules (see `finetune.weights.remap`).
        allow_missing: Regexes (searched) of model tensors that may stay at their initialisation.
        allow_mismatch: Regexes of model tensors whose shape may differ (left at init).
        trust_pickle: Allow unpickling arbitrary objects (runs code from the file).
        classifier: Dotted name(s) of the head; default ``model.pretrained_cfg['classifier']``.
        first_conv: Dotted name of the first conv; default ``pretrained_cfg['first_conv']``.
        in_chans: Expected input channels of the model (checked against ``first_conv``).
        dry_run: Plan and report only: copy nothing, raise nothing for load problems.

    Returns:
        The report; ``report.problems`` is empty unless ``dry_run``.

    Raises:
        LoadError: Some tensor could not be accounted for (the report is attached).
        UserError: A source could not be read, or a pattern is not a valid regex.
    """
    check_patterns(allow_missing, key="model.allow_missing")
    check_patterns(allow_mismatch, key="model.allow_mismatch")
    specs = normalize_sources(source)
    remap = to_plain(remap)
    target = _describe_target(model, classifier, first_conv, allow_mismatch, in_chans)
    report = LoadReport(model=type(model).__name__, target_tensors=len(target.tensors))
    plan = _plan_sources(specs, target, remap=remap, trust_pickle=trust_pickle, report=report)
    _account(plan, target, (*ALWAYS_ALLOWED_MISSING, *allow_missing), report)
    report.loaded_fraction = loaded_fraction(model, set(plan), target.heads)
    if dry_run:
        return report
    if report.problems:
        more = f" (+{len(report.problems) - 1} more problem(s))" if len(report.problems) > 1 else ""
        raise LoadError(report.problems[0] + more, report)
    _copy_into(plan, target.tensors)
    return report


def _describe_target(model: nn.Module, classifier: str | Sequence[str] | None, first_conv: str | None,
                     allow_mismatch: Sequence[str], in_chans: int | None) -> _Target:
    """The model's tensors, head and first conv, checked against ``in_chans``."""
    tensors = model.state_dict()  # detached views sharing storage with the parameters
    target = _Target(tensors, head_prefixes(model, classifier), first_conv_key(model, first_conv, tensors),
                     tuple(allow_mismatch))
    _check_in_chans(in_chans, target)
    return target


def head_prefixes(model: nn.Module, classifier: str | Sequence[str] | None) -> list[str]:
    """The classifier module name(s): given, from timm's ``pretrained_cfg``, or a known attribute."""
    if classifier is None:
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if classifier is None:
        classifier = next((n for n in HEAD_ATTRS if isinstance(getattr(model, n, None), nn.Module)), None)
    if classifier is None:
        return []
    return [classifier] if isinstance(classifier, str) else list(classifier)


def first_conv_key(model: nn.Module, first_conv: str | None, tensors: dict[str, torch.Tensor]) -> str | None:
    """The state-dict key of the first conv's weight (given, from timm, or the first 4-D weight)."""
    if first_conv is None:
        first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
        first_conv = first_conv[0] if isinstance(first_conv, (list, tuple)) else first_conv
    if first_conv is None:
        return next((k for k, v in tensors.items() if v.ndim == 4 and k.endswith("weight")), None)
    key = f"{first_conv}.weight"
    if key not in tensors:
        raise UserError(f"first_conv '{first_conv}' is not a module with a weight in {type(model).__name__}: "
                        "pass the dotted name of the first convolution")
    return key


def _check_in_chans(in_chans: int | None, target: _Target) -> None:
    """The model must already be built with ``in_chans`` inputs."""
    if in_chans is None or target.first_conv is None:
        return
    built = target.tensors[target.first_conv].shape[1]
    if built != in_chans:
        conv = target.first_conv.removesuffix(".weight")
        raise UserError(f"model.in_chans={in_chans} but the model's first conv '{conv}' takes {built} channels: "
                        f"build the model with in_chans={in_chans}")


def _plan_sources(
    specs: Sequence[SourceSpec], target: _Target, *, remap: Any, trust_pickle: bool, report: LoadReport
) -> dict[str, _Placement]:
    """Plan every source in order; a later source's tensor replaces an earlier one's."""
    plan: dict[str, _Placement] = {}
    for index, spec in enumerate(specs):
        plan.update(_plan_source(index, spec, target, remap=remap, trust_pickle=trust_pickle,
                                 several=len(specs) > 1, report=report))
    return plan


def _plan_source(
    index: int, spec: SourceSpec, target: _Target, *, remap: Any, trust_pickle: bool, several: bool, report: LoadReport
) -> dict[str, _Placement]:
    """Read one source, map its names and decide what each tensor becomes."""
    ckpt = read_checkpoint(spec.path, trust_pickle=trust_pickle, ema=spec.ema)
    tensors = _select(ckpt.tensors, spec.select, ckpt.path)
    view = _target_view(target.tensors, spec.prefix)
    inside = (lambda name: name.removeprefix(f"{spec.prefix}.")) if spec.prefix else (lambda name: name)
    conv = inside(target.first_conv.rpartition(".")[0]) if target.first_conv else None
    result = remap_keys(
        {k: tuple(v.shape) for k, v in tensors.items()},
        {short: tuple(target.tensors[full].shape) for short, full in view.items()},
        spec.remap if spec.remap is not None else remap,
        heads=[inside(h) for h in target.heads],
        first_conv=conv,
    )
    plan: dict[str, _Placement] = {}
    for src_key, short in result.mapping.items():
        full = view[short]
        placement = _place(index, src_key, tensors[src_key], full, target, ckpt.path, report)
        if placement is not None:
            plan[full] = placement
            report.loaded[full] = f"[{index}] {src_key}"
        if src_key != full:
            report.remapped[f"[{index}] {src_key}"] = full
    unexpected = [k for k in tensors if k not in result.mapping and k not in result.dropped]
    report.unexpected += [f"[{index}] {k}" for k in unexpected]
    report.sources.append({
        "index": index, "path": ckpt.path, "format": ckpt.format, "container": ckpt.container,
        "select": spec.select, "prefix": spec.prefix, "tensors": len(tensors), "method": result.method,
        "stripped": result.stripped, "added": result.added, "aligned": result.aligned,
        "dropped": result.dropped, "unexpected": len(unexpected), "placed": len(plan), "non_tensor": ckpt.skipped,
    })
    if not result.mapping and several:
        report.problems.append(f"weights '{ckpt.path}' have no tensor whose name fits the model (source keys like "
                               f"'{next(iter(tensors))}'): check model.name, or give model.remap rules or a preset")
    return plan


def _select(tensors: dict[str, torch.Tensor], select: str | None, path: str) -> dict[str, torch.Tensor]:
    """Keep the ``select`` sub-tree, its prefix removed."""
    if not select:
        return tensors
    chosen = {k[len(select) + 1:]: v for k, v in tensors.items() if k.startswith(f"{select}.")}
    if not chosen:
        tops = sorted({k.split(".", 1)[0] for k in tensors})[:8]
        raise UserError(f"select '{select}' matches no tensor in '{path}': "
                        f"its top-level prefixes are {', '.join(tops)}")
    return chosen


def _target_view(tensors: dict[str, torch.Tensor], prefix: str | None) -> dict[str, str]:
    """``{name inside the prefix: full name}`` of the tensors under ``prefix``."""
    if not prefix:
        return {k: k for k in tensors}
    view = {k[len(prefix) + 1:]: k for k in tensors if k.startswith(f"{prefix}.")}
    if not view:
        raise UserError(f"weights prefix '{prefix}' is not a submodule with weights in the model: "
                        "use a dotted module name")
    return view


def _place(
    index: int, src_key: str, tensor: torch.Tensor, full: str, target: _Target, path: str, report: LoadReport
) -> _Placement | None:
    """Decide how one source tensor goes into ``full``; record anything but a plain copy."""
    src, dst = tuple(tensor.shape), tuple(target.tensors[full].shape)
    entry = {"key": full, "source_shape": src, "target_shape": dst}
    if src == dst:
        _note_cast(tensor, target.tensors[full], report)
        return _Placement(index, src_key, tensor, "copy")
    if full == target.first_conv and len(src) == 4 and (src[0], *src[2:]) == (dst[0], *dst[2:]):
        return _adapt_first_conv(index, src_key, tensor, dst, entry, path, report)
    if reshapeable(src, dst):
        report.reshaped.append(entry)
        return _Placement(index, src_key, tensor, "reshape")
    if is_under(full.rpartition(".")[0], target.heads):
        report.head.append(entry)
    elif matches_any(full, target.allow_mismatch):
        report.mismatched.append(entry)
    else:
        report.problems.append(f"shape mismatch: '{src_key}' {src} in '{path}' vs model '{full}' {dst}: "
                               f"fix model.remap, or allow it with model.allow_mismatch=['{full}']")
    return None


def _adapt_first_conv(
    index: int, src_key: str, tensor: torch.Tensor, dst: tuple[int, ...], entry: dict, path: str, report: LoadReport
) -> _Placement | None:
    """Adapt the first conv to the model's input channels (timm's ``adapt_input_conv``)."""
    try:
        adapted = adapt_input_conv(dst[1], tensor)
    except (NotImplementedError, AssertionError):
        adapted = None
    if adapted is None or tuple(adapted.shape) != dst:
        report.problems.append(f"first conv '{src_key}' in '{path}' has {tensor.shape[1]} input channels and "
                               f"cannot be adapted to {dst[1]}: only 3-channel weights adapt to other in_chans")
        return None
    report.adapted.append({**entry, "how": "adapt_input_conv (1: sum over RGB; N: repeat RGB, scale 3/N)"})
    return _Placement(index, src_key, adapted, "adapt")


def _note_cast(src: torch.Tensor, dst: torch.Tensor, report: LoadReport) -> None:
    """Count a dtype conversion (the copy itself casts)."""
    if src.dtype != dst.dtype:
        name = f"{str(src.dtype).removeprefix('torch.')}->{str(dst.dtype).removeprefix('torch.')}"
        report.cast[name] = report.cast.get(name, 0) + 1


def check_patterns(patterns: Sequence[str], *, key: str) -> None:
    """Every pattern must be a valid regex: a typo is an error naming ``key``, never a silent non-match."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise UserError(f"{key}: '{pattern}' is not a valid regular expression ({err}): write a Python regex "
                            r"searched in tensor names, e.g. '\.bias$' (not a glob like '*.bias')") from None


def matches_any(key: str, patterns: Sequence[str]) -> bool:
    """Whether a regex in ``patterns`` (checked by `check_patterns`) is found in ``key``."""
    return any(re.search(pattern, key) for pattern in patterns)


def _account(plan: dict[str, _Placement], target: _Target, allowed: Sequence[str], report: LoadReport) -> None:
    """Every target tensor: loaded, head re-initialised, allowed missing, or a problem."""
    report.head = _last_per_key(h for h in report.head if h["key"] not in plan)  # a later source may fill it
    report.mismatched = _last_per_key(m for m in report.mismatched if m["key"] not in plan)
    reported_heads = {h["key"] for h in report.head} | {m["key"] for m in report.mismatched}
    unexplained, allowed_missing = [], []
    for key, tensor in target.tensors.items():
        if key in plan or key in reported_heads:
            continue
        if is_under(key.rpartition(".")[0], target.heads):
            report.head.append({"key": key, "source_shape": None, "target_shape": tuple(tensor.shape)})
        elif matches_any(key, allowed):
            allowed_missing.append(key)
        else:
            unexplained.append(key)
    report.missing += unexplained + allowed_missing
    if unexplained:
        low_fit = len(plan) < LOW_FIT * report.target_tensors
        report.problems.insert(0 if low_fit else len(report.problems), _missing_message(unexplained, low_fit, report))


def _last_per_key(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per key, the latest source's."""
    return list({e["key"]: e for e in entries}.values())


def _missing_message(keys: list[str], low_fit: bool, report: LoadReport) -> str:
    """One line naming the missing tensors and the fix."""
    names = ", ".join(f"'{k}'" for k in keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    paths = ", ".join(f"'{s['path']}'" for s in report.sources)
    if low_fit:
        return (f"weights {paths} fit only {len(report.loaded)} of {report.target_tensors} tensors of "
                f"{report.model} (missing {names}): they look like weights for another architecture; "
                "check model.name, or give model.remap rules or a preset")
    return (f"{len(keys)} model tensor(s) got no weights from {paths}: {names}; "
            "fix model.remap, or allow them with model.allow_missing=['PATTERN']")


def loaded_fraction(model: nn.Module, loaded: set[str], heads: Sequence[str]) -> float:
    """Fraction of backbone parameter elements (head excluded) that were loaded."""
    body = {k: p.numel() for k, p in model.named_parameters() if not is_under(k.rpartition(".")[0], heads)}
    total = sum(body.values())
    return sum(n for k, n in body.items() if k in loaded) / total if total else 1.0


def _copy_into(plan: dict[str, _Placement], tensors: dict[str, torch.Tensor]) -> None:
    """Copy every planned tensor into the model's storage (casting, across devices)."""
    with torch.no_grad():
        for key, placement in plan.items():
            dst = tensors[key]
            src = placement.tensor.reshape(dst.shape) if placement.how == "reshape" else placement.tensor
            dst.copy_(src)
