"""Map source tensor names onto a target model's names.

``remap`` is one of:

- ``"none"``: names are used as they are;
- ``"auto"`` (default): a matching preset if the source's convention is recognised,
  otherwise exact names, then wrapper prefixes (``module.``, ``_orig_mod.`` always;
  ``model.``, ``backbone.``, ``encoder.`` where stripping them makes keys fit; a
  target-side prefix where adding one does), then a structural alignment of what is
  still unmatched (in order, by shape, one-to-one, refusing anything ambiguous);
- a preset name (see `finetune.weights.presets.PRESETS`);
- rules: a mapping with ``select``, ``strip_prefix``, ``add_prefix``,
  ``rename: [[regex, replacement], ...]`` (applied in order, ``re.sub``) and
  ``drop: [regex, ...]``.

Every function here is pure: names and shapes in, a mapping out. Two source keys that
land on one target are an error, never an overwrite.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import UserError
from finetune.weights.presets import PRESETS, RulePreset, apply_preset, detect_preset

Shape = tuple[int, ...]

ALWAYS_WRAPPERS = ("module", "_orig_mod")  # DDP / DataParallel, torch.compile: never real names
FIT_WRAPPERS = ("model", "backbone", "encoder")  # stripped only where that makes keys fit
RULE_KEYS = ("select", "strip_prefix", "add_prefix", "rename", "drop")


@dataclass
class Remapped:
    """Result of remapping one source.

    Attributes:
        mapping: ``{source key: target key}`` for every source key that found a target.
        method: What produced it: ``none``, ``rules``, a preset name, or ``auto``.
        stripped: ``{prefix: count}`` of wrapper prefixes removed.
        added: ``{prefix: count}`` of target-side prefixes added.
        aligned: Source keys placed by structural alignment.
        dropped: Source keys dropped by rules.
    """

    mapping: dict[str, str]
    method: str
    stripped: dict[str, int] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    aligned: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def remap_keys(
    source: Mapping[str, Shape],
    target: Mapping[str, Shape],
    remap: Any = "auto",
    *,
    heads: Sequence[str] = (),
    first_conv: str | None = None,
) -> Remapped:
    """Map source names onto target names.

    Args:
        source: Source ``{name: shape}`` in file order.
        target: Target ``{name: shape}`` in model order.
        remap: ``"auto"``, ``"none"``, a preset name or a rules mapping (module docstring).
        heads: Target module prefixes of the classifier (aligning: dim 0 may differ).
        first_conv: Target module name of the first conv (aligning: dim 1 may differ).

    Returns:
        The mapping and how it was found.

    Raises:
        UserError: Unknown preset, bad rules, two sources on one target, ambiguous alignment.

    >>> remap_keys({"module.fc.weight": (2, 3)}, {"fc.weight": (2, 3)}).mapping
    {'module.fc.weight': 'fc.weight'}
    """
    if isinstance(remap, Mapping):
        return _remap_by_rules(list(source), target, dict(remap))
    if remap in (None, "none"):
        return Remapped(check_one_to_one({k: k for k in source if k in target}), "none")
    if remap == "auto":
        preset = detect_preset([strip_wrappers(k)[0] for k in source])
        if preset:
            return _remap_by_preset(preset.name, source, target)
        return _remap_auto(source, target, heads, first_conv)
    if isinstance(remap, str) and remap in PRESETS:
        return _remap_by_preset(remap, source, target)
    choices = ", ".join(["auto", "none", *PRESETS, "{rename: [[regex, repl]], ...}"])
    raise UserError(f"unknown model.remap {remap!r}: choose one of {choices}")


def _remap_by_preset(name: str, source: Mapping[str, Shape], target: Mapping[str, Shape]) -> Remapped:
    """Apply a preset to the names with DDP/compile wrappers removed."""
    preset = PRESETS[name]
    bare = check_one_to_one({k: strip_wrappers(k)[0] for k in source})
    if isinstance(preset, RulePreset):
        result = _remap_by_rules(list(bare.values()), target, preset.rules)
        original = {v: k for k, v in bare.items()}
        return Remapped({original[s]: t for s, t in result.mapping.items()}, name,
                        dropped=[original[d] for d in result.dropped])
    mapping = apply_preset(preset, list(bare.values()), list(target))
    return Remapped(check_one_to_one({k: mapping[bare[k]] for k in source}), name)


def _remap_by_rules(keys: list[str], target: Mapping[str, Shape], rules: dict[str, Any]) -> Remapped:
    """Apply explicit rules in the order select, strip, rename, drop, add."""
    unknown = set(rules) - set(RULE_KEYS)
    if unknown:
        raise UserError(f"unknown remap rule(s) {sorted(unknown)}: allowed are {', '.join(RULE_KEYS)}")
    mapping: dict[str, str] = {}
    dropped: list[str] = []
    for key in keys:
        name = apply_rules(key, rules)
        if name is None:
            dropped.append(key)
        elif name in target:
            mapping[key] = name
    return Remapped(check_one_to_one(mapping), "rules", dropped=dropped)


def apply_rules(key: str, rules: Mapping[str, Any]) -> str | None:
    """One key through the rules; ``None`` when dropped or outside ``select``.

    >>> apply_rules("net.layer.0.w", {"select": "net", "rename": [[r"^layer\\.(\\d+)", r"blocks.\\1"]]})
    'blocks.0.w'
    """
    select = rules.get("select")
    if select:
        if not key.startswith(f"{select}."):
            return None
        key = key[len(select) + 1:]
    for prefix in _as_list(rules.get("strip_prefix")):
        key = key.removeprefix(prefix)
    for pattern, replacement in rules.get("rename") or []:
        key = _compile(pattern).sub(replacement, key)
    if any(_compile(p).search(key) for p in _as_list(rules.get("drop"))):
        return None
    return f"{rules.get('add_prefix') or ''}{key}"


def _as_list(value: Any) -> list[str]:
    """A rule value that may be one string or a list of strings."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _compile(pattern: str) -> re.Pattern[str]:
    """Compile a user regex, naming it when it is invalid."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(f"remap rule regex {pattern!r} is invalid ({err}): fix model.remap") from None


def check_one_to_one(mapping: Mapping[str, str]) -> dict[str, str]:
    """Raise when two source keys land on one target; return the mapping as a dict."""
    seen: dict[str, str] = {}
    for src, tgt in mapping.items():
        if tgt in seen:
            raise UserError(f"source keys '{seen[tgt]}' and '{src}' both map to '{tgt}': "
                            "fix model.remap (drop one, or select a sub-tree)")
        seen[tgt] = src
    return dict(mapping)


def strip_wrappers(key: str) -> tuple[str, str]:
    """Remove ``_orig_mod.`` anywhere and ``module.`` from the leading wrapper run.

    Returns:
        ``(key without them, the removed text)``.

    >>> strip_wrappers("model.module._orig_mod.backbone.fc.weight")
    ('model.backbone.fc.weight', 'module._orig_mod.')
    """
    parts = key.split(".")
    kept: list[str] = []
    removed: list[str] = []
    leading = True
    for part in parts[:-1]:
        leading = leading and part in ALWAYS_WRAPPERS + FIT_WRAPPERS
        is_wrapper = part == "_orig_mod" or (leading and part == "module")
        (removed if is_wrapper else kept).append(part)
    name = ".".join(kept + parts[-1:])
    return name, "".join(f"{p}." for p in removed)


def _remap_auto(
    source: Mapping[str, Shape], target: Mapping[str, Shape], heads: Sequence[str], first_conv: str | None
) -> Remapped:
    """Exact names, then wrapper prefixes, then structural alignment."""
    result = Remapped({}, "auto")
    names: dict[str, str] = {}
    for key in source:
        names[key], removed = strip_wrappers(key)
        if removed:
            result.stripped[removed] = result.stripped.get(removed, 0) + 1
    result.mapping = check_one_to_one({k: n for k, n in names.items() if n in target})
    _fit_prefixes(names, target, result)
    left_src = {k: source[k] for k in source if k not in result.mapping}
    taken = set(result.mapping.values())
    left_tgt = {k: s for k, s in target.items() if k not in taken}
    aligned = align_by_structure(left_src, left_tgt, heads=heads, first_conv=first_conv)
    result.mapping.update(aligned)
    result.aligned = list(aligned)
    return result


def _fit_prefixes(names: dict[str, str], target: Mapping[str, Shape], result: Remapped) -> None:
    """Repeatedly apply the (strip, add) prefix pair that makes the most keys fit."""
    for _ in range(8):  # each round places a group of keys; real checkpoints need 1-3
        left = {k: n for k, n in names.items() if k not in result.mapping}
        free = set(target) - set(result.mapping.values())
        best = _best_prefix_pair(left, free)
        if best is None:
            return
        strip, add = best
        fitted = {k: f"{add}{n[len(strip):]}" for k, n in left.items()
                  if n.startswith(strip) and f"{add}{n[len(strip):]}" in free}
        result.mapping.update(check_one_to_one(fitted))
        if strip:
            result.stripped[strip] = result.stripped.get(strip, 0) + len(fitted)
        if add:
            result.added[add] = result.added.get(add, 0) + len(fitted)


def _best_prefix_pair(names: Mapping[str, str], free: set[str]) -> tuple[str, str] | None:
    """The (strip, add) pair fitting most names; ``None`` if none fits or the best is tied."""
    strips = {""} | {_wrapper_run(n)[: i] for n in names.values() for i in _cut_points(_wrapper_run(n))}
    adds = {""} | {t.split(".", 1)[0] + "." for t in free if "." in t}
    scores = Counter()
    for strip in strips:
        for add in adds:
            if strip or add:
                scores[(strip, add)] = sum(n.startswith(strip) and f"{add}{n[len(strip):]}" in free
                                           for n in names.values())
    ranked = sorted(scores.items(), key=lambda item: (-item[1], len(item[0][0]) + len(item[0][1])))
    if not ranked or ranked[0][1] == 0:
        return None
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1] and _cost(ranked[1][0]) == _cost(ranked[0][0]):
        return None  # two equally good explanations: leave it to alignment or the report
    return ranked[0][0]


def _cost(pair: tuple[str, str]) -> int:
    """How much a (strip, add) pair changes a name."""
    return len(pair[0]) + len(pair[1])


def _wrapper_run(name: str) -> str:
    """The leading run of ``model.``/``backbone.``/``encoder.`` segments of a name."""
    run = ""
    for part in name.split(".")[:-1]:
        if part not in FIT_WRAPPERS + ALWAYS_WRAPPERS:
            break
        run += f"{part}."
    return run


def _cut_points(run: str) -> list[int]:
    """End offsets of each segment in a wrapper run (``"a.b."`` -> ``[2, 4]``)."""
    return [i + 1 for i, ch in enumerate(run) if ch == "."]


def align_by_structure(
    source: Mapping[str, Shape],
    target: Mapping[str, Shape],
    *,
    heads: Sequence[str] = (),
    first_conv: str | None = None,
) -> dict[str, str]:
    """Pair unmatched source and target tensors by module order and shapes.

    Tensors are grouped into modules (name minus the last segment). The target's
    module sequence must embed into the source's in exactly one way, each pair having
    the same number of tensors with equal shapes (or shapes equal up to size-1 dims);
    head modules may differ in dim 0 (classes), the first conv in dim 1 (input
    channels). If the whole target does not embed, its non-head modules are tried alone.

    Returns:
        ``{source key: target key}``, empty when nothing aligns.

    Raises:
        UserError: More than one alignment fits (ambiguous).
    """
    if not source or not target:
        return {}
    src_modules, tgt_modules = _group_modules(source), _group_modules(target)
    flex = [0 if is_under(name, heads) else 1 if name == first_conv else None for name, _ in tgt_modules]
    pairs = _embed(tgt_modules, src_modules, flex)
    if pairs is None and 0 in flex:
        body = [(m, f) for m, f in zip(tgt_modules, flex) if f != 0]
        tgt_modules, flex = [m for m, _ in body], [f for _, f in body]
        pairs = _embed(tgt_modules, src_modules, flex)
    if pairs is None:
        return {}
    mapping = {}
    for t_index, s_index in pairs:
        for (s_key, _), (t_key, _) in zip(src_modules[s_index][1], tgt_modules[t_index][1]):
            mapping[s_key] = t_key
    return mapping




def _group_modules(shapes: Mapping[str, Shape]) -> list[tuple[str, list[tuple[str, Shape]]]]:
    """``[(module name, [(key, shape), ...]), ...]`` in first-seen order."""
    modules: dict[str, list[tuple[str, Shape]]] = {}
    for key, shape in shapes.items():
        modules.setdefault(key.rpartition(".")[0], []).append((key, tuple(shape)))
    return list(modules.items())


def _compatible(tgt: list[tuple[str, Shape]], src: list[tuple[str, Shape]], flex: int | None) -> bool:
    """Same tensor count, shapes equal (up to size-1 dims) except in dimension ``flex``."""
    return _shapes_compatible(tuple(s for _, s in tgt), tuple(s for _, s in src), flex)


@functools.lru_cache(maxsize=65536)
def _shapes_compatible(tgt: tuple[Shape, ...], src: tuple[Shape, ...], flex: int | None) -> bool:
    """`_compatible` on shapes only (cached: the alignment asks the same pairs often)."""
    if len(tgt) != len(src):
        return False
    for t, s in zip(tgt, src):
        if flex is not None and len(t) == len(s) > flex and t[:flex] + t[flex + 1:] == s[:flex] + s[flex + 1:]:
            continue
        if t != s and not reshapeable(s, t):
            return False
    return True


def reshapeable(src: Shape, tgt: Shape) -> bool:
    """Equal up to size-1 dimensions: ``(C, 1, 1)`` vs ``(C,)``, 1x1 conv vs linear."""
    return tuple(d for d in src if d != 1) == tuple(d for d in tgt if d != 1) and src != tgt


def _embed(tgt: list, src: list, flex: list[int | None]) -> list[tuple[int, int]] | None:
    """The unique order-preserving embedding of ``tgt`` modules into ``src`` modules.

    Counts embeddings by dynamic programming (capped at 2); written by hand because no
    library aligns two state-dict layouts.

    Raises:
        UserError: Two or more embeddings exist.
    """
    n, m = len(tgt), len(src)
    if n > m:
        return None
    ways = [[0] * (m + 1) for _ in range(n + 1)]
    ways[n] = [1] * (m + 1)
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            match = ways[i + 1][j + 1] if _compatible(tgt[i][1], src[j][1], flex[i]) else 0
            ways[i][j] = min(2, ways[i][j + 1] + match)
    if ways[0][0] == 0:
        return None
    if ways[0][0] > 1:
        example = tgt[0][1][0][0]
        raise UserError(f"structural alignment is ambiguous: {n} unmatched model modules (first '{example}') fit "
                        "the checkpoint in more than one way; give model.remap rules ({rename: [[regex, repl]]}) "
                        "or a preset")
    pairs, j = [], 0
    for i in range(n):
        while not (_compatible(tgt[i][1], src[j][1], flex[i]) and ways[i + 1][j + 1]):
            j += 1
        pairs.append((i, j))
        j += 1
    return pairs


def is_under(name: str, prefixes: str | Sequence[str]) -> bool:
    """Whether ``name`` is one of the module paths ``prefixes`` or inside one.

    >>> is_under("fc.weight", "fc"), is_under("fc2.weight", "fc"), is_under("fc", ["head", "fc"])
    (True, False, True)

    An empty prefix covers nothing (a model without a classifier has the head ``""``).
    """
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(p and (name == p or name.startswith(f"{p}.")) for p in prefixes)
