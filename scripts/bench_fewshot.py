"""Few-shot fine-tuning: the current defaults against optim.lr=auto, freeze=gradual and freeze=head_only.

    PYTHONPATH=. python scripts/bench_fewshot.py                       # 10 images per class, 2 seeds
    PYTHONPATH=. python scripts/bench_fewshot.py --per-class 5 --seeds 0 1 2 --epochs 10

The data is the project's own generated demo set (6 shape classes drawn on textured
backgrounds, ``finetune.data.ensure_demo_dataset``) with ``--per-class`` training images per
class and 20 validation images per class; the model is the default one
(``tf_efficientnet_lite0`` with the packaged ImageNet weights) at ``--img-size``; every
configuration gets the same budget (``--epochs``, batch 16). Each run goes through
``finetune.run.run`` in this process, one after another, seeds interleaved. Printed: per
configuration the mean and spread over seeds of the best and final ``val/acc1``, the rate
``optim.lr=auto`` chose, and the wall time; the last line names the best configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from finetune.__main__ import CONFIG_DIR
from finetune.run import run

CONFIGS = {
    "defaults (lr 1e-3, freeze none)": [],
    "optim.lr=auto": ["optim.lr=auto"],
    "freeze=gradual": ["freeze=gradual"],
    "freeze=head_only": ["freeze=head_only"],
}


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def one_run(extra: list[str], *, seed: int, args: argparse.Namespace, out: Path) -> dict:
    overrides = [f"data.demo.train_per_class={args.per_class}", "data.demo.val_per_class=20",
                 f"data.cache_dir={out / 'data'}", f"data.img_size={args.img_size}", "data.batch_size=16",
                 f"trainer.max_epochs={args.epochs}", f"seed={seed}", "logger.progress_bar=false", *extra]
    run_dir = out / f"run-{len(list(out.glob('run-*')))}"
    started = time.perf_counter()
    final = run(compose_config(overrides), run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"best": summary["best"]["value"], "final": final["val/acc1"], "seconds": time.perf_counter() - started,
            "lr": (summary.get("lr_find") or {}).get("lr")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=10, help="training images per class (default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench_fewshot_") as tmp:
        for seed in args.seeds:
            for name, extra in CONFIGS.items():
                results[name].append(one_run(extra, seed=seed, args=args, out=Path(tmp)))
                print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    print(f"\n{args.per_class} images per class, 6 classes, {args.epochs} epochs, {args.img_size} px, "
          f"seeds {args.seeds}")
    print(f"{'configuration':34} {'best val/acc1':>16} {'final val/acc1':>16} {'lr chosen':>12} {'seconds':>8}")
    for name, rows in results.items():
        best, final = [r["best"] for r in rows], [r["final"] for r in rows]
        lrs = [f"{r['lr']:.2g}" for r in rows if r["lr"] is not None]
        spread = statistics.pstdev(best) if len(best) > 1 else 0.0
        print(f"{name:34} {statistics.mean(best):>10.3f} ±{spread:.3f} {statistics.mean(final):>16.3f} "
              f"{','.join(lrs) or '-':>12} {statistics.mean(r['seconds'] for r in rows):>8.1f}")
    winner = max(results, key=lambda n: statistics.mean(r["best"] for r in results[n]))
    print(f"fewshot_best_configuration: {winner}")


if __name__ == "__main__":
    main()
