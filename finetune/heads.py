"""The new classifier: what it is (linear, MLP, none), how it starts, and warm starts from pretrained rows.

``build_mlp_head`` and ``final_layer`` are used by ``finetune.models`` when it builds
the network; ``init_head`` and ``warm_start_subset`` run after the pretrained weights
are loaded, on the layer the weights could not fill.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo
from timm.layers import get_act_layer
from torch import nn

from finetune.errors import UserError, message_of
from finetune.files import read_json_data, read_yaml_data
from finetune.weights import LoadReport, read_checkpoint

HEAD_STD = 0.02
HEAD_INITS = ("default", "zeros", "trunc_normal")  # head.init, see init_head
NORMS = {None: None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
LABEL_SETS = ("imagenet", "imagenet-1k", "imagenet-21k", "imagenet-22k", "imagenet-12k")


def build_mlp_head(in_features: int, num_classes: int, *, hidden: Sequence[int], activation: str = "relu",
                   norm: str | None = None, dropout: float = 0.0) -> nn.Sequential:
    """``[Linear -> norm -> activation -> Dropout] x len(hidden) -> Linear``, fastai's ``create_head`` shape.

    >>> build_mlp_head(8, 3, hidden=[16], norm="batch")(torch.zeros(2, 8)).shape
    torch.Size([2, 3])
    """
    if not hidden:
        raise UserError("head=mlp needs at least one hidden size: head.hidden=[512]")
    if norm not in NORMS:
        raise UserError(f"head.norm '{norm}' is not known: use null, batch or layer")
    try:
        act = get_act_layer(activation)
    except (KeyError, ValueError):
        act = None
    if act is None:
        raise UserError(f"head.activation '{activation}' is not a timm activation: use relu, gelu, silu, ...")
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if norm is not None:
            layers.append(NORMS[norm](size))
        layers += [act(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def final_layer(model: nn.Module, classifier: str) -> nn.Module:
    """The layer producing the logits: ``classifier`` itself, or the last Linear/Conv2d inside it."""
    head = model.get_submodule(classifier)
    if isinstance(head, (nn.Linear, nn.Conv2d)):
        return head
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UserError(f"head '{classifier}' has no Linear or Conv2d layer to initialise")
    return layers[-1]


def init_head(model: nn.Module, classifier: str, mode: str) -> None:
    """(Re)initialise the final layer of the head at ``classifier``.

    ``default`` keeps the library's initialisation; ``zeros`` starts from all-zero
    logits; ``trunc_normal`` draws weights with std 0.02 and zero bias, which keeps
    the first logits small whatever the class count (timm's EfficientNet init
    scales with 1/num_classes and gives large logits for a handful of classes).
    Hidden layers of an MLP head keep their default (Kaiming) initialisation.
    """
    if mode == "default":
        return
    layer = final_layer(model, classifier)
    with torch.no_grad():
        if mode == "zeros":
            layer.weight.zero_()
        else:
            nn.init.trunc_normal_(layer.weight, std=HEAD_STD, a=-2 * HEAD_STD, b=2 * HEAD_STD)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()


# ------------------------------------------------------------------ subset warm start
def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def label_index(label_set: str) -> tuple[dict[str, int], int]:
    """``{normalised name or synset: row}`` of a timm label set, and its class count.

    Every comma-separated alias of an ImageNet description counts ('great white shark',
    'white shark', ...); the first row wins when two classes share an alias.
    """
    info = ImageNetInfo("imagenet-1k" if label_set == "imagenet" else label_set)
    index: dict[str, int] = {}
    for row, (synset, description) in enumerate(zip(info.label_names(), info.label_descriptions())):
        for alias in [synset, *description.split(",")]:
            index.setdefault(_normalise(alias), row)
    return index, info.num_classes()


def match_classes(class_names: Sequence[str], subset: str) -> tuple[dict[int, int], int | None]:
    """``{new class index: pretrained row}`` for ``head.subset`` (a label set name or a mapping file).

    A mapping file (YAML or JSON) maps class names to a pretrained row number or to an
    ImageNet-1k name/synset. Returns the matches and the label set's size (None for
    row-number mappings, which fit any classifier).
    """
    if subset in LABEL_SETS:
        index, size = label_index(subset)
        rows = {i: index[_normalise(n)] for i, n in enumerate(class_names) if _normalise(n) in index}
        examples = ", ".join(f"'{d.split(',')[0]}'" for d in ImageNetInfo().label_descriptions()[:4])
        what = f"the {size} {subset} class names (e.g. {examples}; see timm.data.ImageNetInfo)"
    else:
        mapping = _read_mapping(subset)
        rows, size = _rows_from_mapping(class_names, mapping)
        what = f"the mapping file's keys ({', '.join(repr(k) for k in list(mapping)[:6])})"
    if not rows:
        shown = ", ".join(repr(n) for n in list(class_names)[:6])
        raise UserError(f"head.subset '{subset}': none of the class names {shown} is in {what}: rename the class "
                        "folders or give a mapping file head.subset=FILE.yaml with {{class: row or name}}")
    return rows, size


def _read_mapping(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"head.subset '{path}' is neither a label set ({', '.join(LABEL_SETS)}) nor a mapping file")
    try:  # data only, never objects; YAML without aliases, bounded (the file may be someone else's)
        data = read_json_data(file) if file.suffix == ".json" else read_yaml_data(file)
    except UserError as err:
        raise UserError(f"head.subset file: {message_of(err)}: write it as YAML or JSON mapping class names to "
                        "pretrained rows or names") from None
    if not isinstance(data, Mapping):
        raise UserError(f"head.subset file '{path}' must map class names to pretrained rows or names")
    return dict(data)


def _rows_from_mapping(class_names: Sequence[str], mapping: Mapping[str, Any]) -> tuple[dict[int, int], int | None]:
    by_name = {str(k): v for k, v in mapping.items()}
    rows: dict[int, int] = {}
    size = None
    for i, name in enumerate(class_names):
        target = by_name.get(name)
        if target is None:
            continue
        if isinstance(target, int):
            rows[i] = target
            continue
        index, size = label_index("imagenet")
        if _normalise(target) not in index:
            raise UserError(f"head.subset mapping: '{name}' -> '{target}' is not an ImageNet-1k class name or synset")
        rows[i] = index[_normalise(target)]
    return rows, size


def pretrained_head_tensors(report: LoadReport, keys: Sequence[str], *,
                            trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The source tensors meant for the model's ``keys`` (classifier tensors, which usually did
    not fit the new class count), read again from their file; keys without one are left out."""
    inverse = {full: src for src, full in report.remapped.items()} | dict(report.loaded)
    from_source = {h["key"] for h in report.head if h.get("source_shape")} | set(report.loaded)
    wanted = {k: inverse.get(k) for k in keys if k in from_source}
    found: dict[str, torch.Tensor] = {}
    for source in reversed(report.sources):  # later sources override earlier ones
        keys = {full: tag for full, tag in wanted.items() if full not in found
                and (tag is None or tag.startswith(f"[{source['index']}] "))}
        if not keys:
            continue
        tensors = read_checkpoint(source["path"], trust_pickle=trust_pickle).tensors
        select = f"{source['select']}." if source.get("select") else ""
        for full, tag in keys.items():
            key = select + (tag.split("] ", 1)[1] if tag else full)
            if key in tensors:
                found[full] = tensors[key]
    return found


def warm_start_subset(model: nn.Module, classifier: str, *, class_names: Sequence[str], subset: str,
                      report: LoadReport, trust_pickle: bool = False) -> dict[str, Any]:
    """Copy the pretrained classifier rows of the classes found in ``subset`` into the new head.

    Before any training the model then gives, for those classes, exactly the logits the
    pretrained model gave them. Returns what was warm-started (for ``load_report.json``).
    """
    layer = model.get_submodule(classifier)
    if not isinstance(layer, nn.Linear):
        raise UserError(f"head.subset needs head=linear (a single Linear classifier); '{classifier}' is "
                        f"{type(layer).__name__}")
    tensors = pretrained_head_tensors(report, [f"{classifier}.weight", f"{classifier}.bias"],
                                      trust_pickle=trust_pickle)
    weight, bias = tensors.get(f"{classifier}.weight"), tensors.get(f"{classifier}.bias")
    if weight is None or weight.shape[1:] != layer.weight.shape[1:]:
        raise UserError(f"head.subset '{subset}': the pretrained weights hold no classifier '{classifier}' with "
                        f"{layer.in_features} inputs to start from (load a checkpoint with its head)")
    rows, size = match_classes(class_names, subset)
    if size is not None and size != weight.shape[0]:
        raise UserError(f"head.subset '{subset}' has {size} classes but the pretrained classifier has "
                        f"{weight.shape[0]} rows: use a mapping file with row numbers")
    bad = {class_names[i]: r for i, r in rows.items() if not 0 <= r < weight.shape[0]}
    if bad:
        raise UserError(f"head.subset: rows {bad} are outside the pretrained classifier's {weight.shape[0]} rows")
    new, old = torch.tensor(list(rows)), torch.tensor(list(rows.values()))
    with torch.no_grad():
        layer.weight[new] = weight[old].to(layer.weight)
        if bias is not None and layer.bias is not None:
            layer.bias[new] = bias[old].to(layer.bias)
    return {"subset": subset, "warm_started": {class_names[i]: r for i, r in rows.items()},
            "not_found": [n for i, n in enumerate(class_names) if i not in rows]}
