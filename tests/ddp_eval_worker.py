"""Run by tests/test_distributed.py under torchrun: evaluate a weights file on a data folder's
validation split with the Trainer's distributed evaluation; rank 0 writes the exact result as JSON.

    torchrun --standalone --nproc_per_node=N tests/ddp_eval_worker.py WEIGHTS DATA_ROOT OUT.json
"""

import json
import os
import sys
from pathlib import Path

import torch

from finetune import data as data_lib
from finetune import distributed
from finetune.checkpoint import load_model
from finetune.trainer import Trainer


def main(weights: str, root: str, out: str) -> None:
    world = distributed.init()
    device = torch.device(f"cuda:{world.local_rank}" if os.environ.get("FT_TEST_DEVICE") == "cuda" else "cpu")
    model, meta = load_model(weights, device=device)
    split = data_lib.scan_image_folder(root, val_split=0.2, seed=0)
    transform = data_lib.build_transforms(meta.data_config, img_size=meta.data_config["input_size"][-1], train=False)
    loaders = data_lib.build_loaders(split, train_transform=transform, eval_transform=transform, batch_size=4,
                                     rank=world.rank, world_size=world.size)
    trainer = Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      loss_fn=torch.nn.CrossEntropyLoss(), device=device, num_classes=len(split.class_names),
                      max_epochs=1, progress_bar=False, world=world)
    result = trainer.evaluate(loaders.val)
    if world.main:
        Path(out).write_text(json.dumps({"loss": result.loss.hex(), "acc1": result.acc1.hex(),
                                         "per_class_acc": [a.hex() for a in result.per_class_acc],
                                         "confusion": result.confusion.tolist(), "batches": len(loaders.val),
                                         "images": int(result.confusion.sum())}))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
