"""Pretrained weights from anywhere: read any checkpoint safely, remap, load, report.

>>> from finetune.weights import read_state_dict, load_pretrained, LoadReport
>>> # report = load_pretrained(timm.create_model("tf_efficientnet_lite0", num_classes=5),
>>> #                          "builtin:efficientnet_lite0")
"""

from finetune.weights.formats import Checkpoint, read_checkpoint, read_state_dict
from finetune.weights.load import load_pretrained
from finetune.weights.presets import PRESETS, Preset
from finetune.weights.remap import remap_keys
from finetune.weights.report import LoadError, LoadReport
from finetune.weights.sources import BUILTIN_SOURCES, BuiltinSource, SourceSpec

__all__ = [
    "BUILTIN_SOURCES",
    "PRESETS",
    "BuiltinSource",
    "Checkpoint",
    "LoadError",
    "LoadReport",
    "Preset",
    "SourceSpec",
    "load_pretrained",
    "read_checkpoint",
    "read_state_dict",
    "remap_keys",
]
