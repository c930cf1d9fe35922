"""Config -> parts. The only code besides ``run`` that reads the config.

Each builder takes the config node it needs and returns a ready part; what is
below them (models, data, weights, optim, trainer) takes named arguments only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch import nn

from finetune import data as data_lib
from finetune.checkpoint import CheckpointManager, CheckpointPolicy, rng_state, weights_metadata
from finetune.config import Config
from finetune.errors import UserError
from finetune.freezing import FreezeController, FreezePlan, apply_freeze, plan_freeze
from finetune.heads import init_head, warm_start_subset
from finetune.loggers import MetricsJsonl, TensorBoardLogger
from finetune.models import BackboneSpec, build_model, locate_library_weights
from finetune.optim import build_optimizer, build_param_groups, build_scheduler
from finetune.resume import ResumePoint
from finetune.runtime import Runtime, package_versions
from finetune.signals import StopRequest, shield_workers
from finetune.trainer import Trainer, TrainState, infer_mode
from finetune.weights import load_pretrained

log = logging.getLogger("finetune")


def build_split(cfg: DictConfig, *, run_dir: Path) -> data_lib.DataSplit:
    """Find the images (generating the demo set once if asked) and record the split in the run dir."""
    if cfg.name == "demo":
        demo = cfg.demo
        root = data_lib.ensure_demo_dataset(cfg.cache_dir, seed=demo.seed, num_classes=demo.num_classes,
                                            train_per_class=demo.train_per_class,
                                            val_per_class=demo.val_per_class, image_size=demo.image_size)
    elif cfg.root is None:
        raise UserError("data=custom needs data.root=DIR: an image folder with DIR/<class>/<image> "
                        "or DIR/train/<class>/<image> and DIR/val/<class>/<image>")
    else:
        root = cfg.root
    split = data_lib.scan_image_folder(root, val_split=cfg.val_split, seed=cfg.split_seed,
                                       skip_bad_images=cfg.skip_bad_images)
    (run_dir / "split.json").write_text(json.dumps(split.to_record(), indent=1) + "\n")
    return split


def build_network(cfg: DictConfig, *, head: DictConfig, num_classes: int) -> tuple[nn.Module, BackboneSpec]:
    if cfg.num_classes is not None and cfg.num_classes < num_classes:
        raise UserError(f"model.num_classes '{cfg.num_classes}' is smaller than the {num_classes} class folders "
                        "in the data: raise it, or leave it null to take the count from the data")
    if head.name == "features":
        raise UserError("head=features builds an embedding model without a classifier, which cannot be trained "
                        "here: use head=linear or head=mlp (build_model(head='features') gives the embeddings)")
    model, spec = build_model(name=cfg.name, source=cfg.source, num_classes=cfg.num_classes or num_classes,
                              in_chans=cfg.in_chans, input_size=cfg.input_size, pool=head.pool,
                              dropout=head.dropout, drop_path_rate=cfg.drop_path_rate, head=head.name,
                              hidden=list(head.hidden), activation=head.activation, norm=head.norm)
    spec.subset = head.subset  # read by load_weights: warm-start rows of the pretrained classifier
    return model, spec


def load_weights(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *, head_init: str,
                 run_dir: Path) -> dict[str, Any]:
    """Initialise from ``model.weights`` or the library's own weights; write ``load_report.json``.

    A classifier the weights did not provide (new class count, or no weights) starts as ``head.init`` says.
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
        init_head(model, spec.classifier, head_init)
    subset = spec.subset
    if subset is not None:
        if source is None:
            raise UserError(f"head.subset '{subset}' starts the head from pretrained rows, but no weights are "
                            "loaded: set model.weights or model.pretrained=true")
        warm = warm_start_subset(model, spec.classifier, class_names=_class_names(run_dir), subset=subset,
                                 report=loaded, trust_pickle=cfg.trust_pickle)
        log.info(f"head.subset: {len(warm['warm_started'])} classes warm-started from pretrained rows "
                 f"{warm['warm_started']}; new: {warm['not_found']}")
        report["subset"] = warm
    (run_dir / "load_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _class_names(run_dir: Path) -> list[str]:
    """The class names of this run, from the ``split.json`` that ``build_split`` wrote."""
    return json.loads((run_dir / "split.json").read_text())["class_names"]


def build_loaders(cfg: DictConfig, split: data_lib.DataSplit, spec: BackboneSpec, *, seed: int,
                  pin_memory: bool) -> data_lib.Loaders:
    data_config = data_lib.effective_data_config(spec.data_config, cfg.img_size)
    spec.data_config = data_config  # what inference must reproduce
    augment = {"scale": tuple(cfg.crop_scale), "hflip": cfg.hflip, "color_jitter": cfg.color_jitter,
               "auto_augment": cfg.auto_augment}
    return data_lib.build_loaders(
        split, train_transform=data_lib.build_transforms(data_config, img_size=cfg.img_size, train=True, **augment),
        eval_transform=data_lib.build_transforms(data_config, img_size=cfg.img_size, train=False),
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, balance=cfg.balance, seed=seed,
        pin_memory=pin_memory, drop_last=len(split.train) % cfg.batch_size == 1,  # BatchNorm can't train on 1
        channels=data_config["input_size"][0])


def build_optimization(cfg: DictConfig, model: nn.Module, spec: BackboneSpec, *,
                       updates_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """Freeze, then the optimizer over stable named groups (all parameters), then the per-update scheduler."""
    frozen = apply_freeze(model, build_freeze_plan(cfg, model, spec), bn=cfg.freeze.bn)
    if frozen:
        log.info(f"frozen: {len(frozen)} parameter tensors (freeze={cfg.freeze.name})")
    o = cfg.optim
    groups = build_param_groups(model, head=spec.classifier, weight_decay=o.weight_decay,
                                decay_norm_and_bias=o.decay_norm_and_bias,
                                head_lr_scale=(o.head_lr or o.lr) / o.lr, backbone_lr_mult=o.backbone_lr_mult,
                                layer_decay=o.layer_decay)
    optimizer = build_optimizer(groups, name=cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                betas=cfg.optim.betas)
    s = cfg.sched
    scheduler = build_scheduler(optimizer, name=s.name, epochs=cfg.trainer.max_epochs,
                                updates_per_epoch=updates_per_epoch, warmup_epochs=s.warmup_epochs,
                                warmup_lr=s.warmup_lr, min_lr=s.min_lr, decay_epochs=s.decay_epochs,
                                decay_rate=s.decay_rate)
    return optimizer, scheduler


def build_freeze_plan(cfg: DictConfig, model: nn.Module, spec: BackboneSpec) -> FreezePlan:
    """``freeze.*`` resolved against this model (stages, frozen names, schedule); fails on unknown names."""
    f = cfg.freeze
    schedule = {int(k): (list(v) if OmegaConf.is_list(v) else v) for k, v in f.schedule.items()}
    return plan_freeze(model, mode=f.name, head=spec.classifier, until=f.until, include=list(f.include),
                       exclude=list(f.exclude), schedule=schedule, max_epochs=cfg.trainer.max_epochs)


def build_freeze_hooks(cfg: DictConfig, model: nn.Module, spec: BackboneSpec) -> list[FreezeController]:
    """The hook that unfreezes on ``freeze.schedule`` and verifies frozen tensors each epoch.

    The plan is resolved again (deterministic) from the model ``build_optimization`` froze.
    """
    if cfg.freeze.name == "none" and not cfg.freeze.schedule:
        return []
    return [FreezeController(model, build_freeze_plan(cfg, model, spec), bn=cfg.freeze.bn,
                             verify=cfg.freeze.verify)]


def build_trainer(cfg: DictConfig, *, model: nn.Module, spec: BackboneSpec, loaders: data_lib.Loaders,
                  rt: Runtime, run_dir: Path, class_names: list[str], resume: ResumePoint | None = None,
                  stop: StopRequest | None = None) -> Trainer:
    """The loop with its loss, EMA, grad scaler and hooks (TensorBoard, metrics.jsonl, checkpoints).

    ``resume``: the training state this run continues from (its parts are restored later, by
    ``finetune.resume.restore_training``); ``stop``: set by SIGTERM/SIGINT to stop after a save.
    """
    t = cfg.trainer
    for loader in (loaders.train, loaders.val):  # a stop signal to the process group leaves workers alone
        shield_workers(loader)
    weight = loaders.class_weights.to(rt.device) if loaders.class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=t.label_smoothing)
    updates = -(-len(loaders.train) // t.accumulate)
    optimizer, scheduler = build_optimization(cfg, model, spec, updates_per_epoch=updates)
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema else None
    scaler = torch.amp.GradScaler(rt.device.type) if rt.use_grad_scaler else None
    trainer = Trainer(model=model, optimizer=optimizer, loss_fn=loss_fn, device=rt.device,
                      num_classes=spec.num_classes, max_epochs=t.max_epochs, scheduler=scheduler,
                      autocast_dtype=rt.autocast_dtype, grad_scaler=scaler, accumulate=t.accumulate,
                      grad_clip=t.grad_clip, ema=ema, channels_last=t.channels_last,
                      monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode,
                      patience=t.early_stopping.patience, min_delta=t.early_stopping.min_delta,
                      progress_bar=cfg.logger.progress_bar, stop=stop)
    trainer.hooks = build_hooks(cfg, trainer=trainer, spec=spec, run_dir=run_dir, class_names=class_names,
                                batch_size=loaders.train.batch_size, resume=resume)
    trainer.hooks += build_freeze_hooks(cfg, model, spec)
    return trainer


def build_checkpoint_policy(cfg: DictConfig) -> CheckpointPolicy:
    c = cfg.checkpoint
    return CheckpointPolicy(monitor=c.monitor, mode=c.mode, save_best=c.save_best, save_last=c.save_last,
                            save_top_k=c.save_top_k, every_n_epochs=c.every_n_epochs,
                            every_n_steps=c.every_n_steps, keep_last_k=c.keep_last_k,
                            weights_format=c.weights_format)


def build_hooks(cfg: DictConfig, *, trainer: Trainer, spec: BackboneSpec, run_dir: Path,
                class_names: list[str], batch_size: int | None = None,
                resume: ResumePoint | None = None) -> list:
    """TensorBoard, metrics.jsonl and the checkpoint manager, continuing ``resume`` when given."""
    versions = package_versions()
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    def metadata(**kw: Any) -> dict[str, str]:
        return weights_metadata(spec, class_names=class_names, versions=versions, **kw)

    def training_state(state: TrainState) -> dict[str, Any]:
        freeze = trainer.freeze_schedule  # the freezing schedule's hook, when there is one
        return {"format": "finetune.train_state/1", "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
                "grad_scaler": trainer.grad_scaler.state_dict() if trainer.grad_scaler else None,
                "ema": trainer.ema.state_dict() if trainer.ema else None,
                "freeze": freeze.state_dict() if freeze is not None else None,
                "train_state": state.to_dict(), "rng": rng_state(),
                "data_order": {"seed": cfg.seed, "epoch": state.epoch, "batches_seen": state.batches_seen,
                               "batch_size": batch_size},
                "checkpoint_policy": manager.state_dict(), "config_yaml": config_yaml,
                "versions": versions, "weights_metadata": metadata(epoch=state.epoch)}

    def deploy_model() -> nn.Module:
        return trainer.ema.module if trainer.ema is not None else trainer.model

    in_place = resume is not None and resume.in_place
    manager = CheckpointManager(run_dir / "checkpoints", policy=build_checkpoint_policy(cfg), metadata=metadata,
                                weights_model=deploy_model, training_state=training_state, fresh=not in_place)
    tb = TensorBoardLogger(run_dir / "tb", class_names=class_names, log_every_n_steps=cfg.logger.log_every_n_steps,
                           **tensorboard_continuation(cfg, resume))
    return [tb, MetricsJsonl(run_dir / "metrics.jsonl"), manager]


def tensorboard_continuation(cfg: DictConfig, resume: ResumePoint | None) -> dict[str, Any]:
    """How TensorBoard continues a resumed run without a step logged twice.

    In this run dir, events from the resumed step on are purged. When that step ended an epoch
    whose evaluation is still to come, its ``val/*`` is logged again, so the purge starts at the
    step itself and the step's own train scalars (saved in the state) are written back.
    """
    if cfg.resume is None:
        return {}
    if resume is None or not resume.in_place:
        return {"purge_step": 1}
    state = TrainState(**resume.state["train_state"])
    if state.evaluation_pending:
        return {"purge_step": resume.step, "replay": (resume.step, state.step_logs)}
    return {"purge_step": resume.step + 1}


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """Flat ``group.key`` settings for TensorBoard's HPARAMS tab."""
    flat = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(flat, "")
    return out


def monitor_mode(cfg: DictConfig) -> str:
    return cfg.checkpoint.mode or infer_mode(cfg.checkpoint.monitor)


__all__ = ["Config", "build_split", "build_network", "load_weights", "build_loaders", "build_trainer",
           "hparams", "monitor_mode"]
