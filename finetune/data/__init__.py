"""Data: the demo set, image folders, transforms, reproducible sampling and loaders.

Flow: `ensure_demo_dataset` (demo only) -> `scan_image_folder` (or `scan_table` for a label table)
-> `build_transforms`
-> `build_loaders`. The demo set is an ordinary image folder, read by the same code.
Speed (issue 15, docs/benchmarks.md): JPEGs decoded at a reduced size where the transform
allows it (`Preprocess`, `load_transformed`), 8-bit batches normalised after collation
(`NormalizingLoader`), ``num_workers="auto"`` (`auto_num_workers`).
"""

from finetune.data.dataset import (ImageDataset, convert_to_channels, convert_to_rgb, load_image, load_rgb,
                                   load_transformed)
from finetune.data.demo import SHAPES, ensure_demo_dataset
from finetune.data.folder import IMAGE_EXTENSIONS, DataSplit, find_unreadable_images, scan_image_folder
from finetune.data.loaders import (BALANCE_CHOICES, Loaders, NormalizingLoader, auto_num_workers, build_loaders,
                                   compute_class_weights, resolve_num_workers, worker_context)
from finetune.data.sampling import EpochSampler
from finetune.data.stream import ShardSplit, build_stream_loaders
from finetune.data.table import TableColumns, given_classes, read_table, scan_table
from finetune.data.transforms import (AUGMENT_PRESETS, Preprocess, augment_settings, build_transforms,
                                      effective_data_config)

__all__ = [
    "BALANCE_CHOICES",
    "IMAGE_EXTENSIONS",
    "SHAPES",
    "TableColumns",
    "DataSplit",
    "EpochSampler",
    "ImageDataset",
    "Loaders",
    "NormalizingLoader",
    "Preprocess",
    "ShardSplit",
    "auto_num_workers",
    "build_loaders",
    "build_stream_loaders",
    "build_transforms",
    "AUGMENT_PRESETS",
    "augment_settings",
    "compute_class_weights",
    "convert_to_channels",
    "convert_to_rgb",
    "effective_data_config",
    "ensure_demo_dataset",
    "find_unreadable_images",
    "load_image",
    "load_rgb",
    "load_transformed",
    "given_classes",
    "read_table",
    "resolve_num_workers",
    "worker_context",
    "scan_image_folder",
    "scan_table",
]
