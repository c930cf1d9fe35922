"""Named key-remap presets: tables (data) plus one pure function that applies them.

A preset maps one library's naming convention onto another's. Top-level modules map by
a table; numbered blocks map by index onto the target model's own block list
(``blocks.S.I`` in order), with one table per block kind. Any source key that no table
knows is an error, never a silent skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from finetune.errors import UserError


@dataclass(frozen=True)
class Preset:
    """A key convention -> timm convention mapping, as data.

    Attributes:
        name: The ``model.remap`` value that selects it.
        signature: Regex; ``remap=auto`` picks this preset when a source key matches it.
        top: ``{source module: target module}`` for keys outside the numbered blocks.
        block_key: Regex with groups ``(index, module, leaf)`` for keys inside a block.
        target_blocks: Regex with groups ``(root, stage, index)`` finding the target's
            blocks in order (``root`` lets the target sit under a wrapper prefix).
        kind_marker: ``{source module: kind}``: a block holding that module is of that kind.
        default_kind: Kind of a block holding none of the markers.
        block_tables: ``{kind: {source module: target module}}``.
    """

    name: str
    signature: str
    top: dict[str, str]
    block_key: str
    target_blocks: str
    kind_marker: dict[str, str]
    default_kind: str
    block_tables: dict[str, dict[str, str]] = field(default_factory=dict)


_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}

# lukemelas EfficientNet-PyTorch (and efficientnet_lite_pytorch) -> timm EfficientNet.
EFFICIENTNET_PYTORCH = Preset(
    name="efficientnet_pytorch",
    signature=r"^_blocks\.\d+\._depthwise_conv\.weight$",
    top={"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"},
    block_key=r"^_blocks\.(\d+)\.([\w.]+)\.(\w+)$",
    target_blocks=r"^(.*?)blocks\.(\d+)\.(\d+)\.",
    kind_marker={"_expand_conv": "inverted_residual"},
    default_kind="depthwise_separable",
    block_tables={
        "depthwise_separable": {
            "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2", **_SE,
        },
        "inverted_residual": {
            "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3", **_SE,
        },
    },
)


@dataclass(frozen=True)
class RulePreset:
    """A named set of remap rules (``select``/``strip_prefix``/``rename``/``drop``/``add_prefix``).

    Attributes:
        name: The ``model.remap`` value that selects it.
        signature: Regex; ``remap=auto`` picks this preset when a source key matches it.
        rules: Rules as accepted by `finetune.weights.remap.apply_rules`.
    """

    name: str
    signature: str
    rules: dict[str, list]


# torchvision VisionTransformer -> timm VisionTransformer (same q, k, v order in qkv).
TORCHVISION_VIT = RulePreset(
    name="torchvision_vit",
    signature=r"^encoder\.layers\.encoder_layer_\d+\.self_attention\.in_proj_weight$",
    rules={
        "rename": [
            [r"^class_token$", "cls_token"],
            [r"^conv_proj\.", "patch_embed.proj."],
            [r"^encoder\.pos_embedding$", "pos_embed"],
            [r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."],
            [r"\.ln_1\.", ".norm1."],
            [r"\.ln_2\.", ".norm2."],
            [r"\.self_attention\.in_proj_(weight|bias)$", r".attn.qkv.\1"],
            [r"\.self_attention\.out_proj\.", ".attn.proj."],
            [r"\.mlp\.0\.", ".mlp.fc1."],
            [r"\.mlp\.3\.", ".mlp.fc2."],
            [r"^encoder\.ln\.", "norm."],
            [r"^heads\.head\.", "head."],
        ],
    },
)

PRESETS: dict[str, Preset | RulePreset] = {p.name: p for p in (EFFICIENTNET_PYTORCH, TORCHVISION_VIT)}


def detect_preset(source_keys: list[str]) -> Preset | RulePreset | None:
    """The preset whose signature some source key matches, if exactly one does."""
    hits = [p for p in PRESETS.values() if any(re.match(p.signature, k) for k in source_keys)]
    return hits[0] if len(hits) == 1 else None


def apply_preset(preset: Preset, source_keys: list[str], target_keys: list[str]) -> dict[str, str]:
    """Map every source key through ``preset``; the target supplies its block order.

    Args:
        preset: The convention tables.
        source_keys: Names in the source convention.
        target_keys: The target model's names (block order and wrapper prefix come from here).

    Returns:
        ``{source key: target key}`` for every source key.

    Raises:
        UserError: A key no table knows, or more source blocks than target blocks.

    >>> apply_preset(EFFICIENTNET_PYTORCH, ["_blocks.0._bn1.bias", "_fc.weight"],
    ...              ["blocks.0.0.bn1.bias", "classifier.weight"])
    {'_blocks.0._bn1.bias': 'blocks.0.0.bn1.bias', '_fc.weight': 'classifier.weight'}
    """
    root, blocks = _target_blocks(preset, target_keys)
    kinds = _block_kinds(preset, source_keys)
    mapping: dict[str, str] = {}
    for key in source_keys:
        found = re.match(preset.block_key, key)
        if found:
            index, module, leaf = int(found[1]), found[2], found[3]
            if index >= len(blocks):
                raise UserError(f"remap preset '{preset.name}': source block {index} has no counterpart (the model "
                                f"has {len(blocks)} blocks): the weights are for a bigger architecture")
            table = preset.block_tables[kinds[index]]
            target = f"{blocks[index]}.{table[module]}.{leaf}" if module in table else None
        else:
            module, _, leaf = key.rpartition(".")
            target = f"{root}{preset.top[module]}.{leaf}" if module in preset.top else None
        if target is None:
            raise UserError(f"remap preset '{preset.name}' has no rule for source key '{key}': "
                            "use model.remap=auto or give rename rules")
        mapping[key] = target
    return mapping


def _block_kinds(preset: Preset, source_keys: list[str]) -> dict[int, str]:
    """Kind of each source block, from the marker modules it holds."""
    kinds: dict[int, str] = {}
    for key in source_keys:
        found = re.match(preset.block_key, key)
        if found:
            index, module = int(found[1]), found[2]
            marked = preset.kind_marker.get(module)
            kinds[index] = marked or kinds.get(index, preset.default_kind)
    return kinds


def _target_blocks(preset: Preset, target_keys: list[str]) -> tuple[str, list[str]]:
    """The target's wrapper prefix and its block paths (``blocks.S.I``) in order."""
    roots: set[str] = set()
    blocks: dict[str, None] = {}
    for key in target_keys:
        found = re.match(preset.target_blocks, key)
        if found:
            roots.add(found[1])
            blocks[f"{found[1]}blocks.{found[2]}.{found[3]}"] = None
    if len(roots) != 1:
        raise UserError(f"remap preset '{preset.name}' needs a model with one 'blocks.S.I' list "
                        f"(found {len(roots)}): pick a timm EfficientNet model")
    return roots.pop(), list(blocks)
