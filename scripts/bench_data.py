"""Images per second from finetune's training and validation loaders, against the usual baseline.

Ours is built exactly as a run builds it (the real ``conf/`` composed with ``model=resnet50
data=custom``, then `finetune.builders.build_loaders` with the model's data config). The baseline
is what most training scripts do: torchvision ``ImageFolder`` with timm's
``create_transform(**resolve_data_config(model=...), is_training=True/False)`` for the same model,
in a ``DataLoader`` with the same batch size, worker count and ``pin_memory`` (and persistent
workers, as timm's own loader has them). Both read the same generated folder of photo-like JPEGs
(600 of 500x375 and 200 of 1600x1200, quality 90: gradients, texture, shapes and sensor-like
noise, so decoding costs what it costs on photographs), written once into ``--cache-dir``.

Each loader first runs a warm-up epoch (worker start-up, page cache), then ``--epochs`` epochs; the
two arms alternate within every round (this machine is shared and noisy), and the ratios of the
median images/s are printed last:

    python scripts/bench_data.py                       # 1 warm-up + 3 epochs, data.num_workers=auto
    python scripts/bench_data.py --workers 2 --epochs 5
    python scripts/bench_data.py --quick               # a small set and two epochs: checks that it runs
    python scripts/bench_data.py --stream              # training: folder vs local shards vs loopback S3
    python scripts/bench_data.py --hf                  # training: folder vs the same images as a HF dataset

``--stream`` (issue 23) compares finetune's own training loaders over the same training images (the
folder split by ``data.val_split=0.2``, seed 0) with the same transforms: ``data=custom`` (the folder),
``data=webdataset`` from shards written by ``finetune.shard`` into ``--cache-dir``, and the same shards
served by moto's S3 server on 127.0.0.1 (read through s3fs, as from S3). Beside images/s it prints each
arm's median seconds to the first batch of an epoch and CPU seconds per epoch (`cpu_seconds`).

``--hf`` compares the training loader of ``data=custom`` with that of ``data=hf`` over a ``save_to_disk``
DatasetDict of the same split (the folder's train images as ``train``, its val images as ``validation``;
the JPEG bytes stored as they are), written once into ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from finetune import builders
from finetune.__main__ import CONFIG_DIR
from finetune.signals import stop_workers

FULL_SET = {"small": 600, "large": 200}
QUICK_SET = {"small": 24, "large": 8}
SIZES = {"small": (500, 375), "large": (1600, 1200)}
NUM_CLASSES = 4
QUALITY = 90


# ------------------------------------------------------------------ images
def photo_like(width: int, height: int, seed: int, noise: np.ndarray) -> Image.Image:
    """A photo-like picture: a colour gradient, low-frequency texture and flat shapes, drawn at half
    size and upscaled (soft edges, as a lens gives), then per-pixel noise (as a sensor gives)."""
    rng = np.random.default_rng(seed)
    half_w, half_h = width // 2, height // 2
    y, x = np.mgrid[0:half_h, 0:half_w].astype(np.float32)
    slope = rng.uniform(-0.15, 0.15, (2, 3)).astype(np.float32) * (320 / max(half_w, half_h))
    pixels = rng.uniform(40, 200, 3).astype(np.float32) + x[..., None] * slope[0] + y[..., None] * slope[1]
    coarse = np.clip(rng.normal(128, 20, (half_h // 8 + 1, half_w // 8 + 1, 3)), 0, 255).astype(np.uint8)
    pixels += np.asarray(Image.fromarray(coarse).resize((half_w, half_h), Image.BICUBIC), np.float32) - 128
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.1, 0.9) * half_w, rng.uniform(-0.1, 0.9) * half_h
        box = [x0, y0, x0 + rng.uniform(0.05, 0.4) * half_w, y0 + rng.uniform(0.05, 0.4) * half_h]
        shape = draw.ellipse if rng.integers(0, 2) else draw.rectangle
        shape(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.resize((width, height), Image.BICUBIC)
    reps = (-(-height // noise.shape[0]), -(-width // noise.shape[1]), 1)  # tiled when smaller than the image
    shift = (int(rng.integers(height)), int(rng.integers(width)))  # one noise field, a new offset per image
    grain = np.roll(np.tile(noise, reps)[:height, :width], shift, axis=(0, 1))
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8))


def ensure_images(cache_dir: Path, counts: dict[str, int]) -> Path:
    """The bench folder ``ROOT/c<k>/<kind>_<i>.jpg``, generated once (a ``done`` file marks it complete)."""
    root = cache_dir / f"bench_data_{counts['small']}x500_{counts['large']}x1600_q{QUALITY}"
    if (root / "done").is_file():
        return root
    width, height = SIZES["large"]
    noise = np.random.default_rng(12345).normal(0, 6, (height, width, 3)).astype(np.int16)
    seed = 0
    for kind, count in counts.items():
        for i in range(count):
            folder = root / f"c{seed % NUM_CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            photo_like(*SIZES[kind], seed, noise).save(folder / f"{kind}_{i:04d}.jpg", quality=QUALITY)
            seed += 1
    (root / "done").write_text("complete\n")  # safe-write: its own data dir
    return root


# ----------------------------------------------------------------- loaders
def compose_run_config(root: Path, args: argparse.Namespace):
    """The run's config, composed from the real conf/ as the CLI composes it."""
    overrides = [f"model={args.model}", "model.pretrained=false", "data=custom", f"data.root={root}",
                 f"data.batch_size={args.batch_size}"]
    overrides += [f"data.num_workers={args.workers}"] if args.workers is not None else []
    overrides += [f"data.img_size={args.img_size}"] if args.img_size is not None else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def our_loaders(root: Path, args: argparse.Namespace, *, device: torch.device, everything: bool = True):
    """finetune's loaders over every image of ``root`` (train and val both), as `finetune.run` builds them
    (``everything=False``: the run's own split)."""
    cfg = compose_run_config(root, args)
    with tempfile.TemporaryDirectory() as run_dir:
        split = builders.build_split(cfg.data, run_dir=Path(run_dir), write=False)
    if everything:
        images = sorted(split.train + split.val)
        split = dataclasses.replace(split, train=images, val=images)
    _, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=split.num_classes)
    data_config = builders.build_data_config(cfg.data, spec)
    return builders.build_loaders(cfg.data, split, data_config, seed=cfg.seed, device=device), data_config


def baseline_loaders(root: Path, args: argparse.Namespace, *, workers: int, pin_memory: bool):
    """ImageFolder + timm's create_transform for the same model: the usual training script."""
    model = timm.create_model(args.model, pretrained=False)
    config = resolve_data_config(model=model)
    if args.img_size is not None:
        config["input_size"] = (3, args.img_size, args.img_size)
    options = {"batch_size": args.batch_size, "num_workers": workers, "pin_memory": pin_memory,
               "persistent_workers": workers > 0}
    train = DataLoader(ImageFolder(str(root), create_transform(**config, is_training=True)), shuffle=True,
                       **options)
    val = DataLoader(ImageFolder(str(root), create_transform(**config, is_training=False)), shuffle=False,
                     **options)
    return train, val


def images_per_second(loader: DataLoader, epoch: int, stats: dict[str, list[float]] | None = None) -> float:
    """One pass over ``loader`` (its sampler set to ``epoch`` when it has epochs), in images/s. ``stats``:
    the seconds to the first batch are appended to its ``"first"``, the CPU seconds of the pass to ``"cpu"``."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    images, started, cpu = 0, time.perf_counter(), cpu_seconds()
    for _, target in loader:
        if images == 0 and stats is not None:
            stats["first"].append(time.perf_counter() - started)
        images += target.shape[0]
    if stats is not None:
        stats["cpu"].append(cpu_seconds() - cpu)
    return images / (time.perf_counter() - started)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live multiprocessing children (the loader workers),
    which the load of other work on the machine does not change as it changes images/s. Linux (/proc);
    elsewhere this process alone."""
    user, system = os.times()[:2]
    total = user + system
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def interleaved(arms: dict[str, DataLoader], rounds: int,
                stats: dict[str, dict[str, list[float]]] | None = None) -> dict[str, list[float]]:
    """images/s of each arm per round, the arms alternating first and last; round 0 is a warm-up.
    ``stats``: each arm's `images_per_second` stats of the timed rounds, filled in when given."""
    speeds: dict[str, list[float]] = {name: [] for name in arms}
    for epoch in range(rounds + 1):
        order = list(arms) if epoch % 2 == 0 else list(reversed(arms))
        for name in order:
            arm = stats.setdefault(name, {"first": [], "cpu": []}) if stats is not None and epoch > 0 else None
            speed = images_per_second(arms[name], epoch, arm)
            if epoch > 0:
                speeds[name].append(speed)
    return speeds


def report(split: str, speeds: dict[str, list[float]]) -> float:
    for name, values in speeds.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{split} {name:<9} {statistics.median(values):7.1f} img/s median (epochs: {shown})")
    return statistics.median(speeds["finetune"]) / statistics.median(speeds["baseline"])


# ------------------------------------------------------------------ streaming (--stream)
def run_loader(args: argparse.Namespace, data: list[str], *, device: torch.device) -> tuple:
    """``(train loader, split)`` of the data ``data`` (overrides) selects, composed and built as a run builds it."""
    overrides = [f"model={args.model}", "model.pretrained=false", *data, f"data.batch_size={args.batch_size}"]
    overrides += [f"data.num_workers={args.workers}"] if args.workers is not None else []
    overrides += [f"data.img_size={args.img_size}"] if args.img_size is not None else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        split = builders.build_split(cfg.data, run_dir=Path(run_dir), write=False)
    _, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=split.num_classes)
    loaders = builders.build_loaders(cfg.data, split, builders.build_data_config(cfg.data, spec), seed=cfg.seed,
                                     device=device)
    return loaders.train, split


def shard_loader(root: Path, args: argparse.Namespace, urls: str, *, device: torch.device):
    """``data=webdataset``'s train loader over ``urls``, composed and built as a run builds it."""
    data = ["data=webdataset", f"data.train_urls='{urls}'", f"data.val_urls='{urls}'"]
    return run_loader(args, data, device=device)[0]


def loopback_s3(folder: Path):
    """moto's S3 server on 127.0.0.1 holding the files of ``folder`` under s3://bench/shards/; (process, URL)."""
    import os
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for path in folder.iterdir():
        client.upload_file(str(path), "bench", f"shards/{path.name}")
    return proc


def stream_main(args: argparse.Namespace, root: Path, pin_memory: bool) -> None:
    from finetune.shard import urls_of, write_shards

    device = torch.device("cuda" if pin_memory else "cpu")
    shards = args.cache_dir / f"bench-shards-{root.name}"
    if not (shards / "index.json").exists():
        write_shards(str(root), str(shards), shard_size="16MB", val_split=0.2, seed=0)
    index = json.loads((shards / "index.json").read_text())
    folder = our_loaders(root, args, device=device, everything=False)[0].train
    local = shard_loader(root, args, urls_of(str(shards), index, "train"), device=device)
    server, remote = loopback_s3(shards), None
    try:
        remote = shard_loader(root, args, urls_of("s3://bench/shards", index, "train"), device=device)
        print(f"stream: {len(index['shards'])} shards in {shards}; batch {args.batch_size}, {folder.num_workers} "
              f"worker(s) for the folder, {local.num_workers} for shards; 1 warm-up + {args.epochs} epochs each")
        stats: dict[str, dict[str, list[float]]] = {}
        speeds = interleaved({"folder": folder, "shards": local, "s3": remote}, args.epochs, stats)
    finally:
        for loader in (folder, local, remote):
            if loader is not None:  # persistent workers, as in a run: stopped here, before the server
                stop_workers(loader)
        server.terminate()
        server.wait()
    for name, values in speeds.items():
        print(f"train {name:<7} {statistics.median(values):7.1f} img/s median (epochs: "
              f"{', '.join(f'{v:.1f}' for v in values)}); first batch after "
              f"{statistics.median(stats[name]['first']):.2f} s; {statistics.median(stats[name]['cpu']):.2f} CPU s "
              "per epoch")
    print("(CPU s: this process and its loader workers, not the S3 server)")
    base = statistics.median(speeds["folder"])
    print(f"stream_local_vs_folder: {statistics.median(speeds['shards']) / base:.2f} (target >= 1.0)")
    print(f"stream_s3_vs_folder: {statistics.median(speeds['s3']) / base:.2f} (target >= 0.8)")


# ------------------------------------------------------------------ Hugging Face datasets (--hf)
def ensure_hf_dataset(root: Path, args: argparse.Namespace) -> Path:
    """The folder's run split as a ``save_to_disk`` DatasetDict (image bytes stored), written once."""
    import datasets

    target = args.cache_dir / f"bench-hf-{root.name}"
    if (target / "dataset_dict.json").is_file():
        return target
    cfg = compose_run_config(root, args)
    with tempfile.TemporaryDirectory() as run_dir:
        split = builders.build_split(cfg.data, run_dir=Path(run_dir), write=False)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=split.class_names)})
    parts = {name: datasets.Dataset.from_dict({"image": [p for p, _ in samples], "label": [c for _, c in samples]},
                                              features=features)
             for name, samples in (("train", split.train), ("validation", split.val))}
    datasets.DatasetDict(parts).save_to_disk(str(target))
    return target


def hf_main(args: argparse.Namespace, root: Path, pin_memory: bool) -> None:
    device = torch.device("cuda" if pin_memory else "cpu")
    path = ensure_hf_dataset(root, args)
    folder = our_loaders(root, args, device=device, everything=False)[0].train
    hf, split = run_loader(args, ["data=hf", f"data.path={path}"], device=device)
    print(f"hf: {len(split.train)} train images in {path}; batch {args.batch_size}, {folder.num_workers} "
          f"worker(s) each; 1 warm-up + {args.epochs} epochs each")
    try:
        speeds = interleaved({"folder": folder, "hf": hf}, args.epochs)
    finally:
        for loader in (folder, hf):
            stop_workers(loader)
    for name, values in speeds.items():
        print(f"train {name:<7} {statistics.median(values):7.1f} img/s median (epochs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    print(f"hf_vs_folder: {statistics.median(speeds['hf']) / statistics.median(speeds['folder']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default=None, help="data.num_workers for both arms (default: the "
                        "config's, auto); a number or auto")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader, after one warm-up")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="resnet50", help="a conf/model option (its data config is used)")
    parser.add_argument("--img-size", type=int, default=None, help="data.img_size (default: the model's)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/finetune").expanduser())
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SET['small']} + {QUICK_SET['large']} "
                        "images, batch 8, 2 epochs: a check that the script runs")
    parser.add_argument("--stream", action="store_true", help="training from a folder, local shards and "
                        "loopback S3 (data=webdataset), side by side")
    parser.add_argument("--hf", action="store_true", help="training from a folder and from the same images as a "
                        "Hugging Face dataset (data=hf), side by side")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.batch_size = min(args.epochs, 2), min(args.batch_size, 8)
    counts = QUICK_SET if args.quick else FULL_SET
    root = ensure_images(args.cache_dir, counts)
    pin_memory = torch.cuda.is_available()  # as a run does: pinned when it trains on CUDA
    if args.stream:
        return stream_main(args, root, pin_memory)
    if args.hf:
        return hf_main(args, root, pin_memory)
    ours, data_config = our_loaders(root, args, device=torch.device("cuda" if pin_memory else "cpu"))
    workers = ours.train.num_workers  # "auto" resolved by build_loaders; the baseline gets the same count
    base_train, base_val = baseline_loaders(root, args, workers=workers, pin_memory=pin_memory)
    size = data_config["input_size"][-1]
    print(f"data: {counts['small']} JPEGs of 500x375 + {counts['large']} of 1600x1200 (quality {QUALITY}) in "
          f"{root}; {args.model} at {size} px (crop_pct {data_config['crop_pct']}, {data_config['interpolation']})")
    print(f"batch {args.batch_size}, {workers} worker(s), pin_memory {pin_memory}; 1 warm-up + {args.epochs} "
          "epochs per loader, the arms alternating within each round")
    try:
        train = report("train", interleaved({"baseline": base_train, "finetune": ours.train}, args.epochs))
        val = report("val  ", interleaved({"baseline": base_val, "finetune": ours.val}, args.epochs))
    finally:  # our workers ignore SIGTERM (as in a run), so they are shut down here, not at exit
        for loader in (ours.train, ours.val, base_train, base_val):
            stop_workers(loader)
    print(f"data_train_vs_baseline: {train:.2f} (target >= 1.5)")
    print(f"data_val_vs_baseline: {val:.2f} (target >= 1.5)")


if __name__ == "__main__":
    main()
