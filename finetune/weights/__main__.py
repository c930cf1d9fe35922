"""``python -m finetune.weights fetch NAME [NAME ...] [--source timm|torchvision]``: a library's pretrained
weights into this machine's cache, for machines without internet.

Fine-tuning needs the pretrained weights of its backbone. A run with ``model.pretrained=true`` finds them
in timm's (the Hugging Face Hub's) or torchvision's cache, and downloads them only when a hub answers.
On a machine that has internet, fetch them once, then copy the cache to the one that has none::

    python -m finetune.weights fetch resnet50 convnext_tiny.fb_in22k hf-hub:timm/resnet18.a1_in1k
    rsync -a ~/.cache/huggingface/ gpu-node:~/.cache/huggingface/      # the folder it prints

A name is what ``model.name`` takes: an architecture (timm's default weights for it), one of its timm
pretrained tags (``resnet50.a1_in1k``: exactly those weights), or a Hugging Face Hub repository
(``hf-hub:REPO``: its config.json, which names the architecture, and its weights). Runs there find them
offline (``python -m finetune model=resnet50 ...``). Or give any weights file with ``model.weights=PATH``.
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli import status_of


def cache_dir(source: str) -> str:
    """The folder to copy to another machine: where ``source`` keeps downloaded weights."""
    if source == "timm":
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    import torch

    return torch.hub.get_dir()


def fetch(names: list[str], *, source: str) -> list[str]:
    """The cached weights file of each name in ``names`` (downloaded first when it is not cached)."""
    from finetune.models import locate_library_weights

    return [str(locate_library_weights(name, source)) for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.weights", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help="put pretrained weights into this machine's cache")
    get.add_argument("names", nargs="+", help="as model.name takes them: resnet50, resnet50.a1_in1k, "
                                                  "hf-hub:timm/resnet50.a1_in1k")
    get.add_argument("--source", choices=("timm", "torchvision"), default="timm", help="as model.source")
    args = parser.parse_args(argv)
    return status_of(lambda: report(args.names, fetch(args.names, source=args.source), source=args.source))


def report(names: list[str], files: list[str], *, source: str) -> None:
    for name, path in zip(names, files):
        print(f"{name}: {path}")
    print(f"cache: {cache_dir(source)} (copy this folder to a machine without internet)")


if __name__ == "__main__":
    sys.exit(main())
