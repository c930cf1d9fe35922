"""``python -m finetune.predict ckpt=PATH inputs=FILE_OR_DIR_OR_GLOB [topk=5] [tta=hflip]``: classify images.

Writes ``predictions.csv`` into its run dir (``hydra.run.dir``), one row per image:
``path, label, prob, top2, prob2, ...`` up to ``topk`` classes. Images go through training's own
validation loader (`eval_loader`): read upright by their EXIF orientation in the model's channels
(as `finetune.inference.read_image`), preprocessed by the checkpoint's own evaluation transform, so
``predict`` and ``finetune.evaluate`` give the same probabilities for the same file. ``ckpt`` is
anything `finetune.inference.load_checkpoint` takes, or an ``.onnx`` file exported by
``python -m finetune.export`` (run with onnxruntime).

From Python::

    >>> rows = predict("outputs/2026-11-28/10-00-00", "photos/", topk=3)  # doctest: +SKIP
    >>> rows[0]["label"], rows[0]["prob"]                                 # doctest: +SKIP

The classifier and the loader are `finetune.inference`'s, shared with ``finetune.evaluate``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from finetune.cli import exit_on_user_error
from finetune.config import CONFIG_PACKAGE
from finetune.data.folder import IMAGE_EXTENSIONS, find_unreadable_images
from finetune.errors import UserError
from finetune.files import GLOB_CHARS, atomic_write_text, csv_text, glob_files, walk_files
from finetune.inference import Classifier, checkpoint_file, eval_loader, load_classifier, output_dir

log = logging.getLogger("finetune")

MAX_LISTED = 10  # file names a warning or an error lists before "and N more"
# Test-time augmentation: the views of a preprocessed batch whose softmax outputs are averaged.
TTA_VIEWS: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "none": lambda batch: [batch],
    "hflip": lambda batch: [batch, batch.flip(dims=[3])],
}


@dataclass
class PredictConfig:
    """The keys of ``conf/predict.yaml`` (a typo fails before any work, naming the key)."""

    ckpt: Optional[str] = None  # run dir | best/last.safetensors | last.ckpt | exported .onnx
    inputs: Any = None  # an image file, a folder (recursive), a glob, or a list of them
    topk: int = 5  # classes per image, capped at the number of classes
    batch_size: int = 64
    tta: str = "none"  # none | hflip
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: Any = 2  # image-loading processes (0: in this process), or auto (as data.num_workers)
    progress_bar: bool = True
    out: Optional[str] = None  # where to write predictions.csv; null: RUN_DIR/predict/<date_time>/ beside the run
    thresholds: Any = None  # multi-label: null (the model's tuned thresholds), a number, a list, or a file


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


# ------------------------------------------------------------ the images
def find_images(inputs: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The image files ``inputs`` names: files, folders (recursive, sorted) or globs (``**`` recursive).

    Files without an image extension, and images that cannot be decoded, are left out with one
    warning listing them. No image at all is one line naming ``inputs``.
    """
    entries = [inputs] if isinstance(inputs, (str, Path)) else list(inputs or [])
    if not entries or any(str(e) == "" for e in entries):
        raise UserError("inputs is required: pass inputs=IMAGE, inputs=DIR (searched recursively) or "
                        "inputs='DIR/*.jpg' (a glob)")
    files = list(dict.fromkeys(p for entry in entries for p in expand_input(str(entry))))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    unreadable = dict(find_unreadable_images([str(p) for p in images]))
    readable = [p for p in images if str(p) not in unreadable]
    if not readable:
        found = f"found only {len(files)} other file(s): {listing(files)}" if files else "found no files"
        raise UserError(f"inputs '{inputs}' has no images to predict ({found}): give image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}), a folder of them or a glob")
    if others or unreadable:
        parts = ([f"not images: {listing(others)}"] if others else []) + \
                ([f"unreadable: {listing(list(unreadable.items()))}"] if unreadable else [])
        log.warning(f"skipped {len(others) + len(unreadable)} of {len(files)} files ({'; '.join(parts)})")
    return readable


def expand_input(entry: str) -> list[Path]:
    """One entry of ``inputs``: a file, every file under a folder (`files_under`), or a glob's matches
    (a matched folder: every file under it)."""
    path = Path(entry).expanduser()
    if path.is_dir():
        return files_under(path)
    if path.is_file():
        return [path]
    if not GLOB_CHARS & set(entry):
        raise UserError(f"inputs '{entry}' does not exist: give an image file, a folder or a glob such as "
                        "'photos/**/*.jpg'")
    matches = glob_files(os.path.expanduser(entry))
    if not matches:
        raise UserError(f"inputs '{entry}' matches no file: check the pattern (quote it so that the shell "
                        "does not expand it; '**' matches folders recursively)")
    return matches


def files_under(folder: Path) -> list[Path]:
    """Files under ``folder``, recursively and sorted; hidden files and folders skipped; each real folder
    listed once, however many links lead to it (`finetune.files.walk_files`)."""
    return sorted(Path(p) for p in walk_files(folder))


def listing(items: Sequence[Any]) -> str:
    """``'a', 'b' and 3 more``; ``(path, reason)`` pairs as ``'a' (reason)``."""
    shown = [f"'{i[0]}' ({i[1]})" if isinstance(i, tuple) else f"'{i}'" for i in items[:MAX_LISTED]]
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(shown) + more


# ------------------------------------------------------------ predicting
def predict(ckpt: str | Path, inputs: str | Path | Sequence[str | Path], *, topk: int = 5, batch_size: int = 64,
            tta: str = "none", device: str = "auto", num_workers: int | str = 0,
            progress_bar: bool = False, thresholds: Any = None) -> list[dict[str, Any]]:
    """Classify the images ``inputs`` names with the model in ``ckpt``.

    Returns:
        One dict per image, in input order, with the columns of ``predictions.csv``: ``path``,
        ``label`` (top-1 class name), ``prob``, then ``top2``, ``prob2``, ... up to ``topk``
        (capped at the number of classes). With ``tta="hflip"`` the probabilities are the mean
        of the softmax of each image and of its mirror image. A multi-label model: ``path``, ``labels``
        (the classes at or above their threshold, joined by ``;``), then ``p:<class>`` per class (sigmoid).
    """
    check_options(topk=topk, batch_size=batch_size, tta=tta)
    classifier = load_classifier(ckpt, device=device)
    paths = find_images(inputs)
    probs = predict_probabilities(classifier, paths, batch_size=batch_size, tta=tta, num_workers=num_workers,
                                  progress_bar=progress_bar)
    if classifier.multilabel:
        return label_set_rows(paths, probs, classifier.label_names, thresholds=classifier.thresholds(thresholds))
    return top_k_rows(paths, probs, classifier.label_names, topk=topk)


def check_options(*, topk: int, batch_size: int, tta: str) -> None:
    for key, value in (("topk", topk), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive integer, got '{value}'")
    if tta not in TTA_VIEWS:
        raise UserError(f"tta must be one of {' | '.join(TTA_VIEWS)}, got '{tta}'")


@torch.no_grad()
def predict_probabilities(classifier: Classifier, paths: Sequence[Path], *, batch_size: int, tta: str = "none",
                          num_workers: int | str = 0, progress_bar: bool = False) -> torch.Tensor:
    """Softmax probabilities ``[len(paths), num_classes]`` (multi-label: sigmoid), averaged over the ``tta``
    views of each image."""
    loader = eval_loader([(str(p), 0) for p in paths], classifier.meta, batch_size=batch_size,
                         num_workers=num_workers)
    probs = []
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress_bar, dynamic_ncols=True) as bar:
        for batch, _ in loader:
            probs.append(batch_probabilities(classifier, batch, tta=tta))
            bar.update(batch.shape[0])
    return torch.cat(probs)


@torch.no_grad()
def batch_probabilities(classifier: Classifier, batch: torch.Tensor, *, tta: str = "none") -> torch.Tensor:
    """The probabilities of one preprocessed batch ``(N, C, H, W)``, on the CPU: the softmax of the logits
    (a multi-label model's sigmoid), averaged over the ``tta`` views. ``finetune.serve`` answers with exactly
    these."""
    views = [classifier.probabilities(classifier(view)) for view in TTA_VIEWS[tta](batch)]
    return torch.stack(views).mean(dim=0).cpu()


def top_k_rows(paths: Sequence[Path], probs: torch.Tensor, label_names: list[str], *, topk: int) -> list[dict]:
    """``{path, label, prob, top2, prob2, ...}`` per image, ``topk`` capped at the number of classes."""
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    rows = []
    for path, ps, ks in zip(paths, values.tolist(), indices.tolist()):
        row: dict[str, Any] = {"path": str(path), "label": label_names[ks[0]], "prob": ps[0]}
        for rank, (p, k) in enumerate(zip(ps[1:], ks[1:]), start=2):
            row |= {f"top{rank}": label_names[k], f"prob{rank}": p}
        rows.append(row)
    return rows


def label_set_rows(paths: Sequence[Path], probs: torch.Tensor, label_names: list[str], *,
                   thresholds: list[float]) -> list[dict]:
    """``{path, labels, p:<class>...}`` per image: the classes whose probability reaches their threshold."""
    rows = []
    for path, ps in zip(paths, probs.tolist()):
        chosen = [name for name, p, t in zip(label_names, ps, thresholds) if p >= t]
        rows.append({"path": str(path), "labels": ";".join(chosen)} | {f"p:{n}": p for n, p in zip(label_names, ps)})
    return rows


def predictions_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (probabilities with 6 decimals); a path or class name that would start a
    spreadsheet formula gets a leading ``'`` (`finetune.files.csv_cell`)."""
    columns = list(rows[0])
    return csv_text([columns] + [[f"{v:.6f}" if isinstance(v, float) else v for v in row.values()] for row in rows])


# ------------------------------------------------------------ the app
def run(cfg: DictConfig, out_dir: str | Path | None = None) -> Path:
    """Predict as ``cfg`` says; writes ``predictions.csv`` into ``out_dir`` (default: ``cfg.out``, else beside
    the checkpoint's run, `finetune.inference.output_dir`)."""
    rows = predict(cfg.ckpt, OmegaConf.to_object(cfg.inputs) if OmegaConf.is_config(cfg.inputs) else cfg.inputs,
                   topk=cfg.topk, batch_size=cfg.batch_size, tta=cfg.tta, device=cfg.device,
                   num_workers=cfg.num_workers, progress_bar=cfg.progress_bar, thresholds=cfg.thresholds)
    path = output_dir(out_dir or cfg.out, checkpoint=checkpoint_file(cfg.ckpt), kind="predict") / "predictions.csv"
    atomic_write_text(path, predictions_csv(rows))
    log.info(f"predicted {len(rows)} images, written to {path}")
    return path


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg))


if __name__ == "__main__":
    main()
