"""``adapter=lora``: peft's LoRA beside the backbone's Linear layers, merged back into plain weights for files.

Training keeps the adapter apart: each targeted ``nn.Linear`` becomes peft's ``lora.Linear`` (the original
weight under ``<layer>.base_layer``, frozen; ``lora_A``/``lora_B`` beside it, trained), so the model's
``state_dict()``, and with it the training state ``last.ckpt``, holds base and adapter separately and a resume
is exact. Weights files (``best``/``last.safetensors``) hold `merged_copy`: every adapter folded into its
layer by peft's own merge (``W + alpha / r * B @ A``) and the layer put back as the plain ``nn.Linear``, so they
load in plain timm, `finetune.load_model`, export and serving with no peft installed. `adapter_state` is the
adapter alone, as ``python -m finetune.ckpt adapter`` writes it for sharing.

peft is imported here only, and only when ``adapter=lora`` asks for it (`import_peft`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.errors import UserError
from finetune.weights.remap import is_under

log = logging.getLogger("finetune")

ADAPTERS = ("none", "lora")  # adapter.name
ADAPTER_NAME = "default"  # peft's name of the one adapter a run trains
ADAPTER_FORMAT = "finetune.adapter/1"
# adapter.targets by model family (a timm class in the model's MRO): regexes searched in Linear layer names.
DEFAULT_TARGETS = {
    "VisionTransformer": ("qkv|proj|fc1|fc2",),  # attention in and out, the MLP (patch_embed.proj is a conv)
    "ConvNeXt": ("fc1|fc2",),  # the pointwise convolutions, Linear layers in timm
}


def import_peft() -> Any:
    """peft, or one line saying how to install it (it is an extra: the core install has no peft)."""
    try:
        import peft
    except ImportError:
        raise UserError("adapter=lora needs the peft package, which is not installed: "
                        "pip install 'finetune[lora]'") from None
    return peft


def default_targets(model: nn.Module, *, name: str) -> tuple[str, ...]:
    """The family's ``adapter.targets`` (`DEFAULT_TARGETS`); one line naming the model where it has none."""
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_TARGETS and cls.__module__.startswith("timm."):
            return DEFAULT_TARGETS[cls.__name__]
    raise UserError(f"adapter=lora has no default adapter.targets for '{name}' (defaults: timm ViTs and ConvNeXts): "
                    f"set adapter.targets=[REGEX,...] searched in the names of its Linear layers")


def target_layers(model: nn.Module, *, head: str, patterns: Sequence[str], name: str) -> list[str]:
    r"""The Linear layers outside the head whose names one of ``patterns`` is found in; never empty.

    >>> import timm
    >>> target_layers(timm.create_model("test_vit"), head="head", patterns=[r"blocks\.[45]\..*fc2", "head"],
    ...               name="test_vit")
    ['blocks.4.mlp.fc2', 'blocks.5.mlp.fc2']
    """
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise UserError(f"adapter.targets '{pattern}' is not a valid regular expression ({err})") from None
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and not is_under(n, head)]
    chosen = [n for n in linear if any(p.search(n) for p in compiled)]
    if not chosen:
        shown = ", ".join(linear[:8]) + (", ..." if len(linear) > 8 else "")
        raise UserError(f"adapter.targets {list(patterns)} match no Linear layer of '{name}' outside its head; its "
                        f"Linear layers are: {shown or 'none'}")
    return chosen


@dataclass(frozen=True)
class LoraAdapter:
    """The adapter a run trains: where it sits and its peft settings (`add_lora` makes it)."""

    layers: tuple[str, ...]
    r: int
    alpha: float
    dropout: float

    def peft_config(self) -> Any:
        """peft's ``LoraConfig`` of this adapter (its layers named in full, so nothing else matches)."""
        peft = import_peft()
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.layers), bias="none")

    def merged(self, model: nn.Module) -> nn.Module:
        """What a weights file holds of ``model`` (the run's model or its EMA): `merged_copy`."""
        return merged_copy(model)

    def metadata(self) -> dict[str, str]:
        """What ``adapter.safetensors`` records besides its tensors: enough to put it back with peft."""
        return {"format": ADAPTER_FORMAT, "r": str(self.r), "alpha": json.dumps(self.alpha),
                "dropout": json.dumps(self.dropout), "target_modules": json.dumps(list(self.layers))}


def add_lora(model: nn.Module, *, head: str, r: int, alpha: float, dropout: float,
             targets: Sequence[str] | None, name: str) -> LoraAdapter:
    """Put peft's LoRA beside the chosen Linear layers of ``model`` (in place; before the optimizer exists).

    peft freezes every parameter but the adapter's; the head is then made trainable again: a new head always
    trains in full. Returns the adapter, which the weights files merge (`merged_copy`).
    """
    peft = import_peft()
    layers = target_layers(model, head=head, patterns=targets or default_targets(model, name=name), name=name)
    adapter = LoraAdapter(tuple(layers), r=int(r), alpha=float(alpha), dropout=float(dropout))
    peft.inject_adapter_in_model(adapter.peft_config(), model, adapter_name=ADAPTER_NAME)
    for param_name, param in model.named_parameters():
        if is_under(param_name, head):
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(f"adapter=lora: rank {r} beside {len(layers)} Linear layers; {trainable:,} of {total:,} parameters "
             f"train ({trainable / total:.2%}, the head included)")
    return adapter


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each LoRA layer merged by peft (``W + scaling * B @ A``) and replaced by its base
    layer: the plain model's modules and ``state_dict()`` keys, loadable with no peft. ``model`` is unchanged
    (merging in place and unmerging later would not give back the same bits, and a resume must)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER_NAME])
            parent, _, leaf = name.rpartition(".")
            setattr(merged.get_submodule(parent), leaf, module.get_base_layer())
    return merged


def adapter_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a training state's model, named as peft's ``get_peft_model_state_dict`` names
    them (the adapter's name dropped: ``blocks.0.attn.qkv.lora_A.weight``); one line when there is none."""
    marker = f".{ADAPTER_NAME}."
    out = {k.replace(marker, ".", 1): v for k, v in model_state.items() if ".lora_" in k and marker in k}
    if not out:
        raise UserError("this training state holds no LoRA adapter (its run had adapter=none): "
                        "only a run with adapter=lora has one to write")
    return out


def adapter_from_config(config_yaml: str, model_state: Mapping[str, torch.Tensor]) -> LoraAdapter:
    """The adapter a training state trained: its settings from the saved config, its layers from its tensors."""
    import yaml

    settings = (yaml.safe_load(config_yaml) or {}).get("adapter") or {}
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    layers = tuple(k[:-len(suffix)] for k in model_state if k.endswith(suffix))
    if settings.get("name") != "lora" or not layers:
        raise UserError("this training state holds no LoRA adapter (its run had adapter=none): "
                        "only a run with adapter=lora has one to write")
    return LoraAdapter(layers, r=int(settings["r"]), alpha=float(settings["alpha"]),
                       dropout=float(settings["dropout"]))
