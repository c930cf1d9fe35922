"""GPU throughput: finetune's Trainer against a hand-written loop, eager and compiled, then with the real loader.

    bash scripts/bench_gpu.sh              # on a GPU: resnet50, 224 px, batch 128, bf16, channels_last
    python scripts/bench_gpu.py --cpu      # the CPU fallback (a tiny model): checks the script itself

Synthetic batches live in device memory, so the first part measures the training step alone: the
hand-written loop (autocast, channels_last, forward, loss, backward, step, zero_grad) and the
Trainer (as a run builds it: scheduler, TensorBoard, NaN check) alternate over rounds, eager and
with the model compiled (compiled once, not counted). The second part feeds the Trainer from the
project's training loader over generated JPEGs, and times the loader alone. Every figure is a line
``NAME: VALUE (target OP X)``; peak GPU memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from finetune.data import build_loaders, build_transforms, scan_image_folder
from finetune.loggers import LogEvents, TensorBoardLogger
from finetune.optim import build_optimizer, build_param_groups, build_scheduler
from finetune.runtime import seed_everything
from finetune.trainer import Trainer, TrainState


def parts(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    seed_everything(0)
    model = timm.create_model(args.model, num_classes=args.classes).to(device, memory_format=torch.channels_last)
    groups = build_param_groups(model, head=model.pretrained_cfg["classifier"], weight_decay=0.05)
    return model, build_optimizer(groups, name="adamw", lr=1e-4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, device: torch.device,
              dtype: torch.dtype | None) -> float:
    """Images per second of the reference loop."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    sync(device)
    started = time.perf_counter()
    for inputs, target in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return sum(len(t) for _, t in batches) / (time.perf_counter() - started)


def trainer_loop(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device,
                 dtype: torch.dtype | None, classes: int, tb_dir: str) -> float:
    """Images per second of the Trainer over one pass of ``loader`` (batches or a DataLoader)."""
    scheduler = build_scheduler(optimizer, name="cosine", epochs=10, updates_per_epoch=len(loader), warmup_epochs=1,
                                warmup_lr=1e-5, min_lr=1e-6)
    tb = LogEvents(TensorBoardLogger(tb_dir), class_names=[str(i) for i in range(classes)])
    trainer = Trainer(model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1),
                      device=device, num_classes=classes, max_epochs=1, scheduler=scheduler, autocast_dtype=dtype,
                      channels_last=True, hooks=[tb], progress_bar=False)
    sync(device)
    started = time.perf_counter()
    trainer.train_epoch(loader, TrainState())
    sync(device)
    elapsed = time.perf_counter() - started
    tb.close()
    return count_images(loader) / elapsed


def count_images(loader) -> int:
    """Images in one pass: of a list of batches, or of a loader (its sampler's epoch)."""
    if isinstance(loader, list):
        return sum(len(target) for _, target in loader)
    return loader.sampler.epoch_length()


def synthetic(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None, compiled: bool,
              tb_dir: str) -> tuple[float, float]:
    """Best-of-rounds images/s of the hand loop and the Trainer on batches already in device memory."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device, memory_format=torch.channels_last),
                torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)) for _ in range(args.steps)]
    model, optimizer = parts(args, device)
    if compiled:
        model.compile(mode=args.compile_mode)
    hand_loop(model, optimizer, batches[:3], device, dtype)  # compiles (when compiled) and warms up: not counted
    hand, ours = [], []
    for _ in range(args.rounds):
        hand.append(hand_loop(model, optimizer, batches, device, dtype))
        ours.append(trainer_loop(model, optimizer, batches, device, dtype, args.classes, tb_dir))
    return max(hand), max(ours)


def jpeg_folder(root: Path, count: int, classes: int) -> Path:
    """``count`` photo-like 500x375 JPEGs (noise over gradients, quality 90) in ``classes`` folders, made once."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 500, dtype=np.float32)[None, :, None]
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(ramp * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 40, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    (root / "done").touch()
    return root


def real_loader(args: argparse.Namespace, device: torch.device, workers: int):
    model = timm.create_model(args.model, num_classes=args.classes)
    config = timm.data.resolve_data_config(model=model)
    config["input_size"] = (3, args.size, args.size)
    split = scan_image_folder(jpeg_folder(Path(args.cache) / "jpegs", args.images, args.classes))
    transform = build_transforms(config, img_size=args.size, train=True)
    return build_loaders(split, train_transform=transform, eval_transform=build_transforms(config, img_size=args.size,
                         train=False), batch_size=args.batch, num_workers=workers, seed=0,
                         pin_memory=device.type == "cuda", device=device).train


def loader_alone(loader) -> float:
    """Images per second the loader delivers, nothing consuming them (after a warm-up pass)."""
    for _ in loader:
        pass
    started, images = time.perf_counter(), 0
    for _, target in loader:
        images += len(target)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback: a tiny model, small batches")
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=None, help="generated JPEGs for the real-loader part")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "finetune_bench_gpu"))
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    defaults = dict(model="resnet50", size=224, batch=128, steps=30, images=2048) if gpu else \
        dict(model="test_resnet", size=64, batch=16, steps=6, images=96)
    for key, value in defaults.items():
        setattr(args, key, getattr(args, key) or value)
    workers = args.workers if args.workers is not None else min(8, max(0, len(os.sched_getaffinity(0)) - 1))
    dtype = torch.bfloat16 if gpu else None  # bf16 autocast on the GPU; fp32 keeps the CPU fallback quick
    if gpu:
        torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu (fallback)'}, model {args.model} "
          f"{args.size}px batch {args.batch}, {'bf16' if dtype else 'fp32'} channels_last, {args.steps} steps x "
          f"{args.rounds} rounds, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tb_dir:
        figures = {}
        for compiled in (False, True):
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            tag = "compiled" if compiled else "eager"
            figures[f"loop_{tag}"], figures[f"trainer_{tag}"] = synthetic(args, device, dtype, compiled, tb_dir)
            print(f"gpu_loop_images_per_s_{tag}: {figures[f'loop_{tag}']:.0f} (figure)")
            print(f"gpu_trainer_images_per_s_{tag}: {figures[f'trainer_{tag}']:.0f} (figure)")
            print(f"gpu_trainer_vs_loop_{tag}: {figures[f'trainer_{tag}'] / figures[f'loop_{tag}']:.3f} "
                  "(target >= 0.95)")
            if gpu:
                print(f"gpu_peak_memory_gib_{tag}: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} "
                      "(target <= 40)")
        print(f"gpu_compiled_vs_eager_trainer: {figures['trainer_compiled'] / figures['trainer_eager']:.3f} "
              "(target >= 1.0)")
        loader = real_loader(args, device, workers)
        alone = loader_alone(loader)
        model, optimizer = parts(args, device)
        fed = statistics.median(trainer_loop(model, optimizer, loader, device, dtype, args.classes, tb_dir)
                                for _ in range(2))
    print(f"data_loader_images_per_s: {alone:.0f} ({workers} workers; figure)")
    print(f"gpu_trainer_images_per_s_real_loader: {fed:.0f} (figure)")
    print(f"data_loader_vs_trainer: {alone / figures['trainer_eager']:.3f} (target >= 1.0: the loader keeps up)")
    print(f"gpu_real_loader_vs_synthetic: {fed / figures['trainer_eager']:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
