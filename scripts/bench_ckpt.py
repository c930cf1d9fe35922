"""Benchmark checkpoint reading: time and peak RSS, ours vs the libraries' own loaders.

    python scripts/bench_ckpt.py [--mb 520] [--dir DIR]

Writes a synthetic checkpoint of ``--mb`` megabytes (fp32, 4 MiB tensors) as a
``torch.save`` zip and as safetensors in a temporary directory (deleted afterwards),
then measures each method in a fresh subprocess so that one method's memory cannot
pollute another's. Peak RSS is ``VmHWM`` after resetting it (``/proc/self/clear_refs``)
once the baseline (interpreter, imports and, for ``load`` rows, the model itself) is in
place; the figure is ``(peak - baseline) / weight bytes``. Every tensor is touched (summed
or copied into the model), so memory-mapped readers cannot look free by reading nothing.

Prints one row per method, then ``ckpt_load_peak_rss_vs_bytes: RATIO (target <= 1.25)``:
the worst ratio of ``finetune.weights`` loading a file into a model.

Saving (issue 4, ``--part save``): the time of ``finetune.checkpoint.save_training_state``
(hashed, fsynced, atomic) against writing the same bytes raw with one ``write`` and
``fsync``, best of ``--rounds`` each, alternating, printing ``ckpt_save_vs_raw: RATIO``;
then two identical training runs (``run(cfg)``, resnet18 from random init on generated
64 px images, one epoch of ``--steps`` updates), without mid-epoch saves and with
``checkpoint.every_n_steps=50``, back to back in ABBA order for ``--rounds`` rounds, printing
``ckpt_every_50_steps_slowdown: RATIO``: the median of the per-round paired ratios (the machine's
drift between rounds cancels out), with their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE = 1024  # each tensor is SIDE x SIDE fp32 = 4 MiB
TARGET_RATIO = 1.25
TARGET_SAVE_VS_RAW = 1.3
TARGET_EVERY_50_SLOWDOWN = 1.05

# Each method is a snippet run in a fresh interpreter; ``path`` and ``model`` are given.
METHODS: dict[str, tuple[str, str, str]] = {
    # name: (file, setup, measured code)
    "read_state_dict(safetensors)": ("st", "", "sd = read_state_dict(path); touch(sd)"),
    "read_state_dict(torch zip)": ("pt", "", "sd = read_state_dict(path); touch(sd)"),
    "safetensors.torch.load_file": ("st", "", "sd = load_file(path); touch(sd)"),
    "torch.load(mmap=True)": ("pt", "", "sd = torch.load(path, mmap=True, weights_only=True); touch(sd)"),
    "torch.load()": ("pt", "", "sd = torch.load(path, weights_only=True); touch(sd)"),
    "load_pretrained(safetensors) into model": ("st", "model = build()", "load_pretrained(model, path, classifier=(), allow_missing=())"),
    "load_pretrained(torch zip) into model": ("pt", "model = build()", "load_pretrained(model, path, classifier=(), allow_missing=())"),
    "load_file + load_state_dict into model": ("st", "model = build()", "model.load_state_dict(load_file(path))"),
    "torch.load(mmap) + load_state_dict into model": ("pt", "model = build()", "model.load_state_dict(torch.load(path, mmap=True, weights_only=True))"),
}
OURS_INTO_MODEL = ("load_pretrained(safetensors) into model", "load_pretrained(torch zip) into model")

CHILD = """
import json, time, torch
from safetensors.torch import load_file
from finetune.weights import load_pretrained, read_state_dict
torch.set_num_threads(1)
path, n = {path!r}, {n}

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def touch(sd):
    return sum(float(t.sum()) for t in sd.values())

def build():
    model = torch.nn.Sequential(*[torch.nn.Linear({side}, {side}, bias=False, device="meta") for _ in range(n)])
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.zero_()  # touch the pages: the model's own memory belongs to the baseline
    return model

{setup}
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS  # safe-write: procfs
base = rss("VmRSS:")
start = time.perf_counter()
{code}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak": rss("VmHWM:"), "base": base}}))
"""


def write_checkpoints(directory: Path, n: int) -> dict[str, Path]:
    """Save ``n`` random 4 MiB tensors (names match ``nn.Sequential`` of Linear) twice."""
    import torch
    from safetensors.torch import save_file

    state = {f"{i}.weight": torch.randn(SIDE, SIDE) for i in range(n)}
    paths = {"pt": directory / "big.pt", "st": directory / "big.safetensors"}
    torch.save(state, paths["pt"])
    save_file(state, str(paths["st"]))
    return paths


def measure(name: str, path: Path, n: int) -> dict[str, float]:
    """Run one method in a fresh interpreter; returns seconds and RSS figures."""
    _, setup, code = METHODS[name]
    script = CHILD.format(path=str(path), n=n, side=SIDE, setup=setup, code=code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_load(args: argparse.Namespace) -> bool:
    """Write the checkpoint, measure every method, print the table and the headline ratio."""
    n = max(1, args.mb // 4)
    weight_bytes = n * SIDE * SIDE * 4
    directory = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    try:
        paths = write_checkpoints(directory, n)
        print(f"checkpoint: {n} fp32 tensors, {weight_bytes / 2**20:.0f} MiB of weights "
              f"(zip {paths['pt'].stat().st_size / 2**20:.0f} MiB, safetensors {paths['st'].stat().st_size / 2**20:.0f} MiB)")
        print(f"{'method':<46}{'seconds':>9}{'peak RSS above baseline':>26}{'ratio':>8}")
        ratios = {}
        for name, (kind, _, _) in METHODS.items():
            m = measure(name, paths[kind], n)
            ratios[name] = (m["peak"] - m["base"]) / weight_bytes
            print(f"{name:<46}{m['seconds']:>9.2f}{(m['peak'] - m['base']) / 2**20:>22.0f} MiB{ratios[name]:>8.2f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    worst = max(ratios[name] for name in OURS_INTO_MODEL)
    print(f"ckpt_load_peak_rss_vs_bytes: {worst:.2f} (target <= {TARGET_RATIO})")
    return worst <= TARGET_RATIO


def bench_save_vs_raw(directory: Path, mb: int, rounds: int) -> float:
    """Best-of-``rounds`` seconds: our atomic, hashed, fsynced save vs the same bytes written raw."""
    import torch

    from finetune.checkpoint import save_training_state

    n = max(1, mb // 4)
    state = {"format": "finetune.train_state/1", "model": {f"{i}.weight": torch.randn(SIDE, SIDE) for i in range(n)},
             "train_state": {"epoch": 1, "global_step": 50}}
    ours, raw = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        save_training_state(directory / "last.ckpt", state)
        ours.append(time.perf_counter() - start)
        while list(directory.glob(".last.ckpt.*.old.tmp")):  # the replaced file's background unlink: not
            time.sleep(0.01)  # on the caller's time, but it must not slow the raw write that follows either
        data = (directory / "last.ckpt").read_bytes()
        start = time.perf_counter()
        with open(directory / "raw.bin", "wb") as f:  # safe-write: its own temp dir
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        raw.append(time.perf_counter() - start)
        del data
        (directory / "raw.bin").unlink()
    size = (directory / "last.ckpt").stat().st_size
    print(f"save {size / 2**20:.0f} MiB: save_training_state {min(ours):.3f} s, raw write+fsync {min(raw):.3f} s "
          f"(best of {rounds})")
    return min(ours) / min(raw)


def bench_every_n_steps(directory: Path, steps: int, rounds: int) -> float:
    """The slowdown of one training epoch with ``every_n_steps=50`` against the same epoch without.

    Robust to this machine's drift: the two arms run back to back in each round (ABBA order), each
    round gives its own paired ratio, and the figure is the median of those ratios, with their spread.
    """
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from finetune.__main__ import CONFIG_DIR
    from finetune.run import run

    batch, rng = 8, np.random.default_rng(0)
    for c in range(4):
        for split, count in (("train", steps * batch // 4), ("val", 4)):
            folder = directory / "images" / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    base = ["model=resnet18", "model.pretrained=false", "data=custom", f"data.root={directory / 'images'}",
            "data.img_size=64", f"data.batch_size={batch}", "trainer.max_epochs=1", "logger.progress_bar=false",
            "sched=none"]
    variants = {"none": [], "every_50": ["checkpoint.every_n_steps=50"]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run(compose(config_name="config", overrides=base), run_dir=directory / "warmup")  # first-call costs
        for r in range(rounds):
            for name, extra in list(variants.items())[::1 if r % 2 == 0 else -1]:  # ABBA: no order bias
                out = directory / f"{name}_{r}"
                start = time.perf_counter()
                run(compose(config_name="config", overrides=base + extra), run_dir=out)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
    paired = sorted(a / b for a, b in zip(times["every_50"], times["none"]))
    print(f"training {steps} updates (resnet18, 64 px, batch {batch}), {rounds} rounds: no mid-epoch saves "
          f"{[round(t, 2) for t in times['none']]} s, every_n_steps=50 {[round(t, 2) for t in times['every_50']]} s")
    print(f"paired ratios (every_50 / none, same round): {[round(x, 3) for x in paired]}; spread "
          f"{paired[0]:.3f}-{paired[-1]:.3f}, ratio of the minima {min(times['every_50']) / min(times['none']):.3f}")
    return statistics.median(paired)


def bench_save(args: argparse.Namespace) -> bool:
    directory = Path(tempfile.mkdtemp(prefix="bench_ckpt_save_", dir=args.dir))
    try:
        if args.compare_sha256:  # the same save with the manifest's older digest, for comparison
            from finetune import files

            files.DIGEST = "sha256"
            print(f"with sha256 instead of blake3: {bench_save_vs_raw(directory, args.save_mb, args.rounds):.2f}")
            files.DIGEST = "blake3"
        save_ratio = bench_save_vs_raw(directory, args.save_mb, args.rounds)
        print(f"ckpt_save_vs_raw: {save_ratio:.2f} (target <= {TARGET_SAVE_VS_RAW})")
        slowdown = bench_every_n_steps(directory, args.steps, args.rounds)
        print(f"ckpt_every_50_steps_slowdown: {slowdown:.3f} (median of paired rounds; target <= "
              f"{TARGET_EVERY_50_SLOWDOWN})")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return save_ratio <= TARGET_SAVE_VS_RAW and slowdown <= TARGET_EVERY_50_SLOWDOWN


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=520, help="checkpoint size in MiB for loading (default 520)")
    parser.add_argument("--dir", default=None, help="where to write the temporary files")
    parser.add_argument("--part", choices=("all", "load", "save"), default="all", help="which benchmarks to run")
    parser.add_argument("--save-mb", type=int, default=256, help="training-state size in MiB for saving (default 256)")
    parser.add_argument("--steps", type=int, default=200, help="updates in the every_n_steps run (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each save measurement (default 3)")
    parser.add_argument("--compare-sha256", action="store_true",
                        help="also time the save with sha256 as the digest (the manifest's older algorithm)")
    args = parser.parse_args()
    ok = True
    if args.part in ("all", "load"):
        ok = bench_load(args) and ok
    if args.part in ("all", "save"):
        ok = bench_save(args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
