"""How much a weights file may expand to when its structure is walked, and the count that enforces it.

A pickle (``torch.save``) or a TorchScript archive's ``data.pkl`` is a graph, not a tree: one
dict or module object may be the value of many keys, at no cost in the file. Walked as a tree,
a 1.6 KB file whose objects each hold the next one twice, 40 levels deep, names 2^40 tensors.
`measure_tree` counts what a walk would produce, once per distinct object (memoised by ``id``),
before anything is enumerated; the readers refuse a file past these limits with one line.

>>> inner = {"w": 0}
>>> level = {"a": inner, "b": inner}  # names x.a.w, x.b.w, y.a.w, y.b.w: 4 names of 5 characters
>>> measure_tree({"x": level, "y": level}, lambda n: list(n.items()) if isinstance(n, dict) else None)
TreeSize(names=4, chars=20, depth=3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The biggest timm models have about 2,000 tensors (hrnet_w64 1,956, tf_efficientnet_l2 1,914) and
# the largest public checkpoints (mixture-of-experts language models) about 100,000; no real state
# dict reaches a million names. At this limit the names and their dict take about 200 MB.
MAX_NAMES = 1_000_000
# All the names' characters together: timm's longest name has 71 characters, so a million names of
# 64 on average. Bounds a file that repeats one long key at every level.
MAX_NAME_CHARS = 64 * 2**20
# Levels of nesting: a state dict is flat, a Lightning checkpoint nests it 1-2 levels deep, timm's
# deepest module trees 8 levels (``stages.3.blocks.1.attn.qkv.weight``); the walk recurses no deeper.
MAX_DEPTH = 64

Children = Callable[[object], "list[tuple[str, object]] | None"]


class TooLarge(ValueError):
    """The structure would expand past a limit (or contains itself); the message says which and by how much."""


@dataclass(frozen=True)
class TreeSize:
    """What walking a node as a tree produces: leaf names, their characters in all, levels below it."""

    names: int
    chars: int
    depth: int


def measure_tree(root: object, children: Children) -> TreeSize:
    """Count the names a tree walk of ``root`` would produce, visiting each distinct object once.

    Args:
        root: The loaded structure.
        children: ``node -> [(key, child), ...]`` for a container (in walk order), None for a leaf.
            A leaf is one name; an empty container none.

    Raises:
        TooLarge: The walk would produce more than `MAX_NAMES` names or `MAX_NAME_CHARS` characters,
            go deeper than `MAX_DEPTH` levels, or never end (an object that contains itself).
    """
    size = _measure(root, children, {}, set(), 0)
    if size.names > MAX_NAMES:
        raise TooLarge(f"it would name {size.names} tensors, {size.depth} levels deep (containers shared between "
                       f"levels), over the limit of {MAX_NAMES}")
    if size.chars > MAX_NAME_CHARS:
        raise TooLarge(f"its {size.names} tensor names would take {size.chars} characters, {size.depth} levels deep "
                       f"(long keys repeated at every level), over the limit of {MAX_NAME_CHARS}")
    return size


def _measure(node: object, children: Children, sizes: dict[int, TreeSize], open_ids: set[int],
             level: int) -> TreeSize:
    """`measure_tree` of one node; ``sizes`` memoises finished objects, ``open_ids`` holds its ancestors."""
    key = id(node)
    if key in sizes:
        size = sizes[key]
    elif key in open_ids:
        raise TooLarge(f"a container inside it contains itself ({level} levels down), so walking it never ends")
    else:
        entries = children(node)
        if entries is None:
            return TreeSize(names=1, chars=0, depth=0)
        if level >= MAX_DEPTH:
            raise TooLarge(f"its containers nest more than {MAX_DEPTH} levels deep")
        open_ids.add(key)
        names = chars = depth = 0
        for name, child in entries:
            inner = _measure(child, children, sizes, open_ids, level + 1)
            names += inner.names
            chars += inner.chars + inner.names * (len(name) + (1 if inner.depth else 0))  # "name." before each
            depth = max(depth, inner.depth + 1)
        open_ids.discard(key)
        size = sizes[key] = TreeSize(names=names, chars=chars, depth=depth)
    if level + size.depth > MAX_DEPTH:
        raise TooLarge(f"its containers nest more than {MAX_DEPTH} levels deep")
    return size
