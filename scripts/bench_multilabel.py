"""Multi-label: ``task=multilabel`` against a plain timm BCE loop, same data, same start, same budget.

    PYTHONPATH=. python scripts/bench_multilabel.py                    # 240 images, 4 classes, 4 epochs
    PYTHONPATH=. python scripts/bench_multilabel.py --images 400 --epochs 6 --seeds 0 1

The data is the tests' generated multi-label set (``tests/conftest.py``: ``make_multilabel_table``, a
coloured square per class in its own quadrant, any subset of the classes per image, none too) at
``--size`` px. Both sides start from the same pretrained ``tf_efficientnet_lite0`` (the packaged
ImageNet weights, ``model.weights=builtin:efficientnet_lite0``), train ``--epochs`` epochs in batches of
16 at ``--img-size``, and are scored on the same validation images (the run's ``split.json``) with
scikit-learn's ``average_precision_score(average="macro")``.

- finetune: ``python -m finetune data=table task=multilabel`` with its defaults (AdamW 1e-3, weight decay
  0.05 off norms and biases, cosine schedule with half an epoch of warm-up, timm's train transform).
- plain: the loop a user writes from timm's docs: the same model and weights, ``timm.data.create_transform``,
  ``torch.optim.AdamW(lr=1e-3, weight_decay=0.05)``, no schedule, ``BCEWithLogitsLoss``, shuffled batches.

Printed: per side the mean best and final val mAP over seeds, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import compose_config, make_multilabel_table  # noqa: E402

from finetune.run import run  # noqa: E402


def finetune_side(table: Path, out: Path, args: argparse.Namespace, seed: int) -> tuple[list[float], dict]:
    overrides = ["data=table", f"data.file={table}", "task=multilabel", f"data.img_size={args.img_size}",
                 "data.batch_size=16", "data.num_workers=0", f"trainer.max_epochs={args.epochs}", f"seed={seed}",
                 "logger.progress_bar=false"]
    run(compose_config(overrides), run_dir=out)
    maps = [json.loads(line)["val/mAP"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return maps, json.loads((out / "split.json").read_text())


def plain_side(split: dict, args: argparse.Namespace, seed: int) -> list[float]:
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from finetune.weights import load_pretrained

    torch.manual_seed(seed)
    classes = len(split["class_names"])
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=classes)
    load_pretrained(model, "builtin:efficientnet_lite0")
    config = resolve_data_config({}, model=model) | {"input_size": (3, args.img_size, args.img_size)}
    train_tf, eval_tf = create_transform(**config, is_training=True), create_transform(**config)
    root = Path(split["root"])

    def batch(items, transform):
        images = torch.stack([transform(Image.open(root / p).convert("RGB")) for p, _ in items])
        target = torch.zeros(len(items), classes)
        for i, (_, labels) in enumerate(items):
            target[i, labels] = 1.0
        return images, target

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train, val = split["files"]["train"], split["files"]["val"]
    maps = []
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train)).tolist()
        for start in range(0, len(order), 16):
            images, target = batch([train[i] for i in order[start:start + 16]], train_tf)
            optimizer.zero_grad()
            loss_fn(model(images), target).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            scores, targets = [], []
            for start in range(0, len(val), 16):
                images, target = batch(val[start:start + 16], eval_tf)
                scores.append(torch.sigmoid(model(images)))
                targets.append(target)
        scores, targets = torch.cat(scores).numpy(), torch.cat(targets).numpy()
        present = targets.any(axis=0)
        maps.append(float(average_precision_score(targets[:, present], scores[:, present], average="macro")))
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="generated image side")
    parser.add_argument("--img-size", type=int, default=64, help="model input side")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    results: dict[str, list] = {"finetune task=multilabel": [], "plain timm BCE loop": []}
    with tempfile.TemporaryDirectory(prefix="bench-multilabel-") as tmp:
        table = make_multilabel_table(Path(tmp) / "data", images=args.images, size=args.size, classes=args.classes)
        for seed in args.seeds:
            started = time.perf_counter()
            maps, split = finetune_side(table, Path(tmp) / f"run{seed}", args, seed)
            results["finetune task=multilabel"].append((maps, time.perf_counter() - started))
            started = time.perf_counter()
            results["plain timm BCE loop"].append((plain_side(split, args, seed), time.perf_counter() - started))
    print(f"{args.images} images ({len(split['files']['val'])} val), {args.classes} classes, {args.epochs} epochs, "
          f"batch 16, {args.img_size} px, seeds {args.seeds}")
    print(f"{'side':<26} {'best val mAP':>12} {'final val mAP':>14} {'seconds':>8}")
    for side, runs in results.items():
        best = statistics.mean(max(m) for m, _ in runs)
        final = statistics.mean(m[-1] for m, _ in runs)
        seconds = statistics.mean(s for _, s in runs)
        print(f"{side:<26} {best:>12.4f} {final:>14.4f} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
