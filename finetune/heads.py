"""The new classifier: how it starts."""

from __future__ import annotations

import torch
from torch import nn

HEAD_STD = 0.02


def init_head(model: nn.Module, classifier: str, mode: str) -> None:
    """(Re)initialise the classifier layer at ``classifier``.

    ``default`` keeps the library's initialisation; ``zeros`` starts from all-zero
    logits; ``trunc_normal`` draws weights with std 0.02 and zero bias, which keeps
    the first logits small whatever the class count (timm's EfficientNet init
    scales with 1/num_classes and gives large logits for a handful of classes).
    """
    if mode == "default":
        return
    layer = model.get_submodule(classifier)
    with torch.no_grad():
        if mode == "zeros":
            layer.weight.zero_()
        else:
            nn.init.trunc_normal_(layer.weight, std=HEAD_STD, a=-2 * HEAD_STD, b=2 * HEAD_STD)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()
