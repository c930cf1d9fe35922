"""``python -m finetune.evaluate ckpt=PATH data=custom data.root=DIR [split=val|train|all]``: a checkpoint's metrics.

Writes into its run dir (``hydra.run.dir``): ``metrics.json`` (``acc1``, ``acc5``, ``loss``, ``macro_f1``,
``balanced_acc``, ``ece``, ``per_class``, ...), ``confusion_matrix.json`` and ``.png``, and
``misclassified.csv``; prints a per-class table.

Evaluating a run's ``best.safetensors`` on its validation images reproduces the run's best
``val/acc1`` and its ``val/loss`` bit for bit, because it takes the training run's evaluation path:

- the same images in the same order: the ``val/`` folder, or, for a class-folder root that training
  split by seed, the exact file list of the run's ``split.json`` (the run is ``run_dir=``, or the run
  dir the checkpoint lives in);
- the same preprocessing (the checkpoint's own eval transform), batches of the run's
  ``data.batch_size``, its ``trainer.precision`` and memory format (read from ``RUN_DIR/.hydra/config.yaml``);
- the same accumulation (`finetune.metrics.MetricAccumulator`, summed cross-entropy per batch).

With ``data.root`` unset, the run's own data settings are used (its root, split, or the demo set).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.cli import exit_on_user_error
from finetune.config import CONFIG_PACKAGE
from finetune.files import atomic_write_stream, atomic_write_text, csv_text, read_json_data, read_yaml_data
from finetune.config import DataConfig
from finetune.data.folder import DataSplit
from finetune.errors import UserError, describe_error, message_of
from finetune.inference import (Classifier, checkpoint_file, eval_loader, load_classifier, output_dir, run_dir_of,
                                sha256_of)
from finetune.metrics import EvalResult, MetricAccumulator

log = logging.getLogger("finetune")

SPLITS = ("val", "train", "all")
ECE_BINS = 15
# What evaluate takes from a training run's config (someone else's file when the run dir is): where its
# images are and how it split them, never where to write (the demo set goes under this user's data.cache_dir).
DATA_KEYS_FROM_RUN = ("name", "root", "val_split", "split_seed", "skip_bad_images", "demo", "file", "columns", "classes",
                      "label_sep", "allow_outside", "folds", "fold", "path", "image_column", "label_column",
                      "streaming")
Sample = tuple[str, int]


@dataclass
class EvaluateConfig:
    """The keys of ``conf/evaluate.yaml`` (a typo fails before any work, naming the key)."""

    ckpt: Optional[str] = None  # run dir | best/last.safetensors | last.ckpt | exported .onnx
    split: str = "val"  # val | train | all
    run_dir: Optional[str] = None  # the training run (its split.json, batch size); default: the checkpoint's
    batch_size: Optional[int] = None  # null: the run's data.batch_size, else data.batch_size
    precision: Optional[str] = None  # 32 | bf16 | 16; null: the run's trainer.precision, else 32
    device: str = "auto"
    progress_bar: bool = True
    out: Optional[str] = None  # where to write; null: RUN_DIR/eval/<date_time>/ beside the checkpoint's run
    thresholds: Any = None  # multi-label: null (the model's tuned thresholds), a number, a list, or a file
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg))


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on ``cfg.split`` of ``cfg.data``; write the report into ``out_dir`` (default:
    ``cfg.out``, else beside the checkpoint's run, `finetune.inference.output_dir`) and return
    ``metrics.json``'s content."""
    from finetune.runtime import set_deterministic

    check_split(cfg.split)
    path = checkpoint_file(cfg.ckpt)
    training = TrainingRun.find(cfg.run_dir, path)
    settings = training.eval_settings(batch_size=cfg.batch_size, precision=cfg.precision, data=cfg.data)
    set_deterministic(True)  # as training evaluated (trainer.deterministic)
    classifier = load_classifier(path, device=cfg.device, precision=settings.precision,
                                 channels_last=settings.channels_last)
    images = choose_images(training.data_config(cfg.data), training, split=cfg.split,
                           multilabel=classifier.multilabel)
    if classifier.multilabel:
        return evaluate_label_sets(classifier, images, thresholds=classifier.thresholds(cfg.thresholds),
                                   settings=settings, num_workers=cfg.data.num_workers, progress_bar=cfg.progress_bar,
                                   out_dir=output_dir(out_dir or cfg.out, checkpoint=path, kind="eval"))
    samples = to_checkpoint_labels(images, classifier.meta.class_names)
    loader = eval_loader(samples, classifier.meta, batch_size=settings.batch_size, num_workers=cfg.data.num_workers,
                         images=images.images)
    outputs = evaluate_batches(classifier, loader, progress_bar=cfg.progress_bar)
    report = build_report(outputs, classifier, images=images, split=cfg.split, batch_size=settings.batch_size)
    write_report(output_dir(out_dir or cfg.out, checkpoint=path, kind="eval"), report, outputs, samples,
                 label_names=classifier.label_names)
    print(format_table(report))
    return report


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split must be one of {' | '.join(SPLITS)}, got '{split}'")


# ------------------------------------------------------------ the training run
@dataclass
class EvalSettings:
    """How the training run evaluated: what makes the loss match (batches) and the logits (numerics)."""

    batch_size: int
    precision: str  # trainer.precision: 32 | bf16 | 16
    channels_last: bool


@dataclass
class TrainingRun:
    """What the run dir a checkpoint came from says about how it evaluated: its composed config
    (``.hydra/config.yaml``) and its split (``split.json``). Both are data: only checked values are used."""

    path: Path | None  # None: no training run known
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def find(cls, run_dir: str | None, checkpoint: Path) -> TrainingRun:
        """``run_dir`` when given, else the run dir ``checkpoint`` lives in (an ``.onnx`` may sit in its top)."""
        if run_dir is not None:
            path = Path(run_dir).expanduser()
            if not (path / "split.json").is_file():
                raise UserError(f"run_dir '{run_dir}' is not a training run dir (no split.json): pass the "
                                "directory a finetune run wrote, or leave run_dir unset")
        else:
            top = checkpoint.resolve().parent
            path = run_dir_of(checkpoint) or (top if (top / "split.json").is_file() else None)
        return cls(path, read_yaml(path / ".hydra" / "config.yaml")) if path is not None else cls(None)

    def setting(self, dotted: str) -> Any:
        node: Any = self.config
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def eval_settings(self, *, batch_size: int | None, precision: str | None, data: DictConfig) -> EvalSettings:
        """Batch size and precision: given, else the run's (what makes the loss match), else data's / 32."""
        batch = batch_size if batch_size is not None else self.setting("data.batch_size") or data.batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UserError(f"batch_size must be a positive integer, got '{batch}'")
        precision = precision if precision is not None else str(self.setting("trainer.precision") or "32")
        if self.path is not None and not self.config and batch_size is None:
            log.warning(f"run '{self.path}' has no .hydra/config.yaml: evaluating in batches of {batch} "
                        "(data.batch_size); give batch_size= the run's data.batch_size for its exact loss")
        return EvalSettings(batch, precision, channels_last=self.setting("trainer.channels_last") is True)

    def split_record(self) -> dict[str, Any]:
        """The run's ``split.json``: which files it trained and validated on."""
        path = self.path / "split.json"
        try:
            record = read_json_data(path, max_bytes=1 << 30)
        except UserError as err:
            raise UserError(f"{message_of(err)}: it is damaged; evaluate every image with split=all") from None
        if not isinstance(record, dict):
            raise UserError(f"'{path}' is not a split record: evaluate every image with split=all")
        return record

    def data_config(self, data: DictConfig) -> DictConfig:
        """``data``, or with ``data.root`` unset the run's own images (root, split settings, demo set)."""
        if data.root is not None or data.name != "custom" or not isinstance(self.setting("data"), dict):
            return data
        run_data = {k: v for k, v in self.setting("data").items() if k in DATA_KEYS_FROM_RUN}
        if run_data.get("name") == "table":  # data.file as the run read it (a relative path was the run's cwd's)
            run_data["file"] = self.split_record().get("source") or run_data.get("file")
        try:
            merged = OmegaConf.merge(data, run_data)
        except Exception as err:  # noqa: BLE001 - the file is data: a bad value is one line
            raise UserError(f"'{self.path}/.hydra/config.yaml' has data settings this version cannot use "
                            f"({describe_error(err)}): give data=custom data.root=DIR") from None
        where = {"table": f"data.file={merged.file}", "hf": f"data.path={merged.path}"}.get(merged.name,
                                                                                            f"data.root={merged.root}")
        log.info(f"data: the images of run '{self.path}' (data.name={merged.name}, {where})")
        return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """A run's config file as plain data (bounded, no aliases, nothing resolved: `read_yaml_data`)."""
    try:
        loaded = read_yaml_data(path) if path.is_file() else {}
    except UserError as err:
        raise UserError(f"{message_of(err)}: pass batch_size= and precision=, or repair the file") from None
    return loaded if isinstance(loaded, dict) else {}


# ------------------------------------------------------------ the images
@dataclass
class EvalImages:
    """The labelled images of one split, labels indexing ``class_names``, and where the list came from."""

    samples: list[Sample]
    class_names: list[str]
    root: str
    source: str  # "folder", "split.json", "seed" or "all"
    images: Any = None  # reads a sample's key (a Hugging Face dataset's SPLIT/ROW); None: the keys are paths


def choose_images(data: DictConfig, training: TrainingRun, *, split: str, multilabel: bool = False) -> EvalImages:
    """``split``'s images of ``data.root``: its ``train/``/``val/`` folder; for a class-folder root
    the run's ``split.json`` (exact file list), else the split training would make by seed."""
    from finetune.builders import build_split

    if data.name == "webdataset":
        raise UserError("finetune.evaluate reads image folders and tables, not shards (yet): give data=custom "
                        "data.root=DIR; a run on shards logs its val metrics every epoch (metrics.jsonl)")
    if data.name == "hf" and data.streaming:
        raise UserError("finetune.evaluate reads a Hugging Face dataset on disk, not streamed (yet): give data=hf "
                        "data.path=DIR data.streaming=false with a local copy; a streamed run logs its val metrics "
                        "every epoch (metrics.jsonl)")
    folder = build_split(data, run_dir=Path("."), write=False, multilabel=multilabel)  # the training scan
    if split == "all":
        samples = sorted(folder.train + folder.val, key=lambda s: (s[1], s[0]))
        return EvalImages(samples, folder.class_names, folder.root, "all", folder.images)
    if folder.layout in ("train_val", "column"):  # the split is in the data: its folders, a table's split column
        return EvalImages(getattr(folder, split), folder.class_names, folder.root, "folder", folder.images)
    if training.path is not None:
        return images_of_record(training.split_record(), folder, split=split, record_path=training.path / "split.json")
    log.warning(f"evaluating the {split} images of the split data.val_split={folder.val_split} "
                f"data.split_seed={folder.seed} makes of '{folder.root}' (no training run known): pass "
                "run_dir=RUN_DIR to use the run's split.json, or split=all to evaluate every image")
    return EvalImages(getattr(folder, split), folder.class_names, folder.root, "seed", folder.images)


def images_of_record(record: dict[str, Any], folder: DataSplit, *, split: str, record_path: Path) -> EvalImages:
    """The files ``split.json`` lists for ``split``, under ``data.root`` (where the data set is now)."""
    hint = (f"data.root '{folder.root}' is not the folder that run was trained on: evaluate every image in it "
            "with split=all")
    if record.get("layout") not in ("split", "folds"):
        raise UserError(f"'{record_path}' records a train/ and val/ folder, but {hint}")
    try:
        names, entries = list(record["class_names"]), list(record["files"][split])
        samples = [(checked_name(rel, record_path), tuple(map(int, label)) if folder.multilabel else int(label))
                   for rel, label in entries]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"'{record_path}' is not a split record ({describe_error(err)}): evaluate split=all") from None
    if not all(0 <= c < len(names) for _, label in samples for c in (label if folder.multilabel else (label,))):
        raise UserError(f"'{record_path}' has labels outside its class names: evaluate split=all")
    if folder.images is not None:  # a Hugging Face dataset's SPLIT/ROW keys, not files under a root
        known = {key for key, _ in folder.train + folder.val}
        missing = [key for key, _ in samples if key not in known]
        if missing:
            raise UserError(f"'{record_path}' names rows the dataset at data.path '{folder.root}' does not have (e.g. "
                            f"'{missing[0]}'): it is not the dataset that run was trained on; evaluate split=all")
        return EvalImages(samples, names, folder.root, "split.json", folder.images)
    samples = [(str(Path(folder.root) / rel), label) for rel, label in samples]
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(samples)} {split} images in '{record_path}' are not under "
                        f"data.root (e.g. '{missing[0]}'): {hint}")
    return EvalImages(samples, names, folder.root, "split.json")


def checked_name(name: Any, record_path: Path) -> str:
    """A file name from ``split.json``: a relative path that stays under ``data.root``."""
    if not isinstance(name, str) or not name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise UserError(f"'{record_path}' names {name!r}, which is not a file under data.root: refused "
                        "(the file may be damaged); evaluate split=all")
    return name


def to_checkpoint_labels(images: EvalImages, class_names: list[str]) -> list[Sample]:
    """The samples labelled by the checkpoint's class indices (matched by name). Classes the checkpoint
    does not know are an error; a subset of its classes is evaluated with a warning."""
    extra = [c for c in images.class_names if c not in class_names]
    missing = [c for c in class_names if c not in images.class_names]
    if extra:
        raise UserError(f"the classes of data.root '{images.root}' differ from the checkpoint's: not in the "
                        f"checkpoint: {quote(extra)}; not in the data: {quote(missing)}: evaluate on images of "
                        "the classes the model was trained on (class folders named as in training)")
    if missing:
        log.warning(f"data.root '{images.root}' has {len(images.class_names)} of the checkpoint's {len(class_names)} "
                    f"classes (none of {quote(missing)}): those get support 0; macro_f1 and balanced_acc "
                    "average over the classes present")
    index = {name: i for i, name in enumerate(class_names)}
    return [(path, index[images.class_names[label]]) for path, label in images.samples]


def quote(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) if names else "none"


# ------------------------------------------------------------ evaluating
@dataclass
class Outputs:
    """What an evaluation pass gives: the metrics of training, and each image's prediction."""

    result: EvalResult
    predicted: torch.Tensor  # [N] argmax of the logits (what the confusion matrix counts)
    confidence: torch.Tensor  # [N] softmax probability of the predicted class
    targets: torch.Tensor  # [N]


@torch.no_grad()
def evaluate_batches(classifier: Classifier, loader: DataLoader, *, progress_bar: bool = False) -> Outputs:
    """``Trainer.evaluate``'s pass (summed cross-entropy and `MetricAccumulator`, batch by batch),
    keeping each image's prediction and confidence."""
    accumulator, loss_fn = MetricAccumulator(classifier.num_classes), nn.CrossEntropyLoss(reduction="sum")
    predicted, confidence, targets = [], [], []
    batches = tqdm(iter(loader), total=len(loader), desc="evaluate", unit="batch", disable=not progress_bar,
                   dynamic_ncols=True)  # iter() once: tqdm would iter() a loader twice, starting its workers twice
    for inputs, target in batches:
        logits = classifier(inputs)
        target = target.to(logits.device, non_blocking=True)
        accumulator.update(logits, target, loss_fn(logits, target).item())
        top = logits.argmax(dim=1)
        predicted.append(top.cpu())
        confidence.append(logits.softmax(dim=1).gather(1, top[:, None])[:, 0].cpu())
        targets.append(target.cpu())
    return Outputs(accumulator.result(), torch.cat(predicted), torch.cat(confidence), torch.cat(targets))


def per_class_metrics(confusion: torch.Tensor, class_names: list[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support of each named class from a confusion matrix (rows = true);
    0 where a ratio has nothing to divide by.

    >>> per_class_metrics(torch.tensor([[2, 0], [1, 1]]), ["a", "b"])["a"]
    {'precision': 0.6666666666666666, 'recall': 1.0, 'f1': 0.8, 'support': 2}
    """
    counts = confusion.double()
    hits, support, predicted = counts.diagonal(), counts.sum(dim=1), counts.sum(dim=0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, hits / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0)
    return {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                   "support": int(support[i])} for i, name in enumerate(class_names)}


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: over ``bins`` equal-width confidence bins ``(k/bins, (k+1)/bins]``, the image-weighted mean
    of ``|accuracy - mean confidence|`` (Guo et al., 2017).

    >>> confidence = torch.tensor([0.9, 0.9, 0.6, 0.6], dtype=torch.float64)
    >>> round(expected_calibration_error(confidence, torch.tensor([True, False, True, True])), 6)  # 2/4*0.4 + 2/4*0.4
    0.4
    """
    confidence, correct = confidence.double().clamp(0.0, 1.0), correct.double()
    which = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])  # (lo, hi]
    gap = torch.bincount(which, weights=correct, minlength=bins) - torch.bincount(which, weights=confidence,
                                                                                  minlength=bins)
    return gap.abs().sum().item() / max(len(confidence), 1)


def build_report(outputs: Outputs, classifier: Classifier, *, images: EvalImages, split: str,
                 batch_size: int) -> dict[str, Any]:
    """``metrics.json``: the metrics, the checkpoint (path, sha256) and what was evaluated."""
    result = outputs.result
    names = classifier.meta.class_names
    per_class = per_class_metrics(result.confusion, classifier.label_names)
    per_class = {name: per_class[name] for name in names}  # spare outputs (model.num_classes > classes): no class
    present = [m for m in per_class.values() if m["support"] > 0]
    return {
        "acc1": result.acc1, "acc5": result.acc5, "loss": result.loss,
        "macro_f1": sum(m["f1"] for m in present) / max(len(present), 1),
        "balanced_acc": sum(m["recall"] for m in present) / max(len(present), 1),
        "ece": expected_calibration_error(outputs.confidence, outputs.predicted == outputs.targets),
        "per_class": per_class, "num_images": int(outputs.targets.numel()), "class_names": list(names),
        "checkpoint": {"path": str(classifier.path.resolve()), "sha256": sha256_of(classifier.path)},
        "split": split, "split_source": images.source, "data_root": images.root, "batch_size": batch_size,
    }


# ------------------------------------------------------------ the report
def write_report(out_dir: Path, report: dict[str, Any], outputs: Outputs, samples: list[Sample], *,
                 label_names: list[str]) -> None:
    """The confusion matrix (JSON, PNG) and the misclassified images, then ``metrics.json``; each file
    written whole (atomically), ``metrics.json`` last."""
    from finetune.loggers import render_confusion

    confusion = outputs.result.confusion
    atomic_write_text(out_dir / "confusion_matrix.json", json.dumps(
        {"class_names": label_names, "rows": "true class", "columns": "predicted class",
         "matrix": confusion.tolist()}, indent=1) + "\n")
    image = Image.fromarray(render_confusion(confusion, label_names))
    atomic_write_stream(out_dir / "confusion_matrix.png", lambda f: image.save(f, format="PNG"))
    atomic_write_text(out_dir / "misclassified.csv", misclassified_csv(outputs, samples, label_names))
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
    log.info(f"evaluation written to {out_dir}: metrics.json, confusion_matrix.json/.png, misclassified.csv")


def misclassified_csv(outputs: Outputs, samples: list[Sample], label_names: list[str]) -> str:
    """``path,true,predicted,prob`` for every wrong top-1 prediction (``prob``: its confidence), in data order;
    a name that would start a spreadsheet formula gets a leading ``'`` (`finetune.files.csv_cell`)."""
    wrong = (outputs.predicted != outputs.targets).nonzero()[:, 0].tolist()
    return csv_text([["path", "true", "predicted", "prob"]] +
                    [[samples[i][0], label_names[outputs.targets[i]], label_names[outputs.predicted[i]],
                      f"{outputs.confidence[i].item():.6f}"] for i in wrong])


def format_table(report: dict[str, Any]) -> str:
    """Precision, recall, F1 and support per class, then the totals."""
    width = max(12, *(len(name) for name in report["per_class"]))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, m in report["per_class"].items():
        lines.append(f"{name:<{width}} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8}")
    present = [m for m in report["per_class"].values() if m["support"] > 0]
    precision = sum(m["precision"] for m in present) / max(len(present), 1)
    lines.append(f"{'macro avg':<{width}} {precision:>9.4f} {report['balanced_acc']:>9.4f} {report['macro_f1']:>9.4f} "
                 f"{report['num_images']:>8}")
    acc5 = "-" if report["acc5"] is None else f"{report['acc5']:.4f}"
    lines.append(f"acc1 {report['acc1']:.4f}  acc5 {acc5}  loss {report['loss']:.4f}  ece {report['ece']:.4f}  "
                 f"({report['num_images']} images, split {report['split']}: {report['split_source']})")
    return "\n".join(lines)


# ------------------------------------------------------------ multi-label models
def evaluate_label_sets(classifier: Classifier, images: EvalImages, *, thresholds: list[float],
                        settings: EvalSettings, num_workers: Any, progress_bar: bool, out_dir: Path) -> dict[str, Any]:
    """A multi-label model on ``images``: `Trainer.evaluate`'s pass (`MultilabelAccumulator`, the same
    val/loss and val/mAP), then ``metrics.json`` with mAP, F1 (macro, micro), exact match, Hamming loss and per
    class ap/precision/recall/f1/threshold/support at ``thresholds``."""
    from finetune.data.loaders import multi_hot
    from finetune.metrics import MultilabelAccumulator
    from finetune.trainer import multilabel_eval_loss

    samples = label_sets_of_checkpoint(images, classifier.meta.class_names)
    loader = eval_loader(multi_hot(samples, classifier.num_classes), classifier.meta, batch_size=settings.batch_size,
                         num_workers=num_workers)
    accumulator = MultilabelAccumulator(classifier.num_classes, thresholds=thresholds)
    loss_fn = multilabel_eval_loss(classifier.num_classes)
    with torch.no_grad():
        for inputs, target in tqdm(iter(loader), total=len(loader), desc="evaluate", unit="batch",
                                   disable=not progress_bar, dynamic_ncols=True):
            logits = classifier(inputs)
            target = target.to(logits.device)
            accumulator.update(logits, target, loss_fn(logits, target).item())
    result = accumulator.result()
    report = label_set_report(result, classifier.label_names) | {
        "num_images": len(samples), "class_names": list(classifier.meta.class_names),
        "checkpoint": {"path": str(classifier.path.resolve()), "sha256": sha256_of(classifier.path)},
        "split_source": images.source, "data_root": images.root, "batch_size": settings.batch_size}
    atomic_write_text(out_dir / "scores.csv", scores_csv(result, samples, classifier.label_names))
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
    log.info(f"evaluation written to {out_dir}: metrics.json, scores.csv")
    print(format_label_set_table(report))
    return report


def scores_csv(result: Any, samples: list[tuple[str, tuple[int, ...]]], names: list[str]) -> str:
    """``path,true,predicted,p:<class>...`` per image in data order: the sigmoid scores the metrics came from,
    at full precision (``repr``), so that any other tool recomputes the same numbers."""
    predicted = result.scores >= np.asarray(result.thresholds)[None, :]
    rows = [["path", "true", "predicted"] + [f"p:{n}" for n in names]]
    for i, (path, labels) in enumerate(samples):
        rows.append([path, ";".join(names[c] for c in labels), ";".join(n for n, p in zip(names, predicted[i]) if p)]
                    + [repr(float(v)) for v in result.scores[i]])
    return csv_text(rows)


def label_sets_of_checkpoint(images: EvalImages, class_names: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """The samples' label sets as the checkpoint's class indices (matched by name)."""
    extra = [c for c in images.class_names if c not in class_names]
    if extra:
        raise UserError(f"the data names classes the checkpoint does not know ({quote(extra)}): evaluate on a table "
                        "labelled with the classes the model was trained on")
    index = {name: i for i, name in enumerate(class_names)}
    return [(path, tuple(sorted(index[images.class_names[c]] for c in labels))) for path, labels in images.samples]


def label_set_report(result: Any, names: list[str]) -> dict[str, Any]:
    """``metrics.json``'s numbers for label sets (a class is predicted at probability >= its threshold)."""
    from finetune.metrics import precision_recall

    predicted = result.scores >= np.asarray(result.thresholds)[None, :]
    targets = result.targets
    tp, fp, fn = ((predicted & targets).sum()), ((predicted & ~targets).sum()), ((~predicted & targets).sum())
    per_class = {}
    for c, name in enumerate(names):
        precision, recall = precision_recall(predicted[:, c], targets[:, c])
        per_class[name] = {"ap": result.per_class_ap[c], "precision": precision, "recall": recall,
                           "f1": result.per_class_f1[c], "threshold": result.thresholds[c],
                           "support": int(targets[:, c].sum())}
    return {"task": "multilabel", "mAP": result.mAP, "f1_macro": result.f1,
            "f1_micro": float(2 * tp / max(2 * tp + fp + fn, 1)), "exact_match": result.exact_match,
            "hamming_loss": float((predicted != targets).mean()) if targets.size else 0.0, "loss": result.loss,
            "per_class": per_class}


def format_label_set_table(report: dict[str, Any]) -> str:
    """AP, precision, recall, F1, threshold and support per class, then the totals."""
    width = max(12, *(len(name) for name in report["per_class"]))
    lines = [f"{'class':<{width}} {'ap':>7} {'precision':>9} {'recall':>7} {'f1':>7} {'thresh':>7} {'support':>8}"]
    for name, m in report["per_class"].items():
        ap = "-" if m["ap"] is None else f"{m['ap']:.4f}"
        lines.append(f"{name:<{width}} {ap:>7} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} "
                     f"{m['threshold']:>7.4f} {m['support']:>8}")
    lines.append(f"mAP {report['mAP']:.4f}  f1 macro {report['f1_macro']:.4f} micro {report['f1_micro']:.4f}  "
                 f"exact match {report['exact_match']:.4f}  hamming {report['hamming_loss']:.4f}  loss "
                 f"{report['loss']:.4f}  ({report['num_images']} images, {report['split_source']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
