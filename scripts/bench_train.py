"""Time per training step: finetune's Trainer against a bare PyTorch loop.

Same model, optimizer, batch and in-memory data; the two loops alternate over
several rounds (this machine is shared and noisy), and the ratio of the fastest
rounds (the least disturbed ones, as timeit does) is printed last:

    python scripts/bench_train.py                      # the demo's model and batch
    python scripts/bench_train.py --model test_resnet --img-size 64 --steps 40
    python scripts/bench_train.py --compile            # the Trainer with trainer.compile=true vs eager

The Trainer runs as in a real run: tqdm bar, per-update scheduler, NaN check,
TensorBoard logging of loss and every group's rate at every step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import timm
import torch
from torch import nn

from finetune.loggers import LogEvents, TensorBoardLogger
from finetune.optim import build_optimizer, build_param_groups, build_scheduler
from finetune.runtime import seed_everything, set_deterministic
from finetune.trainer import Trainer, TrainState


def make_parts(model_name: str, num_classes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    seed_everything(0)
    model = timm.create_model(model_name, num_classes=num_classes)
    groups = build_param_groups(model, head=model.pretrained_cfg["classifier"], weight_decay=0.05)
    return model, build_optimizer(groups, name="adamw", lr=1e-4)


def bare_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> float:
    """The reference: forward, loss, backward, step, zero_grad; nothing else."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    started = time.perf_counter()
    for inputs, target in batches:
        loss = loss_fn(model(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / len(batches)


def trainer_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, tb_dir: str,
                 num_classes: int) -> float:
    """Seconds per step of the Trainer as a run builds it (scheduler, TensorBoard, progress bar)."""
    scheduler = build_scheduler(optimizer, name="cosine", epochs=10, updates_per_epoch=len(batches),
                                warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-6)
    tb = LogEvents(TensorBoardLogger(tb_dir), class_names=[str(i) for i in range(num_classes)])
    trainer = Trainer(model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1),
                      device=torch.device("cpu"), num_classes=num_classes, max_epochs=1, scheduler=scheduler,
                      hooks=[tb], progress_bar=True)
    started = time.perf_counter()
    trainer.train_epoch(batches, TrainState())
    elapsed = (time.perf_counter() - started) / len(batches)
    tb.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="compare the Trainer with its model compiled (trainer.compile=true) against eager")
    args = parser.parse_args()
    set_deterministic(True)  # as in a default run, for both loops
    num_classes = 6
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen),
                torch.randint(0, num_classes, (args.batch_size,), generator=gen)) for _ in range(args.steps)]
    if args.compile:
        return compare_compiled(args, batches, num_classes)
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tb_dir:
        warm_model, warm_opt = make_parts(args.model, num_classes)
        bare_loop(warm_model, warm_opt, batches[:2])  # first-call allocations, not counted
        for _ in range(args.rounds):
            bare.append(bare_loop(*make_parts(args.model, num_classes), batches))
            ours.append(trainer_loop(*make_parts(args.model, num_classes), batches, tb_dir, num_classes))
    b, t = min(bare), min(ours)
    print(f"model {args.model} {args.img_size}px batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds")
    print(f"bare loop: {b * 1000:.1f} ms/step fastest (rounds: {', '.join(f'{x * 1000:.0f}' for x in bare)})")
    print(f"Trainer:   {t * 1000:.1f} ms/step fastest (rounds: {', '.join(f'{x * 1000:.0f}' for x in ours)})")
    print(f"median ratio (noisier): {statistics.median(ours) / statistics.median(bare):.3f}")
    print(f"train_step_overhead: {t / b:.3f} (target <= 1.05)")


def compare_compiled(args: argparse.Namespace, batches: list, num_classes: int) -> None:
    """The Trainer eager and with ``model.compile(mode)`` (as trainer.compile=true does), alternating rounds.

    The compiled model is compiled once (not counted, like a run's first steps); each round starts it
    from the same fresh weights and optimizer as the eager round, so both train the same steps.
    """
    compiled, _ = make_parts(args.model, num_classes)
    compiled.compile(mode=args.compile)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tb_dir:
        trainer_loop(compiled, make_parts(args.model, num_classes)[1], batches[:2], tb_dir, num_classes)
        compile_seconds = time.perf_counter() - started
        eager, fast = [], []
        for _ in range(args.rounds):
            eager.append(trainer_loop(*make_parts(args.model, num_classes), batches, tb_dir, num_classes))
            fresh, _ = make_parts(args.model, num_classes)
            compiled.load_state_dict(fresh.state_dict())
            optimizer = build_optimizer(build_param_groups(compiled, head=compiled.pretrained_cfg["classifier"],
                                                           weight_decay=0.05), name="adamw", lr=1e-4)
            fast.append(trainer_loop(compiled, optimizer, batches, tb_dir, num_classes))
    e, c = min(eager), min(fast)
    print(f"model {args.model} {args.img_size}px batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"compile mode {args.compile} (first compile {compile_seconds:.0f} s, not counted)")
    print(f"Trainer eager:    {e * 1000:.1f} ms/step fastest (rounds: {', '.join(f'{x * 1000:.0f}' for x in eager)})")
    print(f"Trainer compiled: {c * 1000:.1f} ms/step fastest (rounds: {', '.join(f'{x * 1000:.0f}' for x in fast)})")
    print(f"median ratio (noisier): {statistics.median(fast) / statistics.median(eager):.3f}")
    print(f"compiled_vs_eager_step_time: {c / e:.3f} (below 1: compile is faster)")


if __name__ == "__main__":
    main()
