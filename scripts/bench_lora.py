"""Accuracy of ``adapter=lora`` against full fine-tuning of a ViT, on generated images (no download).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_lora.py                 # test_vit, the defaults below

No pretrained ViT may be downloaded, so the script makes one: the ViT (random init) is first trained in full on
a generated set, and its ``best.safetensors`` is then the pretrained weights (``model.weights=``) of every
compared run on another generated set. The project's shape sets (``data=demo``, as in bench_fewshot.py) were
tried first: a tiny ViT trained from scratch stays at chance on them (test_vit, 64 px, 200 images a class, lr
2e-3, 13 epochs: val/acc1 0.24-0.31 with 4 classes), so the pretraining could not give features to transfer.
The sets here are learnable from scratch: a square of the class's colour (hue jittered, brightness varied)
at a random place on noise, with a smaller square of another palette colour as a distractor. Pretraining:
the 4 even hues of an 8-hue wheel; the compared task: all 8 (4 never seen), other images. Configurations (same
epochs, batch, schedule, seed): ``full`` (every parameter trains) and ``lora`` (``adapter=lora``, r 8), each at
lr 1e-3 and 3e-3 (LoRA usually wants a larger rate). Reported: the best ``val/acc1`` of each (mean over seeds),
LoRA's margin against full fine-tuning at the same rate and best rate against best rate (target: within
0.02), and the parameters each trains.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from finetune.__main__ import CONFIG_DIR
from finetune.run import run

HUES = 8  # the colour wheel the classes take their hues from
CONFIGS = {"full": [], "full lr x3": ["optim.lr=3e-3"], "lora": ["adapter=lora"],
           "lora lr x3": ["adapter=lora", "optim.lr=3e-3"]}


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def colour(hue: float, rng: np.random.Generator) -> tuple[int, ...]:
    """The class's hue, jittered by up to a quarter of the step between classes, at a random brightness."""
    h = (hue + rng.uniform(-0.25, 0.25) / HUES) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)))


def make_set(root: Path, *, hues: list[int], per_class: int, size: int, seed: int) -> Path:
    """``root/{train,val}/hue<k>/<i>.png``: the class's square (a third of the side) at a random place on noise,
    and a smaller distractor square of another palette hue; 20 validation images per class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 20)):
        for k in hues:
            folder = root / split / f"hue{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                for side, hue in ((size // 3, k), (size // 5, rng.choice([h for h in range(HUES) if h != k]))):
                    x, y = rng.integers(0, size - side, 2)
                    pixels[y:y + side, x:x + side] = colour(hue / HUES, rng)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def one_run(extra: list[str], *, root: Path, epochs: int, seed: int, args: argparse.Namespace, run_dir: Path) -> dict:
    overrides = ["model=vit_small_patch16_224", f"model.name={args.model}", "model.pretrained=false", "data=custom",
                 f"data.root={root}", f"data.img_size={args.img_size}", "data.batch_size=16", "data.num_workers=0",
                 f"trainer.max_epochs={epochs}", f"seed={seed}", "logger.progress_bar=false", *extra]
    started = time.perf_counter()
    final = run(compose_config(overrides), run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    trainable = re.search(r"params\s+([\d,]+) of ([\d,]+) trainable", (run_dir / "train.log").read_text())
    return {"best": summary["best"]["value"], "final": final["val/acc1"], "seconds": time.perf_counter() - started,
            "trainable": int(trainable.group(1).replace(",", "")), "total": int(trainable.group(2).replace(",", ""))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_vit", help="a timm ViT, random init (no download)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--pretrain-per-class", type=int, default=100)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        pre_root = make_set(Path(tmp) / "pretrain-set", hues=list(range(0, HUES, 2)), per_class=args.pretrain_per_class,
                            size=args.img_size, seed=100)
        pre = one_run([], root=pre_root, epochs=args.pretrain_epochs, seed=0, args=args, run_dir=Path(tmp) / "pretrain")
        weights = Path(tmp) / "pretrain" / "checkpoints" / "best.safetensors"
        print(json.dumps({"pretrain": pre}), flush=True)
        for per_class in args.per_class:
            root = make_set(Path(tmp) / f"set-{per_class}", hues=list(range(HUES)), per_class=per_class,
                            size=args.img_size, seed=per_class)
            for seed in args.seeds:
                for name, extra in CONFIGS.items():
                    result = one_run([f"model.weights={weights}", *extra], root=root, epochs=args.epochs, seed=seed,
                                     args=args, run_dir=Path(tmp) / f"run-{time.monotonic_ns()}")
                    rows.append({"per_class": per_class, "seed": seed, "config": name, **result})
                    print(json.dumps(rows[-1]), flush=True)
    print_table(rows, pre=pre, args=args)


def print_table(rows: list[dict], *, pre: dict, args: argparse.Namespace) -> None:
    print(f"\n{args.model} at {args.img_size} px, pretrained on 4 hues ({args.pretrain_per_class}/class, "
          f"{args.pretrain_epochs} epochs: best val/acc1 {pre['best']:.3f}); fine-tuned on 8 hues, "
          f"{args.epochs} epochs, seeds {args.seeds}")
    print("| per class | " + " | ".join(CONFIGS) + " | LoRA - full, lr 1e-3 | best LoRA - best full "
          "| trainable (full / LoRA) |")
    print("|---:|" + "---:|" * len(CONFIGS) + "---:|---:|---|")
    worst = float("inf")
    for per_class in args.per_class:
        cell = [r for r in rows if r["per_class"] == per_class]
        mean = {n: statistics.mean(r["best"] for r in cell if r["config"] == n) for n in CONFIGS}
        margin = max(mean["lora"], mean["lora lr x3"]) - max(mean["full"], mean["full lr x3"])
        worst = min(worst, margin)
        count = {r["config"]: r["trainable"] for r in cell}
        print(f"| {per_class} | " + " | ".join(f"{mean[n]:.3f}" for n in CONFIGS)
              + f" | {mean['lora'] - mean['full']:+.3f} | {margin:+.3f} | {count['full']:,} / {count['lora']:,} |")
    print(f"\nbest_lora_minus_best_full_worst_cell: {worst:+.3f} (target >= -0.02)")


if __name__ == "__main__":
    main()
