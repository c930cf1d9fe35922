"""Few-shot fine-tuning: ``optim.lr=auto`` against the usual simple recipes, on generated data sets of three difficulties.

    PYTHONPATH=. python scripts/bench_fewshot.py                                  # the whole grid (long)
    PYTHONPATH=. python scripts/bench_fewshot.py --sets easy --per-class 5 --seeds 0 --out /tmp/fewshot.jsonl
    PYTHONPATH=. python scripts/bench_fewshot.py --table /tmp/fewshot.jsonl       # the table of saved results

Data: the project's generated shape sets (``finetune.data.ensure_demo_dataset``, shapes on cluttered
backgrounds; only the outline tells classes apart), three difficulties: ``easy`` 4 classes,
``medium`` 6, ``hard`` 8 (arrow and crescent added), each drawn from its own demo seed, with
``--per-class`` training images per class and 20 validation images per class. ``--sets digits`` adds other
data, never used to tune ``auto``: scikit-learn's handwritten digits (10 classes, 8x8 grey scans upscaled;
shipped in the package, nothing is downloaded), drawn the same way per seed. The model is the
default one (``tf_efficientnet_lite0``, packaged ImageNet weights) at ``--img-size``; every
configuration gets the same budget (``--epochs``, batch 16; ``auto``'s search comes on top and is
reported). Each seed draws its own training and validation images (the set's demo seed + 1000 x seed;
seed 0 keeps the set's own), as few-shot results are averaged over draws of the few shots: a cell's mean
is over one training pool and one validation set per seed, and the seed also varies the run
(initialisation, augmentation, order, ``auto``'s held-out slices). ``--fixed-data`` keeps every seed on
the set's own images (the grid of the first four passes in ``docs/benchmarks.md``): then the seeds vary
the run alone, and a cell is one pool judged three times. ``--draw-data`` is the default and still accepted.
Configurations: the defaults (lr 1e-3, nothing frozen), ``freeze=head_only``,
``optim.lr`` x3 (3e-3), ``optim.lr=auto`` (trials over the rates and the backbone frozen: the default) and
``optim.lr=auto optim.lr_find.select=curve`` (the range test's rule alone, as before issue 26); and, asked for
by ``--configs``, ``auto (rates only)`` (``optim.lr_find.freeze_candidates=[]``: the trials before they chose
the freezing), ``auto (one slice)`` (``optim.lr_find.final_folds=1``: the finalists judged on one held-out slice,
as before they were judged on several), the ``data.augment`` presets (``augment=none`` ... ``augment=heavy``, each with its own crop
scale, not the demo's 0.35-1), and three fixed recipes measured as alternatives to choosing: ``lp-ft``
(``freeze=gradual``: the head alone for 2 epochs, then everything), ``backbone x0.1`` (the backbone at a tenth
of the head's rate) and ``head x10`` (the head at 1e-2, the backbone at 1e-3).

Each run goes through ``finetune.run.run`` in this process; each result is appended to ``--out``
(JSON lines) as soon as it exists, so an interrupted grid keeps what it did (run the same command again to
continue it: what ``--out`` holds is not run again), and ``--table`` prints
the table of any such file: per cell the mean best ``val/acc1`` over seeds, ``auto``'s margin
against the best of {defaults, head_only, lr x3} (target >= -0.02) and against the defaults (target
>= -0.02), and the rate (and freezing) ``auto`` chose; then ``auto``'s single runs against the recipes
run on the same images with the same seed; then the ``val/loss`` at the best epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from finetune.__main__ import CONFIG_DIR
from finetune.run import run

CONFIGS = {
    "defaults": [],
    "head_only": ["freeze=head_only"],
    "lr x3": ["optim.lr=3e-3"],
    "auto": ["optim.lr=auto"],
    "auto (curve)": ["optim.lr=auto", "optim.lr_find.select=curve"],
    "auto (rates only)": ["optim.lr=auto", "optim.lr_find.freeze_candidates=[]"],
    "auto (one slice)": ["optim.lr=auto", "optim.lr_find.final_folds=1"],
    "lp-ft": ["freeze=gradual"],
    "backbone x0.1": ["optim.backbone_lr_mult=0.1"],
    "head x10": ["optim.head_lr=1e-2"],
    # the augmentation presets at the defaults' rate (issue 26, item 2): --configs augment=none augment=light ...
    **{f"augment={name}": [f"data.augment={name}", "data.crop_scale=null"] for name in ("none", "light", "medium", "heavy")},
}
BASELINES = ("defaults", "head_only", "lr x3")
SETS = {"easy": {"num_classes": 4, "seed": 11}, "medium": {"num_classes": 6, "seed": 12},
        "hard": {"num_classes": 8, "seed": 13},
        # other data, asked for by --sets digits: scikit-learn's handwritten digits (needs scikit-learn)
        "digits": {"num_classes": 10, "seed": 14}}
GENERATED = ("easy", "medium", "hard")  # the sets the target is read on (the default --sets)
DRAW_STRIDE = 1000  # run seed s draws the set's images with demo seed (the set's seed + 1000 s), unless --fixed-data


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def data_seed(data: str, seed: int, *, draw: bool) -> int:
    """The demo seed of ``data``'s images for the run seed ``seed``: one per seed (seed 0 keeps the set's own
    images), or with ``--fixed-data`` the set's own (every seed sees the same images)."""
    return SETS[data]["seed"] + (DRAW_STRIDE * seed if draw else 0)


def digits_folder(root: Path, *, seed: int, per_class: int, size: int, val_per_class: int = 20) -> Path:
    """scikit-learn's handwritten digits (the UCI set: 1797 grey 8x8 images of 10 digits, shipped inside the package,
    so nothing is downloaded) as ``root/train/<digit>`` and ``root/val/<digit>``: per digit, ``per_class`` training and
    ``val_per_class`` validation images drawn without replacement by ``seed``, upscaled to ``size`` px (bicubic).
    Written once per draw; a folder that exists is reused."""
    import numpy as np
    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--sets digits reads scikit-learn's digits: pip install scikit-learn") from None
    folder = root.expanduser() / f"digits-{seed}-{per_class}-{val_per_class}-{size}"
    if folder.is_dir():
        return folder
    digits = load_digits()
    rng = np.random.default_rng(seed)
    staging = folder.with_name(folder.name + f".partial-{time.monotonic_ns()}")
    for digit in range(10):
        picks = rng.permutation(np.flatnonzero(digits.target == digit))[:per_class + val_per_class]
        for i, index in enumerate(picks):
            split = "train" if i < per_class else "val"
            (staging / split / str(digit)).mkdir(parents=True, exist_ok=True)
            grey = (255 - digits.images[index] * 255 / 16).astype(np.uint8)  # dark ink on white, as on paper
            Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB").save(
                staging / split / str(digit) / f"{index}.png")
    staging.rename(folder)  # a draw is complete or absent: an interrupted write leaves only a .partial folder
    return folder


def one_run(extra: list[str], *, data: str, per_class: int, seed: int, demo_seed: int, args: argparse.Namespace,
            out: Path) -> dict:
    if data == "digits":  # the same budget; the crop keeps most of the digit, and no flips (a flipped 2 is no 2)
        folder = digits_folder(args.cache, seed=demo_seed, per_class=per_class, size=args.img_size)
        data_overrides = ["data=custom", f"data.root={folder}", "data.crop_scale=[0.5,1.0]", "data.hflip=0.0"]
    else:
        data_overrides = [f"data.demo.num_classes={SETS[data]['num_classes']}", f"data.demo.seed={demo_seed}",
                          f"data.demo.train_per_class={per_class}", "data.demo.val_per_class=20",
                          f"data.demo.image_size={args.img_size}", f"data.cache_dir={args.cache.expanduser()}"]
    overrides = [*data_overrides, f"data.img_size={args.img_size}", "data.batch_size=16", "data.num_workers=0",
                 f"trainer.max_epochs={args.epochs}", f"seed={seed}", "logger.progress_bar=false", *extra]
    run_dir = out / f"run-{time.monotonic_ns()}"
    started = time.perf_counter()
    final = run(compose_config(overrides), run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    lr_find = summary.get("lr_find") or {}
    record = json.loads((run_dir / "lr_find.json").read_text()) if (run_dir / "lr_find.json").exists() else {}
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at_best = next(e for e in epochs if e["epoch"] == summary["best"]["epoch"])
    return {"best": summary["best"]["value"], "final": final["val/acc1"], "best_loss": at_best["val/loss"],
            "final_loss": final["val/loss"], "seconds": time.perf_counter() - started, "lr": lr_find.get("lr"),
            "freeze": lr_find.get("freeze"), "search_seconds": (record.get("trials") or {}).get("seconds"),
            "rungs": (record.get("trials") or {}).get("rungs")}


def print_table(rows: list[dict]) -> None:
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[(row["set"], row["per_class"])][row["config"]].append(row)
    names = [n for n in CONFIGS if any(n in c for c in cells.values())]
    print_accuracy(cells, names)
    print_single_runs(rows)
    print_losses(cells, names)


def in_order(cells: dict[tuple, dict[str, list[dict]]]) -> list[tuple[tuple, dict[str, list[dict]]]]:
    order = {name: i for i, name in enumerate(SETS)}
    return sorted(cells.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))


def print_losses(cells: dict[tuple, dict[str, list[dict]]], names: list[str]) -> None:
    """Mean ``val/loss`` at the best epoch per cell (``-`` where a result was recorded without it), and auto's
    search time."""
    print("\n| set | per class | " + " | ".join(f"{n} val/loss" for n in names) + " | auto's search (s) |")
    print("|---|---:|" + "---:|" * len(names) + "---:|")
    for (data, per_class), by_config in in_order(cells):
        shown = []
        for n in names:
            losses = [r.get("best_loss") for r in by_config.get(n, [])]
            shown.append(f"{statistics.mean(losses):.3f}" if losses and None not in losses else "-")
        searches = [r["search_seconds"] for r in by_config.get("auto", []) if r.get("search_seconds") is not None]
        search = f"{statistics.mean(searches):.0f}" if searches else "-"
        print(f"| {data} | {per_class} | " + " | ".join(shown) + f" | {search} |")


def draw_of(row: dict) -> tuple[int, int]:
    """The run seed and the images' demo seed of a recorded run (records from before --draw-data: the set's own)."""
    return row["seed"], row.get("data_seed", SETS[row["set"]]["seed"])


def print_single_runs(rows: list[dict]) -> None:
    """``auto``'s runs one by one, each against the recipes run on the same images with the same seed: a user has
    one pool, so a cell's mean can hide a run that lost."""
    by_run: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        by_run[(row["set"], row["per_class"], *draw_of(row))][row["config"]] = row["best"]
    paired = [(key, r) for key, r in by_run.items() if "auto" in r and all(b in r for b in BASELINES)]
    if not paired:
        return
    to_best = [(r["auto"] - max(r[b] for b in BASELINES), key) for key, r in paired]
    to_default = [r["auto"] - r["defaults"] for _, r in paired]
    worst, (data, per_class, seed, _) = min(to_best)
    print(f"\nauto's single runs ({len(paired)} with every baseline on the same images and seed):")
    print(f"- at or above that run's best recipe: {sum(m >= 0 for m, _ in to_best)} of {len(paired)}")
    print(f"- more than 0.02 below it: {sum(m < -0.02 for m, _ in to_best)}; more than 0.03 below: "
          f"{sum(m < -0.03 for m, _ in to_best)}; the worst {worst:+.3f} ({data} {per_class}, seed {seed})")
    print(f"- below the defaults: {sum(m < 0 for m in to_default)} of {len(paired)}; the worst {min(to_default):+.3f}")


def print_accuracy(cells: dict[tuple, dict[str, list[dict]]], names: list[str]) -> None:
    """Mean best ``val/acc1`` per cell, auto's margins against the targets, and what auto chose."""
    print("| set | per class | seeds | " + " | ".join(names)
          + " | auto - best baseline | auto - defaults | auto's choices |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---|")
    worst_best, worst_default = float("inf"), float("inf")
    for (data, per_class), by_config in in_order(cells):
        means = {n: statistics.mean(r["best"] for r in by_config[n]) for n in names if by_config.get(n)}
        shown = [f"{means[n]:.3f} ± {statistics.pstdev([r['best'] for r in by_config[n]]):.3f}" if n in means else "-"
                 for n in names]
        seeds = max(len(v) for v in by_config.values())
        margin = margin_default = "-"
        judged = ("auto", *BASELINES)
        if all(n in means for n in judged):
            # the margins compare runs on the same draws: a grid still running has more baseline runs than auto's
            draws = {n: {draw_of(r) for r in by_config[n]} for n in judged}
            shared = set.intersection(*draws.values())
            paired = {n: statistics.mean(r["best"] for r in by_config[n] if draw_of(r) in shared)
                      for n in judged} if shared else {}
            if paired:
                margin = paired["auto"] - max(paired[b] for b in BASELINES)
                margin_default = paired["auto"] - paired["defaults"]
                worst_best, worst_default = min(worst_best, margin), min(worst_default, margin_default)
                partial = "" if all(d == shared for d in draws.values()) else f" (on the {len(shared)} shared draws)"
                margin, margin_default = f"{margin:+.3f}{partial}", f"{margin_default:+.3f}{partial}"
        rates = ", ".join(f"{r['lr']:.2g}" + (f" {r['freeze']}" if r.get("freeze") else "")
                          for r in by_config.get("auto", []))
        print(f"| {data} | {per_class} | {seeds} | " + " | ".join(shown) + f" | {margin} | {margin_default} | {rates} |")
    if worst_best != float("inf"):
        print(f"\nfewshot_auto_minus_best_baseline_worst_cell: {worst_best:+.3f} (target >= -0.02)")
        print(f"fewshot_auto_minus_defaults_worst_cell: {worst_default:+.3f} (target >= -0.02)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(GENERATED), choices=list(SETS),
                        help="the generated shape sets (the default), and digits: other data, never used to tune auto")
    parser.add_argument("--per-class", type=int, nargs="+", default=[5, 10, 20], help="training images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=[*CONFIGS][:5], choices=list(CONFIGS))
    parser.add_argument("--draw-data", dest="draw_data", action="store_true", default=True,
                        help="each seed draws its own training and validation images (seed 0: the set's own); "
                             "the default")
    parser.add_argument("--fixed-data", dest="draw_data", action="store_false",
                        help="every seed trains and validates on the set's own images (the first four passes' grid)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="append each result here (JSON lines)")
    parser.add_argument("--table", type=Path, help="only print the table of the results in this file")
    parser.add_argument("--cache", default=Path.home() / ".cache" / "finetune", type=Path,
                        help="where the generated sets are written once")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.table:
        print_table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()])
        return
    rows = []
    done = set()  # an interrupted grid continues: the results already in --out are not run again
    if args.out and args.out.exists():
        done = {(r["set"], r["per_class"], r["seed"], r["config"], r.get("data_seed", SETS[r["set"]]["seed"]))
                for r in map(json.loads, filter(str.strip, args.out.read_text().splitlines()))}
    with tempfile.TemporaryDirectory(prefix="bench_fewshot_") as tmp:
        for data in args.sets:
            for per_class in args.per_class:
                for seed in args.seeds:
                    for name in args.configs:
                        demo_seed = data_seed(data, seed, draw=args.draw_data)
                        if (data, per_class, seed, name, demo_seed) in done:
                            continue
                        result = one_run(CONFIGS[name], data=data, per_class=per_class, seed=seed,
                                         demo_seed=demo_seed, args=args, out=Path(tmp))
                        rows.append({"set": data, "per_class": per_class, "seed": seed, "config": name,
                                     "data_seed": demo_seed, **result})
                        print(json.dumps(rows[-1]), flush=True)
                        if args.out:
                            with args.out.open("a") as f:  # safe-write: --out is the file the user named
                                f.write(json.dumps(rows[-1]) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
