"""The typed schema every composed config is validated against.

Hydra merges the YAML files in ``conf/`` onto these dataclasses (registered in
the ConfigStore as ``finetune_schema``), so a misspelled key or a value of the
wrong type stops the run during composition, naming the key, before any work.
``check_config`` adds the few rules a type cannot express (positive rates,
known choices) and raises one-line ``UserError``s.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from finetune.errors import UserError

# The configs ship inside the package (pyproject.toml maps the repository's conf/ to finetune.conf):
# Hydra reads them as pkg://finetune.conf; CONFIG_DIR is the same tree as a directory.
CONFIG_PACKAGE = "finetune.conf"
CONFIG_DIR = str(importlib.resources.files(CONFIG_PACKAGE))


@dataclass
class ModelConfig:
    name: str = "tf_efficientnet_lite0"  # timm or torchvision architecture name
    source: str = "timm"  # timm | torchvision
    pretrained: bool = False  # the library's own weights (needs its hub, or its cache)
    weights: Any = None  # null | PATH | builtin:NAME | list of {path, select, prefix, remap}
    remap: Any = "auto"  # auto | none | a preset name | rules (see docs/weights.md)
    input_size: int = 224  # the backbone's usual input size; data.img_size overrides it
    in_chans: int = 3  # input channels: 1 grey, 3 RGB, 4 RGBA (the first convolution is adapted)
    num_classes: Optional[int] = None  # default: the number of class folders
    trust_pickle: bool = False  # allow checkpoints that need arbitrary pickled globals
    allow_missing: list[str] = field(default_factory=list)  # regexes of tensors allowed to stay unloaded
    allow_mismatch: list[str] = field(default_factory=list)  # regexes of tensors allowed to change shape
    drop_path_rate: float = 0.0  # stochastic depth, for timm models that have it


@dataclass
class DemoConfig:
    num_classes: int = 6  # shape classes, 2 to 8
    train_per_class: int = 80  # training images per class
    val_per_class: int = 20  # validation images per class
    image_size: int = 128  # side of the square demo images, 32 to 512
    seed: int = 0  # the demo images are fixed by this, not by the run's seed


@dataclass
class TableColumnsConfig:
    """Column names of a label table (``data=table``)."""

    path: str = "path"
    label: Optional[str] = None  # null: label (task=multiclass) or labels (task=multilabel)
    split: Optional[str] = None  # null: a column named split when the table has one (train | val | test)


@dataclass
class DataConfig:
    name: str = "demo"  # demo | custom | table | webdataset | hf
    root: Optional[str] = None  # image folder: DIR/{train,val}/<class>/* or DIR/<class>/*
    file: Optional[str] = None  # data=table: a CSV, TSV, JSONL or Parquet table of paths and labels
    columns: TableColumnsConfig = field(default_factory=TableColumnsConfig)
    classes: Any = None  # table, webdataset: class names in label order, a list or a file with one a line (null: table: the sorted labels; shards: classes.txt beside the train shards)
    label_sep: str = ";"  # task=multilabel: what separates the classes in a labels cell
    allow_outside: bool = False  # data=table: allow image paths outside the table's folder tree
    folds: Optional[int] = None  # k-fold cross-validation: the number of folds (null: off)
    fold: Optional[int] = None  # the fold validated on, 0 .. folds-1
    train_urls: Any = None  # webdataset: train shards, a path, URL or brace pattern (DIR/train-{000000..000127}.tar), or a list
    val_urls: Any = None  # webdataset: val shards, as train_urls
    shuffle_buffer: Optional[int] = None  # webdataset, hf streaming: samples in the seeded shuffle buffer of each stream (1: shard order; null: 1000)
    path: Optional[str] = None  # hf: a save_to_disk dir, a Parquet/Arrow file or dir, or a dataset name in the local cache
    image_column: str = "image"  # hf: the column of images (an Image feature)
    label_column: str = "label"  # hf: the column of classes (ClassLabel, integers or strings)
    streaming: bool = False  # hf: read the Parquet files of data.path (a folder or URL) as they stream, exact epochs as for shards
    storage_options: dict[str, Any] = field(default_factory=dict)  # webdataset, hf streaming: fsspec options for URLs (endpoint, profile); secrets: ${oc.env:VAR}
    img_size: Optional[int] = None  # default: model.input_size
    batch_size: int = 32  # images per batch and process
    num_workers: Any = "auto"  # a count, or auto: this process's CPUs less one, at most 8 (0 with one CPU)
    val_split: float = 0.2  # used when root has no train/ and val/
    split_seed: int = 0  # the split stays fixed across runs with different seeds
    balance: str = "none"  # none | sampler | loss_weights
    skip_bad_images: bool = False  # leave unreadable images out (listed in the log) instead of stopping
    augment: str = "light"  # train augmentation preset: none | light | medium | heavy (the keys below override it)
    crop_scale: Optional[list[float]] = None  # train RandomResizedCrop area range; null: the preset's (light: 0.08-1)
    crop_ratio: Optional[list[float]] = None  # train RandomResizedCrop aspect range; null: the preset's (3/4-4/3)
    hflip: Optional[float] = None  # train horizontal-flip probability; null: the preset's (light: 0.5)
    color_jitter: Optional[float] = None  # train colour jitter strength; 0 = off; null: the preset's (light: 0.4)
    auto_augment: Optional[str] = None  # a timm auto-augment spec, e.g. rand-m9-mstd0.5, or none; null: the preset's
    random_erase: Optional[float] = None  # train random-erasing probability; null: the preset's (light: 0)
    mixup: float = 0.0  # Mixup's Beta alpha (timm Mixup, soft targets); 0 = off; e.g. 0.8
    cutmix: float = 0.0  # CutMix's Beta alpha; 0 = off; e.g. 1.0 (with mixup too, each batch picks one)
    mix_prob: float = 1.0  # the chance that a training batch is mixed
    mix_off_epoch: Optional[int] = None  # mix only the first N epochs (timm's mixup_off_epoch); null: every epoch
    cache_dir: str = "~/.cache/finetune"  # where data=demo writes its images once
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class TaskConfig:
    name: str = "multiclass"  # multiclass (softmax, cross-entropy) | multilabel (sigmoid, BCE-with-logits)
    loss: str = "ce"  # multiclass: ce; multilabel: bce | asl (timm's AsymmetricLossMultiLabel)
    asl_gamma_neg: float = 4.0  # task.loss=asl: focusing of negatives
    asl_gamma_pos: float = 1.0  # task.loss=asl: focusing of positives
    asl_clip: float = 0.05  # task.loss=asl: probability margin shifted off easy negatives


@dataclass
class HeadConfig:
    name: str = "linear"  # linear | mlp | features (no classifier: embeddings; Python use, not trainable)
    init: str = "trunc_normal"  # default (the library's) | zeros | trunc_normal (std 0.02), for a new head
    pool: Optional[str] = None  # null: the backbone's own pooling; avg | max | avgmax | catavgmax | token (timm)
    dropout: float = 0.0  # before the classifier (and after each hidden layer of an mlp head)
    hidden: list[int] = field(default_factory=list)  # mlp: hidden layer sizes
    activation: str = "relu"  # mlp: any timm activation name (relu, gelu, silu, ...)
    norm: Optional[str] = None  # mlp: null | batch | layer, after each hidden Linear
    subset: Optional[str] = None  # null | imagenet | MAPPING_FILE: start rows of known classes from the pretrained head


@dataclass
class AdapterConfig:
    """``adapter=lora``: peft's LoRA on the backbone's Linear layers (`finetune.adapters`)."""

    name: str = "none"  # none | lora (pip install 'finetune[lora]')
    r: int = 8  # lora: the rank of each low-rank update B @ A
    alpha: float = 16.0  # lora: the update is scaled by alpha / r
    dropout: float = 0.0  # lora: dropout on the input of the LoRA path (training only)
    targets: Optional[list[str]] = None  # lora: regexes searched in Linear layer names (not the head); null: per family


@dataclass
class FreezeConfig:
    name: str = "none"  # none | head_only | until | patterns
    bn: str = "eval"  # train | eval | frozen: BatchNorm of frozen parts (frozen: FrozenBatchNorm2d)
    until: Optional[str] = None  # until: the last frozen stage (stages are listed in the log and errors)
    include: list[str] = field(default_factory=list)  # patterns: regexes of parameter names to freeze
    exclude: list[str] = field(default_factory=list)  # patterns: regexes kept trainable among those
    schedule: dict[int, Any] = field(default_factory=dict)  # {EPOCH: stage | regex | all | [..]}: unfreeze then
    verify: bool = True  # check after every epoch that frozen tensors are bit-identical


@dataclass
class LRFindConfig:
    """The learning-rate range test that ``optim.lr=auto`` runs before training (``finetune.lr_find``)."""

    start_lr: float = 1e-7  # the range test's first rate
    end_lr: float = 10.0  # the range test's last rate (it stops earlier when the loss diverges)
    num_updates: Optional[int] = None  # null: about 100, fewer when the training set is smaller
    rule: str = "valley"  # how the rate is picked from the curve (finetune.lr_find)
    fallback_lr: float = 1e-3  # used, with a warning, when the curve gives no trustworthy rate
    select: str = "trials"  # trials: short fine-tunes of the curve's candidates decide | curve: the rule alone
    holdout: float = 0.2  # trials: share of each class of the training pool held out to judge them
    trial_updates: Optional[int] = None  # trials: updates per candidate in the first rung; null: 1/8 of the run's, >= 6
    freeze_candidates: list[str] = field(  # trials, freeze=none: also these, at 1x/3x/10x fallback_lr; [] = rates only
        default_factory=lambda: ["head_only"])
    final_share: float = 1.0  # trials: the finalists train this share of the run's updates; 0 = no final rung
    final_folds: Optional[int] = None  # trials: held-out slices judging the finalists; null: enough for 200 images


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm optimizer name: adamw, sgd, ...
    lr: Any = 1e-3  # a positive rate, or auto: an LR range test picks it before training
    weight_decay: float = 0.05  # decoupled for adamw; norm and bias parameters excluded unless decay_norm_and_bias
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam-family only
    decay_norm_and_bias: bool = False  # apply weight decay to norm layers and biases too
    head_lr: Optional[float] = None  # the head's rate; null = lr
    backbone_lr_mult: float = 1.0  # backbone rate = lr * backbone_lr_mult (x layer decay)
    layer_decay: Optional[float] = None  # e.g. 0.75: each layer down from the top learns this much slower
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)


@dataclass
class SchedConfig:
    name: str = "cosine"  # any timm scheduler: cosine, step, multistep, poly, tanh; or none
    warmup_epochs: float = 0.5  # linear warmup from warmup_lr, in epochs (fractions allowed)
    warmup_lr: float = 1e-5  # the rate warmup starts from
    min_lr: float = 1e-6  # the cosine floor
    decay_epochs: float = 30.0  # step schedules
    decay_rate: float = 0.1  # step schedules


@dataclass
class CheckpointConfig:
    monitor: str = "val/acc1"  # the metric that picks best (and drives early stopping): val/acc1, val/loss, ...
    mode: Optional[str] = None  # max | min; inferred from the metric name when null
    save_best: bool = True  # best.<ext> whenever the monitored metric improves
    save_last: bool = True  # last.<ext> and last.ckpt (the training state resume needs)
    save_top_k: int = 0  # also keep the k best epochs as epochEEE-<metric>-<value>.<ext>; 0 = off
    every_n_epochs: int = 1  # save last.* at the end of every N-th epoch (the final epoch always)
    every_n_steps: Optional[int] = None  # also save last.ckpt every N optimizer updates, mid-epoch
    keep_last_k: Optional[int] = 1  # earlier training states kept as epochEEE-stepSSSSSS.ckpt; null = all
    weights_format: str = "safetensors"  # safetensors (.safetensors) | torch (.pt, a torch.save dict)
    min_delta: float = 0.0  # "better" means by more than this, for best, top-k and early stopping alike
    mirror: Optional[str] = None  # a storage URL (s3://bucket/runs/NAME): every save uploaded there too; null = off
    storage_options: dict[str, Any] = field(default_factory=dict)  # the mirror's fsspec options; secrets: ${oc.env:VAR}
    mirror_flush_timeout: float = 300.0  # seconds the end of a run (or a stop) waits for pending uploads


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None  # epochs without a better checkpoint.monitor before stopping; null = off


@dataclass
class TrainerConfig:
    max_epochs: int = 6  # epochs to train (a resume may raise it)
    precision: str = "32"  # 32 | bf16 | 16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | per_job (GPU = sweep job number modulo the GPUs)
    accumulate: int = 1  # batches per optimizer update
    grad_clip: Optional[float] = None  # max global grad norm
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    ema: bool = False  # an exponential moving average of the weights (timm's ModelEmaV3); weights files hold it
    ema_decay: float = 0.998  # the EMA's decay per update
    channels_last: bool = False  # channels-last memory format (faster convolutions on recent GPUs)
    grad_checkpointing: bool = False  # recompute activations in the backward (timm's set_grad_checkpointing): less memory
    sync_bn: bool = False  # under DDP: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA)
    compile: bool = False  # torch.compile the model's forward (in place: its state_dict keys stay its own)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    deterministic: bool = True  # deterministic kernels where torch has them


@dataclass
class TensorBoardSettings:
    """``logger=tensorboard``: event files in ``RUN_DIR/tb`` (nothing to set)."""


@dataclass
class CsvSettings:
    """``logger=csv``: ``RUN_DIR/metrics.csv``, one row per logged step (nothing to set)."""


@dataclass
class MlflowSettings:
    """``logger=mlflow`` (``pip install 'finetune[mlflow]'``, `finetune.trackers.mlflow_tracker`)."""

    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else MLflow's default in the working dir (3.x: sqlite ./mlflow.db; 2.x: ./mlruns); or http://HOST:PORT
    experiment_name: str = "finetune"  # created when missing
    run_name: Optional[str] = None  # null: the run dir's name (a sweep's job: its number)
    log_weights: bool = True  # upload best.<ext> as an artifact (false: only the small files)
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags


@dataclass
class WandbSettings:
    """``logger=wandb`` (``pip install 'finetune[wandb]'``, `finetune.trackers.wandb_tracker`)."""

    project: str = "finetune"  # the W&B project
    entity: Optional[str] = None  # null: the API key's default entity
    mode: Optional[str] = None  # online | offline | disabled; null: $WANDB_MODE, else online
    run_name: Optional[str] = None  # null: the run dir's name
    log_weights: bool = True  # best.<ext> as a model artifact
    tags: list[str] = field(default_factory=list)  # run tags


@dataclass
class LoggerConfig:
    """The trackers: ``logger=[tensorboard,csv,mlflow]`` selects several (each option sets its own section;
    a section that is null is a tracker not in use)."""

    log_every_n_steps: int = 1  # per-step scalars every N optimizer updates
    progress_bar: bool = True  # a tqdm bar per epoch
    tensorboard: Optional[TensorBoardSettings] = None  # logger=tensorboard: event files in RUN_DIR/tb
    csv: Optional[CsvSettings] = None  # logger=csv: RUN_DIR/metrics.csv, one row per logged step
    mlflow: Optional[MlflowSettings] = None  # logger=mlflow: one MLflow run (below)
    wandb: Optional[WandbSettings] = None  # logger=wandb: one W&B run (below)


@dataclass
class SweepConfig:
    """Set by a sweeper for the job it launches (not by hand): the Optuna trial this run reports to."""

    study: Optional[str] = None  # the study's name
    storage: Optional[str] = None  # its storage URL (sqlite:///SWEEP_DIR/optuna.db)
    trial: Optional[int] = None  # the trial number; null: not part of a study


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0  # seeds python, numpy, torch and the data order
    resume: Optional[str] = None  # null | auto | RUN_DIR | FILE.ckpt | URL (a checkpoint.mirror)
    resume_allow_config_change: bool = False  # resume even if overrides change the experiment
    resume_allow_unverified: bool = False  # resume from a state that loads but does not match manifest.json
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_schema() -> None:
    """Put the schema into Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""
    ConfigStore.instance().store(name="finetune_schema", node=Config)


def choices() -> dict[str, tuple]:
    """The allowed values of string keys a type cannot restrict: data, not an if-ladder.

    Each table is the one the code that uses the value looks it up in; imported here, not at the
    top, so composing a config (``--cfg job``, ``--help``) does not import torch.
    """
    from finetune.adapters import ADAPTERS
    from finetune.checkpoint import WEIGHTS_EXTENSIONS
    from finetune.data import AUGMENT_PRESETS, BALANCE_CHOICES
    from finetune.freezing import BN_MODES, FREEZE_MODES
    from finetune.heads import HEAD_INITS, NORMS
    from finetune.models import HEADS, SOURCES
    from finetune.optim import SCHEDULERS
    from finetune.runtime import AUTOCAST_DTYPES, COMPILE_MODES

    return {
        "model.source": SOURCES,
        "data.name": ("demo", "custom", "table", "webdataset", "hf"),
        "task.name": tuple(TASK_LOSSES),
        "data.balance": BALANCE_CHOICES,
        "data.augment": tuple(AUGMENT_PRESETS),
        "head.name": HEADS,
        "head.pool": (None, "", "avg", "max", "avgmax", "catavgmax", "token", "avg_token", "map"),  # timm's
        "head.norm": tuple(NORMS),
        "head.init": HEAD_INITS,
        "adapter.name": ADAPTERS,
        "freeze.name": tuple(FREEZE_MODES),
        "freeze.bn": BN_MODES,
        "sched.name": SCHEDULERS,
        "trainer.precision": tuple(AUTOCAST_DTYPES),
        "trainer.compile_mode": COMPILE_MODES,
        "checkpoint.mode": (None, "max", "min"),
        "checkpoint.weights_format": tuple(WEIGHTS_EXTENSIONS),
        "logger.wandb.mode": (None, "online", "offline", "disabled"),
    }

TASK_LOSSES = {"multiclass": ("ce",), "multilabel": ("bce", "asl")}  # task.name -> the losses it takes
# What each task's evaluation reports (finetune.metrics): what checkpoint.monitor may name besides train/loss.
TASK_METRICS = {"multiclass": ("val/acc1", "val/acc5", "val/loss"),
                "multilabel": ("val/mAP", "val/f1", "val/exact_match", "val/loss")}

POSITIVE = ("data.batch_size", "trainer.max_epochs", "trainer.accumulate",
            "model.in_chans", "logger.log_every_n_steps")


def check_config(cfg: DictConfig) -> None:
    """Raise a one-line UserError for values the schema's types cannot rule out, for keys the schema
    does not have (``+lr=0.01``), and for typed overrides the composed config ignores."""
    check_known_keys(cfg)
    check_overrides_take_effect(cfg, typed_overrides())
    for key, allowed in choices().items():
        value = _get(cfg, key)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise UserError(f"{key} must be one of {shown}; got '{value}'")
    _check_lr(cfg.optim)
    for key in POSITIVE:
        value = _get(cfg, key)
        if not value > 0:
            raise UserError(f"{key} must be positive, got '{value}'")
    for key in ("optim.weight_decay", "trainer.label_smoothing"):
        if _get(cfg, key) < 0:
            raise UserError(f"{key} must not be negative, got '{_get(cfg, key)}'")
    workers = cfg.data.num_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UserError(f"data.num_workers must be a non-negative integer or auto, got '{workers}'")
    for key in ("data.hflip", "data.random_erase"):
        if _get(cfg, key) is not None and not 0.0 <= _get(cfg, key) <= 1.0:
            raise UserError(f"{key} must be a probability between 0 and 1 (or null: the preset's), got '{_get(cfg, key)}'")
    _check_mixing(cfg)
    for key in ("data.crop_scale", "data.crop_ratio"):
        value = _get(cfg, key)
        if value is not None and not (len(value) == 2 and 0 < value[0] <= value[1]):
            raise UserError(f"{key} must be [low, high] with 0 < low <= high (or null: the preset's), got '{list(value)}'")
    if not 0.0 < cfg.data.val_split < 1.0:
        raise UserError(f"data.val_split must be between 0 and 1, got '{cfg.data.val_split}'")
    if cfg.trainer.grad_clip is not None and not cfg.trainer.grad_clip > 0:
        raise UserError(f"trainer.grad_clip must be positive or null, got '{cfg.trainer.grad_clip}'")
    if cfg.optim.layer_decay is not None and not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise UserError(f"optim.layer_decay must be in (0, 1] or null, got '{cfg.optim.layer_decay}'")
    if cfg.optim.head_lr is not None and not cfg.optim.head_lr > 0:
        raise UserError(f"optim.head_lr must be positive or null, got '{cfg.optim.head_lr}'")
    if not cfg.optim.backbone_lr_mult >= 0:
        raise UserError(f"optim.backbone_lr_mult must not be negative, got '{cfg.optim.backbone_lr_mult}'")
    _check_checkpoint(cfg.checkpoint)
    _check_storage_options("data.storage_options", cfg.data.storage_options)
    _check_adapter(cfg)
    _check_task(cfg)
    if cfg.model.num_classes is not None and cfg.model.num_classes < 2:
        raise UserError(f"model.num_classes must be at least 2 (or null to take it from the data), "
                        f"got '{cfg.model.num_classes}'")


def _check_mixing(cfg: DictConfig) -> None:
    d = cfg.data
    for key in ("mixup", "cutmix"):
        if not d[key] >= 0:
            raise UserError(f"data.{key} must be 0 (off) or a positive Beta alpha, got '{d[key]}'")
    if not 0.0 <= d.mix_prob <= 1.0:
        raise UserError(f"data.mix_prob must be a probability between 0 and 1, got '{d.mix_prob}'")
    if (d.mixup or d.cutmix) and d.balance == "loss_weights":
        raise UserError("data.mixup/data.cutmix train on soft targets, which data.balance=loss_weights cannot weigh: "
                        "use data.balance=sampler")


LR_SELECT = ("trials", "curve")  # how optim.lr=auto picks: finetune.lr_find.trials, or the curve's rule alone
FREEZE_CANDIDATES = ("head_only",)  # freeze options the trials may choose (optim.lr_find.freeze_candidates)


def _check_lr(o: DictConfig) -> None:
    if o.lr == "auto":
        if o.head_lr is not None:
            raise UserError(f"optim.head_lr '{o.head_lr}' needs a numeric optim.lr to set the head's ratio; with "
                            "optim.lr=auto leave it null (the finder keeps backbone_lr_mult and layer_decay ratios)")
        for key in ("start_lr", "end_lr", "fallback_lr"):
            if not o.lr_find[key] > 0:
                raise UserError(f"optim.lr_find.{key} must be positive, got '{o.lr_find[key]}'")
        if o.lr_find.select not in LR_SELECT:
            raise UserError(f"optim.lr_find.select must be one of {', '.join(LR_SELECT)}; got '{o.lr_find.select}'")
        if not 0.0 < o.lr_find.holdout < 1.0:
            raise UserError(f"optim.lr_find.holdout must be between 0 and 1, got '{o.lr_find.holdout}'")
        if not 0.0 <= o.lr_find.final_share <= 1.0:
            raise UserError(f"optim.lr_find.final_share must be between 0 and 1 (0: no final rung), got "
                            f"'{o.lr_find.final_share}'")
        from finetune.lr_find.trials import max_folds

        folds = o.lr_find.final_folds
        if folds is not None and not 1 <= folds <= max_folds(o.lr_find.holdout):
            raise UserError(f"optim.lr_find.final_folds must be null or a whole number from 1 to "
                            f"{max_folds(o.lr_find.holdout)} (the disjoint slices of optim.lr_find.holdout="
                            f"{o.lr_find.holdout} that fit in the training pool), got '{folds}'")
        if o.lr_find.trial_updates is not None and not o.lr_find.trial_updates > 0:
            raise UserError(f"optim.lr_find.trial_updates must be positive or null, got '{o.lr_find.trial_updates}'")
        if not o.lr_find.start_lr < o.lr_find.end_lr:
            raise UserError(f"optim.lr_find.start_lr '{o.lr_find.start_lr}' must be below end_lr '{o.lr_find.end_lr}'")
        for name in o.lr_find.freeze_candidates:
            if name not in FREEZE_CANDIDATES:
                raise UserError(f"optim.lr_find.freeze_candidates: '{name}' is not a freeze option the trials can try: "
                                f"use {', '.join(FREEZE_CANDIDATES)}, or [] for the rate alone")
        return
    if isinstance(o.lr, bool) or not isinstance(o.lr, (int, float)):
        raise UserError(f"optim.lr must be a positive number or auto, got '{o.lr}'")
    if not o.lr > 0:
        raise UserError(f"optim.lr must be positive, got '{float(o.lr)}'")


def _check_task(cfg: DictConfig) -> None:
    """What multi-label training cannot do, refused before any work (one line each)."""
    from finetune.data.splits import check_folds

    check_folds(cfg.data.folds, cfg.data.fold)
    task, loss = cfg.task.name, cfg.task.loss
    if loss not in TASK_LOSSES[task]:
        raise UserError(f"task.loss '{loss}' is not a loss of task={task}: use one of {', '.join(TASK_LOSSES[task])}")
    monitor = cfg.checkpoint.monitor
    if monitor.startswith("val/") and monitor not in TASK_METRICS[task]:
        raise UserError(f"checkpoint.monitor '{monitor}' is not a metric of task={task}: monitor one of "
                        f"{', '.join(TASK_METRICS[task])} or train/loss")
    if task != "multilabel":
        return
    if cfg.data.name != "table":
        source = {"webdataset": "shards", "hf": "a dataset's label column"}.get(cfg.data.name, "class folders")
        raise UserError(f"task=multilabel needs several labels per image, which {source} (data={cfg.data.name}) "
                        "cannot express yet: give a table with data=table data.file=labels.csv (a labels column, "
                        "classes joined by ';')")
    refusals = {
        cfg.model.num_classes is not None: f"model.num_classes={cfg.model.num_classes} adds spare outputs, which "
                                           "label sets cannot address: leave it null with task=multilabel",
        cfg.head.subset is not None: f"head.subset '{cfg.head.subset}' warm-starts softmax rows of a pretrained "
                                     "classifier, which has no meaning for sigmoid outputs: drop head.subset",
        cfg.data.balance == "sampler": "data.balance=sampler draws images by their one class; with several labels "
                                       "per image use data.balance=loss_weights (BCE's pos_weight from label "
                                       "frequencies)",
        loss == "asl" and cfg.data.balance == "loss_weights": "data.balance=loss_weights sets BCE's pos_weight; "
                                                              "task.loss=asl balances by its own focusing "
                                                              "(task.asl_gamma_neg): drop one of them",
        loss == "asl" and cfg.trainer.label_smoothing > 0: f"trainer.label_smoothing={cfg.trainer.label_smoothing} "
                                                           "with task.loss=asl: its asymmetric focusing is defined "
                                                           "for 0/1 targets: set trainer.label_smoothing=0 (BCE "
                                                           "smooths targets to y(1-e)+e/2)",
        bool(cfg.data.get("mixup") or cfg.data.get("cutmix")): f"data.mixup/data.cutmix ({cfg.data.get('mixup')}/"
                                                               f"{cfg.data.get('cutmix')}) mix one-hot class targets "
                                                               "and are not built for task=multilabel yet: set "
                                                               "data.mixup=0 data.cutmix=0",
    }
    for refused, message in refusals.items():
        if refused:
            raise UserError(message)


def _check_adapter(cfg: DictConfig) -> None:
    """LoRA's numbers in range, and what makes no sense with it refused (one line each)."""
    a = cfg.adapter
    if a.name == "none":
        return
    if not a.r > 0:
        raise UserError(f"adapter.r must be a positive rank, got '{a.r}'")
    if not a.alpha > 0:
        raise UserError(f"adapter.alpha must be positive (the update is scaled by alpha / r), got '{a.alpha}'")
    if not 0.0 <= a.dropout < 1.0:
        raise UserError(f"adapter.dropout must be in [0, 1), got '{a.dropout}'")
    if a.targets is not None and not len(a.targets):
        raise UserError("adapter.targets is an empty list: give regexes of Linear layer names, or null for the "
                        "model family's default")
    if cfg.freeze.name == "head_only":
        raise UserError("freeze=head_only with adapter=lora freezes every LoRA weight and trains the head alone: "
                        "drop adapter=lora, or use freeze=none (LoRA already freezes the backbone's own weights)")


def _check_checkpoint(c: DictConfig) -> None:
    if not c.every_n_epochs > 0:
        raise UserError(f"checkpoint.every_n_epochs must be positive, got '{c.every_n_epochs}'")
    if c.every_n_steps is not None and not c.every_n_steps > 0:
        raise UserError(f"checkpoint.every_n_steps must be positive or null, got '{c.every_n_steps}'")
    for key in ("save_top_k", "keep_last_k", "min_delta"):
        if c[key] is not None and c[key] < 0:
            raise UserError(f"checkpoint.{key} must not be negative, got '{c[key]}'")
    if c.mirror is not None and "://" not in c.mirror:
        raise UserError(f"checkpoint.mirror '{c.mirror}' is not a storage URL: give one such as s3://bucket/runs/NAME "
                        "(file:///PATH for a shared disk), or null")
    if not c.mirror_flush_timeout >= 0:
        raise UserError(f"checkpoint.mirror_flush_timeout must not be negative, got '{c.mirror_flush_timeout}'")
    _check_storage_options("checkpoint.storage_options", c.storage_options)


def _check_storage_options(key: str, options: DictConfig) -> None:
    for name, value in OmegaConf.to_container(options, resolve=False).items():
        if refusal := literal_secret(f"{key}.{name}", value):
            raise UserError(refusal)


SECRET_NAME = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def literal_secret(key: str, value: Any) -> str | None:
    """The refusal of a credential written out in ``checkpoint.storage_options`` or ``data.storage_options`` (it
    would be saved in ``.hydra/``); None when ``value`` is no secret or comes from the environment (``${oc.env:VAR}``).

    >>> literal_secret("checkpoint.storage_options.secret", "${oc.env:S3_SECRET}") is None
    True
    """
    if ".storage_options." not in key or not SECRET_NAME.search(key.rsplit(".", 1)[-1]):
        return None
    if isinstance(value, str) and value.startswith("${") or value is None:
        return None
    return (f"{key} is written out: it would be saved in .hydra/, the checkpoints and the trackers; give it from "
            f"the environment: +{key}='${{oc.env:VAR}}', or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")


def _get(cfg: DictConfig, dotted: str) -> Any:
    """The value at ``dotted``; None below a section that is null (a tracker not in use)."""
    node: Any = cfg
    for part in dotted.split("."):
        if node is None:
            return None
        node = node[part]
    return node


def split_override(override: str) -> tuple[str, str]:
    """A command-line override as (key, value): ``+data.root=DIR`` -> ``("data.root", "DIR")``."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def typed_overrides() -> list[str]:
    """The overrides of this job as typed (Hydra's task overrides); none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_a_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# ------------------------------------------------------------ keys that exist, and keys that take effect
def schema_keys() -> dict[str, bool]:
    """Every dotted key of the schema, each mapped to whether any key below it is valid too (a field
    typed ``Any`` or ``dict``: ``model.weights``, ``freeze.schedule``, ...).

    >>> keys = schema_keys()
    >>> keys["trainer.max_epochs"], keys["freeze.schedule"], "lr" in keys
    (False, True, False)
    """
    return dict(_schema_keys())


@functools.cache
def _schema_keys() -> dict[str, bool]:
    """schema_keys, walked once: the walk resolves every annotation (seconds), and a config check asks
    for each key of the config."""
    out: dict[str, bool] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            nested = _section_type(hints[f.name])
            if nested is not None:
                out[key] = False
                walk(nested, f"{key}.")
            else:
                out[key] = f.type in ("Any",) or str(f.type).startswith(("dict", "Dict"))

    walk(Config, "")
    return out


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``Optional[X]`` too: a tracker's section), or None for a value."""
    if get_origin(hint) is Union:
        hint = next((arg for arg in get_args(hint) if arg is not type(None)), None)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def closest_keys(key: str, *, n: int = 3) -> list[str]:
    """The schema keys a mistyped ``key`` most likely meant: the same last part first (``lr`` ->
    ``optim.lr``), then the closest spellings.

    >>> closest_keys("lr")[0], closest_keys("trainer.max_epoch")[0], closest_keys("epochs")[0]
    ('optim.lr', 'trainer.max_epochs', 'trainer.max_epochs')
    """
    every = list(schema_keys())
    keys = [k for k in every if not any(other.startswith(f"{k}.") for other in every)]  # settings, not sections
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    tiers = ([k for k in keys if k.rsplit(".", 1)[-1] == leaf],  # the surest first: a tier that finds any wins
             difflib.get_close_matches(key, keys, n=n, cutoff=0.85),
             [by_leaf[x] for x in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75)],
             difflib.get_close_matches(key, keys, n=n, cutoff=0.6))
    return next((tier[:n] for tier in tiers if tier), [])


def unknown_key_message(key: str, *, given: str) -> str:
    """One line for a key the schema does not have, with the keys it most likely meant."""
    close = closest_keys(key)
    hint = f"did you mean {' or '.join(close)}?" if close else "python -m finetune --cfg job lists every key"
    return f"'{given}' sets '{key}', which is not a config key: {hint}"


def is_known_key(key: str) -> bool:
    """Whether ``key`` (dotted) is a schema key, or lies below one that takes any keys."""
    keys = schema_keys()
    parts = key.split(".")
    return key in keys or any(keys.get(".".join(parts[:i])) for i in range(1, len(parts)))


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a composed config holding a key the schema does not have (``+lr=0.01``, an experiment
    file's typo): it would sit in the config doing nothing."""
    def walk(node: Any, prefix: str) -> None:
        for key in node.keys() if isinstance(node, DictConfig) else ():
            dotted = f"{prefix}{key}"
            if not is_known_key(dotted):
                raise UserError(unknown_key_message(dotted, given=dotted) + " (remove it: it would have no effect)")
            if not schema_keys().get(dotted, True):
                walk(node._get_node(key), f"{dotted}.")

    walk(cfg, "")


@dataclasses.dataclass(frozen=True)
class NoEffect:
    """Keys that do nothing while ``when`` has a value ``applies`` accepts (data, not an if-ladder)."""

    when: str
    applies: Callable[[Any], bool]
    keys: tuple[str, ...]
    fix: str


def _takes_momentum(name: str) -> bool:
    from finetune.optim import takes_momentum

    return takes_momentum(name)


def _takes_betas(name: str) -> bool:
    from finetune.optim import takes_betas

    return takes_betas(name)


TABLE_KEYS = ("data.file", "data.columns", "data.classes", "data.allow_outside")
HF_KEYS = ("data.path", "data.image_column", "data.label_column", "data.streaming")
NO_EFFECT = (
    NoEffect("data.name", lambda v: v == "demo", ("data.root", "data.val_split", "data.split_seed"),
             "data=demo trains on the built-in demo set: add data=custom to train on your own folder"),
    NoEffect("data.name", lambda v: v in ("custom", "table", "webdataset", "hf"), ("data.demo", "data.cache_dir"),
             "they configure the built-in demo set, which data=custom, data=table, data=webdataset and data=hf do "
             "not use"),
    NoEffect("data.name", lambda v: v not in ("table", "webdataset"), ("data.classes",),
             "it names the classes of a label table or of shards: add data=table or data=webdataset"),
    NoEffect("data.name", lambda v: v != "table", tuple(k for k in TABLE_KEYS if k != "data.classes"),
             "they describe a label table: add data=table (data.file=labels.csv)"),
    NoEffect("data.name", lambda v: v == "table", ("data.root",),
             "data=table reads the images data.file names (paths relative to its folder): drop data.root"),
    NoEffect("data.name", lambda v: v != "webdataset", ("data.train_urls", "data.val_urls"),
             "they configure WebDataset shards: add data=webdataset"),
    NoEffect("data.name", lambda v: v not in ("webdataset", "hf"), ("data.shuffle_buffer", "data.storage_options"),
             "they configure a stream: add data=webdataset, or data=hf data.streaming=true"),
    NoEffect("data.name", lambda v: v == "webdataset", ("data.root", "data.val_split", "data.split_seed",
                                                         "data.skip_bad_images", "data.folds", "data.fold"),
             "data=webdataset reads the shards of data.train_urls and data.val_urls, split as they were written"),
    NoEffect("data.name", lambda v: v != "hf", HF_KEYS, "they configure a Hugging Face dataset: add data=hf"),
    NoEffect("data.streaming", lambda v: v is True, ("data.val_split", "data.split_seed", "data.folds", "data.fold"),
             "a stream is read as its splits are stored (train-*.parquet, validation-*.parquet)"),
    NoEffect("data.name", lambda v: v == "hf", ("data.root", "data.skip_bad_images"),
             "data=hf reads the dataset at data.path (an unreadable image stops training naming its split and row)"),
    NoEffect("task.name", lambda v: v != "multilabel", ("data.label_sep",),
             "it separates the classes of a labels cell: add task=multilabel"),
    NoEffect("task.loss", lambda v: v != "asl", ("task.asl_gamma_neg", "task.asl_gamma_pos", "task.asl_clip"),
             "they shape the asymmetric loss: add task=multilabel task.loss=asl"),
    NoEffect("head.name", lambda v: v != "mlp", ("head.hidden", "head.activation", "head.norm"),
             "they shape an MLP head: add head=mlp"),
    NoEffect("freeze.name", lambda v: v != "until", ("freeze.until",), "add freeze=until"),
    NoEffect("freeze.name", lambda v: v != "patterns", ("freeze.include", "freeze.exclude"), "add freeze=patterns"),
    NoEffect("optim.name", lambda v: not _takes_momentum(str(v)), ("optim.momentum",),
             "only SGD-style optimizers take it: add optim=sgd"),
    NoEffect("optim.name", lambda v: not _takes_betas(str(v)), ("optim.betas",),
             "only Adam-style optimizers (and LAMB) take it: add optim=adamw"),
    NoEffect("optim.lr", lambda v: v != "auto", ("optim.lr_find",), "the range test runs with optim.lr=auto"),
    NoEffect("optim.lr_find.select", lambda v: v == "curve", ("optim.lr_find.holdout", "optim.lr_find.trial_updates",
                                                               "optim.lr_find.freeze_candidates",
                                                               "optim.lr_find.final_share",
                                                               "optim.lr_find.final_folds"),
             "only optim.lr_find.select=trials runs trials"),
    NoEffect("optim.lr_find.final_share", lambda v: v == 0, ("optim.lr_find.final_folds",),
             "it sets the held-out slices of the final rung, which final_share=0 drops: leave it unset"),
    NoEffect("sched.name", lambda v: v not in ("step", "multistep"), ("sched.decay_epochs", "sched.decay_rate"),
             "only step schedules decay by epochs: add sched=step"),
    NoEffect("sched.name", lambda v: v == "none", ("sched.warmup_epochs", "sched.warmup_lr", "sched.min_lr"),
             "sched=none keeps the rate constant: add sched=cosine"),
    NoEffect("adapter.name", lambda v: v == "none", ("adapter.r", "adapter.alpha", "adapter.dropout",
                                                      "adapter.targets"), "they configure LoRA: add adapter=lora"),
    NoEffect("trainer.ema", lambda v: not v, ("trainer.ema_decay",), "add trainer.ema=true"),
    NoEffect("trainer.compile", lambda v: not v, ("trainer.compile_mode",), "add trainer.compile=true"),
)


def check_overrides_take_effect(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse an override the composed config ignores (``data.root=DIR`` with the demo data set): a run
    that trains on something other than what was typed must not pass silently."""
    for override in overrides:
        key = split_override(override)[0]
        for rule in NO_EFFECT:
            hit = next((k for k in rule.keys if key == k or key.startswith(f"{k}.")), None)
            if hit is None or not rule.applies(OmegaConf.select(cfg, rule.when)):
                continue
            value = OmegaConf.select(cfg, rule.when)
            raise UserError(f"{key} is set but has no effect with {rule.when}={_shown(value)}: {rule.fix}")


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ------------------------------------------------------------ the config reference (docs/config.md)
def reference_markdown() -> str:
    """``docs/config.md``: every key of the schema with its type, its default in the composed default
    config (``python -m finetune``), and the comment beside its field in this file; then each group's
    options. Generated, so it cannot drift: ``python scripts/config_reference.py`` rewrites the file and
    tests/test_config.py compares them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        defaults = compose(config_name="config")
    GlobalHydra.instance().clear()
    comments = _field_comments()
    lines = ["# Configuration reference", "",
             "Generated from the schema in `finetune/config.py` by `python scripts/config_reference.py`; do not "
             "edit by hand. Defaults are those of `python -m finetune` with no overrides (the `demo` data, the "
             "`efficientnet_lite0` model); choosing another option of a group (`data=custom`) changes them.", ""]
    for section, fields in _sections(Config, ""):
        lines += [f"## `{section}`" if section else "## top level", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for key, f in fields:
            default = OmegaConf.select(defaults, key, default=None)
            if OmegaConf.select(defaults, key.rpartition(".")[0], default=None) is None:  # a tracker not selected
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
            lines.append(f"| `{key}` | {_type_name(f.type)} | `{_yaml_value(shown)}` | {comments.get(key, '')} |")
        lines.append("")
    lines += ["## Options of each group", "", "| group | options |", "|---|---|"]
    root = Path(CONFIG_DIR)
    for group in sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))
                        and d.name != "hydra"):
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        lines.append(f"| `{group}` | {', '.join(f'`{o}`' for o in options)} |")
    return "\n".join(lines) + "\n"


def _sections(cls: type, prefix: str) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The schema's dataclasses as (section, [(dotted key, field)]), depth first, fields in order."""
    own, nested = [], []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _section_type(hints[f.name])
        if section is not None and dataclasses.fields(section):
            nested += _sections(section, f"{prefix}{f.name}.")
        else:
            own.append((f"{prefix}{f.name}", f))
    return ([(prefix.rstrip("."), own)] if own else []) + nested


def _field_comments() -> dict[str, str]:
    """The ``# comment`` beside each schema field, by dotted key (read from this file's source)."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    by_line = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    out: dict[str, str] = {}

    def walk(name: str, prefix: str) -> None:
        for stmt in classes[name].body:
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            key = f"{prefix}{stmt.target.id}"
            nested = _nested_class(stmt) or _optional_class(stmt)
            if nested in classes:
                walk(nested, f"{key}.")
            if stmt.lineno in by_line:
                out[key] = by_line[stmt.lineno].replace("|", "\\|")

    walk("Config", "")
    return out


def _optional_class(stmt: Any) -> str | None:
    """``Optional[X] = None`` -> ``X`` (a tracker's section)."""
    import ast

    ann = stmt.annotation
    if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Optional":
        return ann.slice.id if isinstance(ann.slice, ast.Name) else None
    return None


def _nested_class(stmt: Any) -> str | None:
    """``field(default_factory=X)`` -> ``X``."""
    import ast

    call = stmt.value
    if isinstance(call, ast.Call):
        for kw in call.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Name):
                return kw.value.id
    return None


def _type_name(annotation: Any) -> str:
    """``Optional[int]`` -> ``int or null`` (the schema's annotations are strings here)."""
    text = str(annotation)
    if text.startswith("Optional[") and text.endswith("]"):
        return f"{text[len('Optional['):-1]} or null"
    return text


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
