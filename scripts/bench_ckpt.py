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
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE = 1024  # each tensor is SIDE x SIDE fp32 = 4 MiB
TARGET_RATIO = 1.25

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
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
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


def main() -> int:
    """Write the checkpoint, measure every method, print the table and the headline ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=520, help="checkpoint size in MiB (default 520)")
    parser.add_argument("--dir", default=None, help="where to write the temporary files")
    args = parser.parse_args()
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
    return 0 if worst <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
