"""Config -> parts. The only code besides ``run`` that reads the config.

Each builder takes the config node it needs and returns a ready part; what is below them
(models, data, weights, freezing, optim, trainer, checkpoint) takes named arguments only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from finetune import data as data_lib
from finetune.checkpoint import (CheckpointManager, CheckpointPolicy, FileWriter, ModelDescription, NoWriter, RunFacts,
                                 TrainingParts)
from finetune.checkpoint.mirror import Mirror, is_url
from finetune.config import CONFIG_DIR, FreezeConfig, in_a_sweep, split_override
from finetune.data import shards as shards_lib
from finetune.data.stream import ShardSplit
from finetune.distributed import SINGLE, World
from finetune.errors import UserError
from finetune.files import atomic_write_text
from finetune.freezing import FreezeController, apply_freeze, plan_freeze
from finetune.heads import init_head, warm_start_subset
from finetune.loggers import LogEvents, Loggers, MetricsJsonl
from finetune.mixing import BatchMixer
from finetune.models import BackboneSpec, build_model, locate_library_weights
from finetune.optim import build_optimizer, build_param_groups, build_scheduler
from finetune.resume import ResumePlan
from finetune.runtime import Runtime, package_versions
from finetune.signals import StopRequest, shield_workers, stop_workers
from finetune.trackers import TrackerContext, build_trackers, without_passwords
from finetune.trainer import Trainer, TrainerHook
from finetune.weights import load_pretrained

log = logging.getLogger("finetune")


@dataclass
class RunHooks:
    """The trainer's hooks by role. The trainer calls them in this order at every event: the logs of
    an epoch are written before its checkpoint, a sweep's trial hears of an epoch once it is saved
    (a pruned trial keeps its checkpoint), and a freezing schedule changes what trains last."""

    log: LogEvents | None  # the trackers (rank 0)
    metrics: MetricsJsonl  # metrics.jsonl (rank 0); every process keeps the last record
    checkpoint: CheckpointManager
    trial: TrainerHook | None = None  # a sweep's Optuna trial (finetune.optuna_trial.TrialReporter)
    freeze: FreezeController | None = None

    def ordered(self) -> list[TrainerHook]:
        return [h for h in (self.log, self.metrics, self.checkpoint, self.trial, self.freeze) if h is not None]


@dataclass
class RunParts:
    """The built run: the loop, what it trains, its hooks by role, and the trackers (None off rank 0)."""

    trainer: Trainer
    training: TrainingParts
    hooks: RunHooks
    logger: Loggers | None


# ---------------------------------------------------------------- data
def build_split(cfg: DictConfig, *, run_dir: Path, write: bool = True,
                multilabel: bool = False) -> data_lib.DataSplit | ShardSplit:
    """Find the images (generating the demo set once if asked; reading ``data.file`` for a label table), or
    the shards of ``data=webdataset``, and record the split in the run dir (``write``: this process writes
    the run's files; under DDP rank 0 alone). ``data.folds``/``data.fold``: fold ``fold`` is val, the
    others train."""
    folds, fold = cfg.get("folds"), cfg.get("fold")
    if cfg.name == "webdataset":
        split = build_shard_split(cfg)
    elif cfg.name == "table":
        split = _scan_table(cfg, multilabel=multilabel, folds=folds, fold=fold)
    elif cfg.name == "hf":
        split = _scan_hf(cfg, folds=folds, fold=fold)
    else:
        split = data_lib.scan_image_folder(image_root(cfg), val_split=cfg.val_split, seed=cfg.split_seed,
                                           skip_bad_images=cfg.skip_bad_images, folds=folds, fold=fold)
    if write:
        atomic_write_text(run_dir / "split.json", json.dumps(split.to_record(), indent=1) + "\n", root=run_dir)
    return split


def image_root(cfg: DictConfig) -> str | Path:
    """The image folder of ``data=demo`` (generated once) or ``data=custom``."""
    if cfg.name == "demo":
        demo = cfg.demo
        return data_lib.ensure_demo_dataset(cfg.cache_dir, seed=demo.seed, num_classes=demo.num_classes,
                                            train_per_class=demo.train_per_class,
                                            val_per_class=demo.val_per_class, image_size=demo.image_size)
    if cfg.root is None:
        raise UserError("data=custom needs data.root=DIR: an image folder with DIR/<class>/<image> "
                        "or DIR/train/<class>/<image> and DIR/val/<class>/<image>")
    return cfg.root


def storage_options(section: DictConfig) -> dict[str, Any]:
    """``section.storage_options`` as fsspec takes it: plain dicts, ``${oc.env:VAR}`` resolved (never saved so)."""
    return OmegaConf.to_container(section.storage_options, resolve=True)


def build_shard_split(cfg: DictConfig) -> ShardSplit:
    """``data=webdataset``: the train and val shards with their counts (index.json), and the class names."""
    if cfg.train_urls is None or cfg.val_urls is None:
        raise UserError("data=webdataset needs data.train_urls and data.val_urls (paths, URLs or brace patterns): "
                        "write shards with python -m finetune.shard SRC OUT")
    urls = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else str(v)
            for k, v in (("train", cfg.train_urls), ("val", cfg.val_urls))}
    options = storage_options(cfg)
    train, val = shards_lib.list_shards(urls["train"], options), shards_lib.list_shards(urls["val"], options)
    first = train[0].url
    beside = first.rsplit("/", 1)[0] if "/" in first else "."
    classes = data_lib.given_classes(cfg.classes) if cfg.classes else shards_lib.read_classes(beside, options)
    return ShardSplit(train, val, classes, root=str(urls["train"]))


def _scan_table(cfg: DictConfig, *, multilabel: bool, folds: int | None, fold: int | None) -> data_lib.DataSplit:
    if cfg.file is None:
        raise UserError("data=table needs data.file=TABLE: a CSV, TSV, JSONL or Parquet file with the columns "
                        "path and label (or labels, with task=multilabel)")
    columns = data_lib.TableColumns(path=cfg.columns.path, label=cfg.columns.label, split=cfg.columns.split)
    return data_lib.scan_table(cfg.file, columns=columns, multilabel=multilabel, label_sep=cfg.label_sep,
                               classes=cfg.classes, allow_outside=cfg.allow_outside, val_split=cfg.val_split,
                               seed=cfg.split_seed, folds=folds, fold=fold, skip_bad_images=cfg.skip_bad_images)


def _scan_hf(cfg: DictConfig, *, folds: int | None, fold: int | None) -> data_lib.DataSplit | ShardSplit:
    """``data=hf``: a Hugging Face dataset on disk or in the local cache (`finetune.data.hf`), map-style; with
    ``data.streaming=true``, its Parquet files read as shards (`finetune.data.hf_stream`), local or by URL."""
    if cfg.path is None:
        raise UserError("data=hf needs data.path: the directory save_to_disk wrote, a Parquet or Arrow file, or the "
                        "name of a dataset in the local Hugging Face cache")
    if cfg.streaming:
        from finetune.data.hf_stream import scan_hf_stream

        return scan_hf_stream(str(cfg.path), image_column=cfg.image_column, label_column=cfg.label_column,
                              storage_options=storage_options(cfg))
    for key, unused in (("shuffle_buffer", cfg.shuffle_buffer is not None), ("storage_options", cfg.storage_options)):
        if unused:
            raise UserError(f"data.{key} is set but has no effect with data.streaming=false (a dataset on disk is "
                            "read whole, shuffled each epoch): drop it, or add data.streaming=true")
    from finetune.data.hf import scan_hf

    return scan_hf(str(cfg.path), image_column=cfg.image_column, label_column=cfg.label_column,
                   val_split=cfg.val_split, seed=cfg.split_seed, folds=folds, fold=fold)


def build_data_config(cfg: DictConfig, spec: BackboneSpec) -> dict[str, Any]:
    """The preprocessing of this run: the backbone's data config at ``data.img_size``."""
    return data_lib.effective_data_config(spec.data_config, cfg.img_size)


def build_loaders(cfg: DictConfig, split: data_lib.DataSplit | ShardSplit, data_config: dict[str, Any], *, seed: int,
                  device: torch.device, world: World = SINGLE) -> data_lib.Loaders:
    """This process's loaders: ``data.batch_size`` images per batch and process, its shard under DDP;
    on CUDA, batches pinned and normalised on ``device``."""
    augment = data_lib.augment_settings(cfg.augment, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip,
                                        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
                                        re_prob=cfg.random_erase)
    transforms = {"train_transform": data_lib.build_transforms(data_config, img_size=cfg.img_size, train=True, **augment),
                  "eval_transform": data_lib.build_transforms(data_config, img_size=cfg.img_size, train=False)}
    common = {"batch_size": cfg.batch_size, "seed": seed, "pin_memory": device.type == "cuda", "device": device,
              "channels": data_config["input_size"][0], "rank": world.rank, "world_size": world.size}
    if isinstance(split, ShardSplit):
        loaders = build_stream_loaders(cfg, split, **transforms, **common)
    else:
        loaders = data_lib.build_loaders(split, **transforms, **common, num_workers=cfg.num_workers,
                                         balance=cfg.balance)
    for loader in (loaders.train, loaders.val):  # a stop signal to the process group leaves workers alone
        shield_workers(loader)
    return loaders


STREAM_BUFFER = 1000  # data.shuffle_buffer=null: the sample buffer of each stream


def build_stream_loaders(cfg: DictConfig, split: ShardSplit, **options: Any) -> data_lib.Loaders:
    """``data=webdataset``'s (and ``data=hf data.streaming=true``'s) loaders (`finetune.data.stream`): exact
    epochs from the shards' counts."""
    if cfg.balance != "none":
        raise UserError(f"data.balance={cfg.balance} draws samples by their labels, which a stream read in shard "
                        f"order cannot: leave data.balance=none with data={cfg.name}")
    buffer = STREAM_BUFFER if cfg.shuffle_buffer is None else cfg.shuffle_buffer
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise UserError(f"data.shuffle_buffer must be a positive number of samples, got '{buffer}'")
    return data_lib.build_stream_loaders(split, num_workers=data_lib.resolve_num_workers(cfg.num_workers),
                                         buffer=buffer, storage_options=storage_options(cfg),
                                         context=data_lib.worker_context(), **options)


# --------------------------------------------------------------- model
def build_classifier(cfg: DictConfig, *, head: DictConfig, num_classes: int) -> tuple[nn.Module, BackboneSpec]:
    """The backbone with the configured head for ``num_classes`` (``model.num_classes`` may add spare rows)."""
    if cfg.num_classes is not None and cfg.num_classes < num_classes:
        raise UserError(f"model.num_classes '{cfg.num_classes}' is smaller than the {num_classes} class folders "
                        "in the data: raise it, or leave it null to take the count from the data")
    if head.name == "features":
        raise UserError("head=features builds an embedding model without a classifier, which cannot be trained "
                        "here: use head=linear or head=mlp (build_model(head='features') gives the embeddings)")
    return build_model(name=cfg.name, source=cfg.source, num_classes=cfg.num_classes or num_classes,
                       in_chans=cfg.in_chans, input_size=cfg.input_size, pool=head.pool, dropout=head.dropout,
                       drop_path_rate=cfg.drop_path_rate, head=head.name, hidden=list(head.hidden),
                       activation=head.activation, norm=head.norm)


def set_grad_checkpointing(cfg: DictConfig, model: nn.Module, spec: BackboneSpec) -> None:
    """``trainer.grad_checkpointing``: timm's ``set_grad_checkpointing`` (its blocks' activations recomputed in the
    backward, non-reentrant: frozen layers are fine); refused in one line by a model that cannot."""
    if not cfg.grad_checkpointing:
        return
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise UserError(f"trainer.grad_checkpointing=true needs a timm model; {spec.source}'s '{spec.name}' has no "
                        "set_grad_checkpointing: use a timm model or leave it false")
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as err:  # timm's way of saying a model cannot
        raise UserError(f"trainer.grad_checkpointing=true: timm's '{spec.name}' does not support it ({err}); "
                        "leave it false") from None
    log.info(f"trainer.grad_checkpointing: {spec.name}'s blocks recompute their activations in the backward")


def build_adapter(cfg: DictConfig, model: nn.Module, spec: BackboneSpec) -> Any:
    """``adapter=lora``: peft's LoRA put into ``model`` (after the pretrained load, which sees the plain model;
    before freezing and the optimizer); the `finetune.adapters.LoraAdapter`, or None for ``adapter=none``."""
    a = cfg.adapter
    if a.name == "none":
        return None
    from finetune.adapters import add_lora

    targets = list(a.targets) if a.targets is not None else None
    return add_lora(model, head=spec.classifier, r=a.r, alpha=a.alpha, dropout=a.dropout, targets=targets,
                    name=spec.name)


def init_weights(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *, head: DictConfig,
                 class_names: list[str], run_dir: Path, write: bool = True) -> dict[str, Any]:
    """Initialise from ``model.weights`` or the library's own weights; write ``load_report.json``.

    A classifier the weights did not provide (new class count, or no weights) starts as ``head.init``
    says; with ``head.subset``, rows of known classes start from the pretrained classifier.
    """
    source = OmegaConf.to_container(cfg.weights) if OmegaConf.is_config(cfg.weights) else cfg.weights
    if source is None and cfg.pretrained:
        source = str(locate_library_weights(cfg.name, cfg.source))
    if source is None:
        report = {"source": None, "note": "random initialisation: model.pretrained=false and model.weights=null"}
        log.warning("no pretrained weights: training from random initialisation")
    else:
        loaded = load_pretrained(model, source, remap=cfg.remap, allow_missing=tuple(cfg.allow_missing),
                                 allow_mismatch=tuple(cfg.allow_mismatch), trust_pickle=cfg.trust_pickle,
                                 classifier=spec.classifier, first_conv=spec.first_conv, in_chans=spec.in_chans)
        log.info("pretrained weights:\n" + loaded.format_table())
        report = loaded.to_dict()
    if source is None or report["head"]:
        init_head(model, spec.classifier, head.init)
    if head.subset is not None:
        if source is None:
            raise UserError(f"head.subset '{head.subset}' starts the head from pretrained rows, but no weights are "
                            "loaded: set model.weights or model.pretrained=true")
        warm = warm_start_subset(model, spec.classifier, class_names=class_names, subset=head.subset,
                                 report=loaded, trust_pickle=cfg.trust_pickle)
        log.info(f"head.subset: {len(warm['warm_started'])} classes warm-started from pretrained rows "
                 f"{warm['warm_started']}; new: {warm['not_found']}")
        report["subset"] = warm
    if write:
        atomic_write_text(run_dir / "load_report.json", json.dumps(report, indent=1) + "\n", root=run_dir)
    return report


def prepare_for_ddp(cfg: DictConfig, model: nn.Module, *, rt: Runtime) -> nn.Module:
    """``trainer.sync_bn``: BatchNorm layers that normalise over the global batch (before the optimizer
    exists; the layers keep their parameter tensors). Checked here: it needs CUDA and several processes."""
    if not cfg.trainer.sync_bn:
        return model
    if not rt.world.distributed:
        log.warning("trainer.sync_bn=true has no effect in a single process (start several with torchrun)")
        return model
    if rt.device.type != "cuda":
        raise UserError(f"trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm), but this run is on "
                        f"'{rt.device}': drop trainer.sync_bn or train on GPUs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ------------------------------------------------------------ training
def build_freeze(cfg: DictConfig, model: nn.Module, spec: BackboneSpec) -> FreezeController | None:
    """Freeze as ``freeze.*`` says (before the optimizer exists); the controller that unfreezes on
    ``freeze.schedule`` and verifies frozen tensors each epoch, or None when nothing is frozen.
    With ``adapter=lora`` the plan acts on what LoRA trains (its adapters and the head): the weights peft
    froze stay frozen whatever the schedule thaws."""
    f = cfg.freeze
    schedule = {int(k): (list(v) if OmegaConf.is_list(v) else v) for k, v in f.schedule.items()}
    plan = plan_freeze(model, mode=f.name, head=spec.classifier, until=f.until, include=list(f.include),
                       exclude=list(f.exclude), schedule=schedule, max_epochs=cfg.trainer.max_epochs)
    if cfg.adapter.name != "none":
        plan = plan.within({n for n, p in model.named_parameters() if p.requires_grad}, owner="adapter=lora")
    frozen = apply_freeze(model, plan, bn=f.bn)
    if frozen:
        log.info(f"frozen: {len(frozen)} parameter tensors (freeze={f.name})")
    if f.name == "none" and not f.schedule:
        return None
    return FreezeController(model, plan, bn=f.bn, verify=f.verify)


def updates_per_epoch(cfg: DictConfig, loaders: data_lib.Loaders) -> int:
    # Ceiling division: the trainer also updates on an epoch's last, partial accumulation window.
    return -(-len(loaders.train) // cfg.trainer.accumulate)


def build_optimization(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *, lr: float,
                       updates_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over stable named groups (all parameters, frozen ones too) at the peak rate ``lr``,
    then the per-update scheduler."""
    optimizer = build_optimizer_at(cfg, model, spec, lr=lr)
    s = cfg.sched
    scheduler = build_scheduler(optimizer, name=s.name, epochs=cfg.trainer.max_epochs,
                                updates_per_epoch=updates_per_epoch, warmup_epochs=s.warmup_epochs,
                                warmup_lr=s.warmup_lr, min_lr=s.min_lr, decay_epochs=s.decay_epochs,
                                decay_rate=s.decay_rate)
    return optimizer, scheduler


def build_optimizer_at(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *, lr: float) -> torch.optim.Optimizer:
    """``optim.*``'s optimizer and groups (each with its ``lr_scale``: head, backbone multiplier, layer decay)."""
    o = cfg.optim
    head_lr_scale = o.head_lr / lr if o.head_lr is not None else 1.0
    groups = build_param_groups(model, head=spec.classifier, weight_decay=o.weight_decay,
                                decay_norm_and_bias=o.decay_norm_and_bias, head_lr_scale=head_lr_scale,
                                backbone_lr_mult=o.backbone_lr_mult, layer_decay=o.layer_decay)
    return build_optimizer(groups, name=o.name, lr=lr, momentum=o.momentum, betas=o.betas)


def choose_lr(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *, loaders: data_lib.Loaders, rt: Runtime,
              split: data_lib.DataSplit | None = None, data_config: dict[str, Any] | None = None,
              saved: dict[str, Any] | None = None) -> tuple[float, dict[str, Any] | None]:
    """The peak learning rate, and the record of how ``optim.lr=auto`` chose it (None for a given rate).

    A resumed run takes the rate its training state recorded (``saved``): it never searches again. Otherwise the
    range test runs on the model exactly as it will train (``finetune.lr_find``); with
    ``optim.lr_find.select=trials`` (and the ``split`` to hold a slice out of) short trial fine-tunes of the
    curve's candidates then decide (`choose_by_trials`). Everything either changed is put back before the real
    optimizer exists.
    """
    o = cfg.optim
    if o.lr != "auto":
        return float(o.lr), None
    if rt.world.distributed:  # each process searches on its own shard, every process trains at rank 0's choice
        return rt.world.agree(choose_lr(cfg, model, spec, loaders=loaders, rt=replace(rt, world=SINGLE), split=split,
                                        data_config=data_config, saved=saved))
    if saved is not None:
        log.info(f"optim.lr=auto: the choice made before, {chosen_text(saved)}, from the training state "
                 "(no new search)")
        return float(saved["lr"]), saved
    from finetune import lr_find

    def trainer_for(optimizer: torch.optim.Optimizer) -> Trainer:  # the real loop's step: precision, clipping
        parts = TrainingParts(model, optimizer, grad_scaler=build_grad_scaler(rt))
        return build_trainer(cfg, parts, loaders=loaders, rt=rt, num_classes=spec.num_classes, hooks=[])

    result = lr_find.search(model, optimizer=build_optimizer_at(cfg, model, spec, lr=o.lr_find.start_lr),
                            trainer=trainer_for, loader=loaders.train, accumulate=cfg.trainer.accumulate,
                            start_lr=o.lr_find.start_lr, end_lr=o.lr_find.end_lr,
                            num_updates=o.lr_find.num_updates, rule=o.lr_find.rule)
    record = {"lr": result.chosen, "selected_by": "curve", "choice": result.reason, **result.to_dict()}
    if o.lr_find.select == "trials" and split is not None:
        record = choose_by_trials(cfg, model, spec, result, record, split=split, data_config=data_config, rt=rt,
                                  run_updates=updates_per_epoch(cfg, loaders) * cfg.trainer.max_epochs)
    if record["lr"] is None:
        record |= {"lr": float(o.lr_find.fallback_lr), "selected_by": "fallback",
                   "choice": f"optim.lr_find.fallback_lr: {result.reason}"}
        log.warning(f"optim.lr=auto: {result.reason}; training with optim.lr_find.fallback_lr={record['lr']:.4g}")
    elif result.chosen is None:
        log.warning(f"optim.lr=auto: {result.reason}; the trials chose {chosen_text(record)} of "
                    f"optim.lr_find.fallback_lr={o.lr_find.fallback_lr:.4g} and its multiples")
    else:
        log.info(f"optim.lr=auto: chose {chosen_text(record)} ({record['choice']})")
    return float(record["lr"]), record


def chosen_text(record: dict[str, Any]) -> str:
    """``optim.lr=auto``'s choice in a few words: the rate, and the freezing when the trials chose one."""
    return f"{record['lr']:.4g}" + (f" with freeze={record['freeze']}" if record.get("freeze") else "")


def choose_by_trials(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, find: Any, record: dict[str, Any], *,
                     split: data_lib.DataSplit, data_config: dict[str, Any], rt: Runtime,
                     run_updates: int) -> dict[str, Any]:
    """``record`` with the rate (and, with `freeze_candidates`, the freezing) that won short trial fine-tunes
    (`finetune.lr_find.trials`): the candidates the curve gives, each trained on the training pool less a held-out
    slice and judged by its loss there."""
    from finetune import lr_find

    o = cfg.optim.lr_find
    rates, freezes = lr_find.candidate_rates(find, fallback=o.fallback_lr), freeze_candidates(cfg)
    frozen_rates = lr_find.frozen_candidate_rates(fallback=o.fallback_lr)
    candidates = rates if not freezes else [(rate, cfg.freeze.name) for rate in rates] + [
        (rate, name) for name in freezes for rate in frozen_rates]
    rest, held = lr_find.holdout_split(split.train, fraction=o.holdout, seed=cfg.seed)
    if not held or len(candidates) < 2:
        why = "no class has 2 training images to hold one out" if not held else "a single candidate rate"
        log.warning(f"optim.lr=auto: no trials ({why}); the range test's choice stands")
        return record | {"trials": {"skipped": why}}
    first = lr_find.first_rung_updates(run_updates, o.trial_updates)
    final = lr_find.final_rung_updates(run_updates, o.final_share)
    usual = [lr_find.nearest(candidates[:len(rates)], o.fallback_lr, rate_of=lambda c: c[0] if freezes else c)] + [
        (frozen_rates[0], name) for name in freezes]  # each freeze option at the usual rate (1x fallback_lr)
    folds = lr_find.fold_count(len(held), fraction=o.holdout, configured=o.final_folds) if final is not None else 1
    further = lr_find.further_folds(split.train, held, fraction=o.holdout, seed=cfg.seed, folds=folds)
    held_out = partial(_held_out_loaders, cfg, split, data_config=data_config, rt=rt)
    started = time.perf_counter()
    with held_out(rest, held) as trial:
        rungs = lr_find.run_trials(model, candidates=candidates, trainer=trial_trainer(cfg, model, spec, trial, rt=rt),
                                   loader=trial.train, holdout=trial.val, first_updates=first, final_updates=final,
                                   usual=usual, monitor=cfg.checkpoint.monitor, accumulate=cfg.trainer.accumulate,
                                   folds=[partial(_pair, held_out, *pair) for pair in further])
    won, total = rungs[-1]["kept"][0], sum(r["updates"] * len(r["scores"]) * r.get("folds", 1) for r in rungs)
    tried = ", ".join(f"{r:.2g}" for r in rates) + "".join(
        f"; freeze={name} at {', '.join(f'{r:.2g}' for r in frozen_rates)}" for name in freezes)
    judged_images = len(held) + sum(len(h) for _, h in further)
    choice = _trials_choice(rungs, cfg.checkpoint.monitor, tried=tried, candidates=len(candidates), updates=total,
                            seconds=time.perf_counter() - started, held=len(held), slices=1 + len(further),
                            judged_images=judged_images)
    trials = {"candidates": [list(c) if freezes else c for c in candidates], "holdout_images": len(held),
              "final_folds": 1 + len(further) if rungs[-1].get("final") else 0,
              "final_images": judged_images if rungs[-1].get("final") else 0,
              "train_images": len(rest), "updates": total, "seconds": round(time.perf_counter() - started, 2),
              "rungs": rungs}
    chosen = {"lr": won[0], "freeze": won[1]} if freezes else {"lr": won}
    return record | chosen | {"selected_by": "trials", "choice": choice, "trials": trials}


@contextmanager
def _held_out_loaders(cfg: DictConfig, split: data_lib.DataSplit, rest: list, held: list, *,
                      data_config: dict[str, Any], rt: Runtime) -> Iterator[data_lib.Loaders]:
    """The run's loaders over ``rest`` (training) and ``held`` (judging) of the training pool, workers stopped
    after."""
    loaders = build_loaders(cfg.data, replace(split, train=rest, val=held), data_config, seed=cfg.seed,
                            device=rt.device)
    try:
        yield loaders
    finally:
        for loader in (loaders.train, loaders.val):
            stop_workers(loader)


@contextmanager
def _pair(open_loaders: Callable[[list, list], AbstractContextManager[data_lib.Loaders]], rest: list,
          held: list) -> Iterator[tuple[Any, Any]]:
    """``(train, val)`` of a further held-out slice's loaders, as `lr_find.run_trials` opens one (anew each time)."""
    with open_loaders(rest, held) as opened:
        yield opened.train, opened.val


def _trials_choice(rungs: list[dict[str, Any]], monitor: str, *, tried: str, candidates: int, updates: int,
                   seconds: float, held: int, slices: int, judged_images: int) -> str:
    """The trials' choice in one line: what was tried, how long, judged by what and on how many images."""
    final = rungs[-1].get("final")
    how = (f"won trial fine-tunes of {candidates} candidates ({tried}), the finalists as long as the run" if final
           else f"won short trial fine-tunes of {candidates} candidates ({tried}")
    judged = f"the short ones by the loss, the finalists by {monitor}" if "values" in rungs[-1] else "the loss"
    several = (f"; the finalists on {slices} disjoint held-out slices, {judged_images} images in all"
               if slices > 1 and final else "")
    return (f"{how}; {updates} updates, {seconds:.0f} s) judged by {judged} on {held} held-out training "
            f"images{several}")


def freeze_candidates(cfg: DictConfig) -> list[str]:
    """The freeze options the trials try besides the configured one (``optim.lr_find.freeze_candidates``): only
    for a run that freezes nothing, on no schedule, without an adapter (whose own freezing it would undo)."""
    f = cfg.freeze
    if f.name != "none" or f.schedule or cfg.adapter.name != "none":
        return []
    return list(cfg.optim.lr_find.freeze_candidates)


def freeze_option(name: str) -> DictConfig:
    """``freeze=NAME`` exactly as the command line gives it: the schema's defaults under ``conf/freeze/NAME.yaml``."""
    option = OmegaConf.load(Path(CONFIG_DIR) / "freeze" / f"{name}.yaml")
    return OmegaConf.merge(OmegaConf.structured(FreezeConfig), option)


def with_chosen_freeze(cfg: DictConfig, record: dict[str, Any] | None) -> DictConfig:
    """``cfg`` with the freezing ``optim.lr=auto`` chose (``record["freeze"]``) in place of ``freeze=none``: the
    run then freezes and trains as if ``freeze=NAME`` had been given by hand. ``cfg`` itself when it chose none."""
    name = (record or {}).get("freeze")
    if name is None or name == cfg.freeze.name:
        return cfg
    chosen = cfg.copy()
    chosen.freeze = freeze_option(name)
    return chosen


def trial_trainer(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, loaders: data_lib.Loaders, *,
                  rt: Runtime) -> Any:
    """``make(candidate, updates)``: the run's loop with a fresh optimizer at the candidate's peak rate and the run's
    schedule compressed to ``updates`` updates (warmup and decay keep their share of the run); a ``(rate, freeze)``
    candidate freezes the model as ``freeze=NAME`` would first (`freeze_for_trial`; the trials undo it)."""
    s, epochs = cfg.sched, cfg.trainer.max_epochs

    def make(candidate: float | tuple[float, str], updates: int) -> Trainer:
        rate, freeze = candidate if isinstance(candidate, tuple) else (candidate, cfg.freeze.name)
        if freeze != cfg.freeze.name:
            freeze_for_trial(cfg, model, spec, name=freeze)
        optimizer = build_optimizer_at(cfg, model, spec, lr=rate)
        scheduler = build_scheduler(optimizer, name=s.name, epochs=1, updates_per_epoch=updates,
                                    warmup_epochs=s.warmup_epochs / epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                                    decay_epochs=s.decay_epochs / epochs, decay_rate=s.decay_rate)
        parts = TrainingParts(model, optimizer, scheduler, grad_scaler=build_grad_scaler(rt))
        return build_trainer(cfg, parts, loaders=loaders, rt=rt, num_classes=spec.num_classes, hooks=[])

    return make


def freeze_for_trial(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *, name: str) -> None:
    """Freeze ``model`` as ``freeze=NAME`` would, for one trial. BatchNorm is pinned to eval even where the option
    swaps in ``FrozenBatchNorm2d`` (``bn: frozen``): it computes the same, and the trial's snapshot can undo a pin."""
    f = freeze_option(name)
    plan = plan_freeze(model, mode=f.name, head=spec.classifier, until=f.until, include=list(f.include),
                       exclude=list(f.exclude), schedule={}, max_epochs=cfg.trainer.max_epochs)
    apply_freeze(model, plan, bn="eval" if f.bn == "frozen" else f.bn)


def build_ema(cfg: DictConfig, model: nn.Module) -> ModelEmaV3 | None:
    return ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema else None


def build_grad_scaler(rt: Runtime) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(rt.device.type) if rt.use_grad_scaler else None


# ----------------------------------------------------- hooks and trainer
def build_checkpoint_policy(cfg: DictConfig) -> CheckpointPolicy:
    c = cfg.checkpoint
    return CheckpointPolicy(monitor=c.monitor, mode=c.mode, save_best=c.save_best, save_last=c.save_last,
                            save_top_k=c.save_top_k, every_n_epochs=c.every_n_epochs,
                            every_n_steps=c.every_n_steps, keep_last_k=c.keep_last_k,
                            weights_format=c.weights_format, min_delta=c.min_delta)


def build_mirror(cfg: DictConfig, *, world: World = SINGLE) -> Mirror | None:
    """``checkpoint.mirror`` (rank 0), checked writable before any work; ``resume=URL`` keeps mirroring there
    unless ``checkpoint.mirror`` names another place."""
    c = cfg.checkpoint
    url = c.mirror or (cfg.resume if is_url(cfg.resume) else None)
    if url is None or not world.main:
        return None
    mirror = Mirror(url, storage_options=storage_options(c), flush_timeout=c.mirror_flush_timeout)
    mirror.check_writable()
    log.info(f"checkpoint mirror: every save is uploaded to '{mirror.target}' too")
    return mirror


def build_run(cfg: DictConfig, training: TrainingParts, *, spec: BackboneSpec, data_config: dict[str, Any],
              class_names: list[str], loaders: data_lib.Loaders, rt: Runtime, run_dir: Path, plan: ResumePlan,
              stop: StopRequest | None = None, lr_find: dict[str, Any] | None = None,
              mirror: Mirror | None = None) -> RunParts:
    """The trainer and its hooks in their slots (`RunHooks`): the trackers and ``metrics.jsonl`` (rank 0),
    the checkpoint manager (the same on every rank; files written by rank 0), a sweep's trial reporter,
    the freezing controller. ``plan``: how TensorBoard and the manifest continue a resumed run;
    ``lr_find``: how ``optim.lr=auto`` chose the rate (kept in every training state, drawn once);
    ``mirror``: where every save is uploaded too (`build_mirror`)."""
    versions, world = package_versions(), rt.world
    if cfg.trainer.compile:  # in place (nn.Module.compile): state_dict keys, EMA and checkpoints stay as they are
        log.info(f"trainer.compile: the model's forward is compiled by torch.compile (mode "
                 f"{cfg.trainer.compile_mode}); the first steps take longer while it compiles")
        training.model.compile(mode=cfg.trainer.compile_mode)
    if world.distributed:
        log.info(f"DDP: {world.size} processes x data.batch_size {loaders.train.batch_size} = global batch "
                 f"{world.size * loaders.train.batch_size} ({rt.device.type})")
    logger, events = build_logging(cfg, class_names=class_names, run_dir=run_dir, plan=plan, world=world)
    facts = RunFacts(config_yaml=OmegaConf.to_yaml(without_passwords(OmegaConf.to_container(cfg, resolve=True))),
                     versions=versions, seed=cfg.seed,
                     batch_size=loaders.train.batch_size, lr_find=lr_find, world_size=world.size,
                     streams=getattr(loaders.train_sampler, "workers", None),
                     trackers=logger.resume_ids() if logger is not None else {})
    policy = build_checkpoint_policy(cfg)
    writer = FileWriter(run_dir / "checkpoints", policy=policy, parts=training, fresh=plan.new_manifest, mirror=mirror,
                        model=ModelDescription(spec, class_names=class_names, data_config=data_config,
                                               versions=versions, task=cfg.task.name)) if world.main else NoWriter()
    if lr_find is not None and plan.fresh and events is not None:  # a resume took the rate from its state
        events.log_lr_find(lr_find)
    hooks = RunHooks(log=events, metrics=MetricsJsonl(run_dir / "metrics.jsonl" if world.main else None),
                     checkpoint=CheckpointManager(writer, policy=policy, parts=training, run=facts, world=world),
                     trial=build_trial_reporter(cfg, logger=logger, world=world), freeze=training.freeze)
    trainer = build_trainer(cfg, training, loaders=loaders, rt=rt, num_classes=spec.num_classes, hooks=hooks.ordered(),
                            stop=stop)
    return RunParts(trainer=trainer, training=training, hooks=hooks, logger=logger)


def build_logging(cfg: DictConfig, *, class_names: list[str], run_dir: Path, plan: ResumePlan,
                  world: World) -> tuple[Loggers | None, LogEvents | None]:
    """The trackers ``logger=`` selects (`finetune.trackers`: each continues a resumed run without a step
    logged twice) with the run's config, and the hook that feeds them; none off rank 0."""
    if not world.main:
        return None, None
    continuation = plan.tensorboard()
    sections = {name: OmegaConf.to_container(cfg.logger[name], resolve=True) for name in cfg.logger
                if isinstance(cfg.logger[name], DictConfig)}
    context = TrackerContext(run_dir=run_dir, run_name=run_name(run_dir), purge_step=continuation.get("purge_step"),
                             resume_ids=plan.tracker_ids(), sweep=sweep_facts(cfg))
    logger = build_trackers(sections, context)
    logger.log_config(without_passwords(OmegaConf.to_container(cfg, resolve=True)))
    return logger, LogEvents(logger, class_names=class_names, log_every_n_steps=cfg.logger.log_every_n_steps,
                             replay=continuation.get("replay"))


def run_name(run_dir: Path) -> str:
    """A tracker's name for the run: the run dir's name; a sweep's job: its number (``hydra.job.num``)."""
    return str(job_number()) if in_a_sweep() else run_dir.name


def sweep_facts(cfg: DictConfig) -> dict[str, Any] | None:
    """Where a sweep job belongs (its sweep dir, job number, and Optuna trial): None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig

    if not in_a_sweep():
        return None
    return {"dir": HydraConfig.get().sweep.dir, "job": job_number(), "trial": cfg.sweep.trial, "study": cfg.sweep.study}


def build_trial_reporter(cfg: DictConfig, *, logger: Loggers | None, world: World) -> TrainerHook | None:
    """A sweeper's trial (``sweep.trial``): reports each epoch after its save, stops the run when pruned."""
    if cfg.sweep.trial is None:
        return None
    from finetune.optuna_trial import TrialReporter

    return TrialReporter(study=cfg.sweep.study, storage=cfg.sweep.storage, trial=cfg.sweep.trial,
                         monitor=cfg.checkpoint.monitor, logger=logger, world=world)


def build_mixer(cfg: DictConfig, *, num_classes: int) -> BatchMixer | None:
    """``data.mixup``/``data.cutmix``: timm's Mixup with the run's label smoothing folded into its soft targets."""
    d = cfg.data
    if not (d.mixup or d.cutmix):
        return None
    return BatchMixer(mixup=d.mixup, cutmix=d.cutmix, prob=d.mix_prob, label_smoothing=cfg.trainer.label_smoothing,
                      num_classes=num_classes, seed=cfg.seed, off_epoch=d.mix_off_epoch)


def build_trainer(cfg: DictConfig, training: TrainingParts, *, loaders: data_lib.Loaders, rt: Runtime,
                  num_classes: int, hooks: list, stop: StopRequest | None = None) -> Trainer:
    """The loop with its loss; ``stop`` is set by SIGTERM/SIGINT to stop after a save."""
    t = cfg.trainer
    weight = loaders.class_weights.to(rt.device) if loaders.class_weights is not None else None
    mixer = build_mixer(cfg, num_classes=num_classes)
    loss_fn = SoftTargetCrossEntropy() if mixer else build_loss(cfg.task, weight=weight, smoothing=t.label_smoothing)
    return Trainer(model=training.model, optimizer=training.optimizer, multilabel=cfg.task.name == "multilabel",
                   loss_fn=loss_fn, mixer=mixer, device=rt.device,
                   num_classes=num_classes, max_epochs=t.max_epochs, scheduler=training.scheduler,
                   autocast_dtype=rt.autocast_dtype, grad_scaler=training.grad_scaler, accumulate=t.accumulate,
                   grad_clip=t.grad_clip, ema=training.ema, channels_last=t.channels_last,
                   monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode, patience=t.early_stopping.patience,
                   min_delta=cfg.checkpoint.min_delta, hooks=hooks,
                   progress_bar=cfg.logger.progress_bar and rt.world.main, stop=stop, world=rt.world,
                   ddp_options={"device_ids": [rt.device.index]} if rt.device.type == "cuda" else {})


def build_loss(task: DictConfig, *, weight: torch.Tensor | None, smoothing: float) -> nn.Module:
    """``task.loss``: cross-entropy (``weight``: per-class weights), BCE (``weight``: ``pos_weight``), or ASL."""
    from finetune.losses import SmoothedBCE, asymmetric_loss

    losses = {
        "ce": lambda: nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing),
        "bce": lambda: SmoothedBCE(pos_weight=weight, smoothing=smoothing),
        "asl": lambda: asymmetric_loss(gamma_neg=task.asl_gamma_neg, gamma_pos=task.asl_gamma_pos, clip=task.asl_clip),
    }
    return losses[task.loss]()


def hparams(cfg: DictConfig, *, only: list[str] | None = None,
            lr_find: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat ``group.key`` settings for TensorBoard's HPARAMS tab (``only``: the keys under these), and what
    ``optim.lr=auto`` chose (``lr_find``: its record) as ``auto.lr`` and ``auto.freeze``.

    In a sweep, ``only`` is the job's overrides: TensorBoard pointed at the sweep dir then shows
    one table of what varied, not every setting of every job.
    """
    chosen = {f"auto.{k}": lr_find[k] for k in ("lr", "freeze") if k in lr_find} if lr_find else {}
    flat = without_passwords(OmegaConf.to_container(cfg, resolve=True))  # the HPARAMS tab shows no credential
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(flat, "")
    if only is not None:
        out = {k: v for k, v in out.items() if any(k == key or k.startswith(f"{key}.") for key in only)}
    return out | chosen


def job_number() -> int:
    """This job's number in a sweep (``hydra.job.num``); 0 outside one."""
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.get("num", 0) or 0) if HydraConfig.initialized() else 0


def swept_keys() -> list[str] | None:
    """The keys this job of a sweep overrides (Hydra's task overrides); None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig

    if not in_a_sweep():
        return None
    keys = [split_override(o)[0] for o in HydraConfig.get().overrides.task if "=" in o]
    return [k.replace("/", ".") for k in keys if not k.startswith(("hydra", "sweep."))]
