"""Checkpoint-file tools: ``python -m finetune.ckpt inspect|diff|convert|adapter``.

    python -m finetune.ckpt inspect PATH [--json]
    python -m finetune.ckpt diff PATH --model NAME [--source timm|torchvision] [--remap R]
                                 [--num-classes N] [--in-chans C]
    python -m finetune.ckpt convert SRC DST [--max-shard-size 2GB] [--strip-wrappers]
    python -m finetune.ckpt adapter RUN_DIR/checkpoints/last.ckpt adapter.safetensors

Plain argparse, no Hydra. Problems with the input print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from finetune.cli import status_of
from finetune.files import atomic_write_text, staged_path
from finetune.errors import UserError
from finetune.weights import load_pretrained, read_checkpoint
from finetune.weights.load import check_patterns
from finetune.weights.remap import strip_wrappers


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 diff found problems, 2 bad input)."""
    args = _parser().parse_args(argv)
    return status_of(lambda: args.func(args))


def _parser() -> argparse.ArgumentParser:
    """The argument parser with its four subcommands."""
    parser = argparse.ArgumentParser(prog="python -m finetune.ckpt", description="Inspect, diff and convert "
                                     "checkpoint files; write a LoRA adapter alone.")
    sub = parser.add_subparsers(required=True, dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects (runs code from the file!)")
    common.add_argument("--ema", action="store_true", help="prefer the EMA weights of a training checkpoint")

    inspect = sub.add_parser("inspect", parents=[common],
                             help="format, tensor and parameter counts, dtypes, prefixes, metadata")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=inspect_command)

    diff = sub.add_parser("diff", parents=[common],
                          help="dry run: what would load into a model, be remapped, dropped, missing")
    diff.add_argument("path")
    diff.add_argument("--model", required=True, help="model name (timm or torchvision), built with random weights")
    diff.add_argument("--source", choices=("timm", "torchvision"), default="timm")
    diff.add_argument("--remap", default="auto", help="auto | none | PRESET | JSON rules")
    diff.add_argument("--num-classes", type=int, default=None)
    diff.add_argument("--in-chans", type=int, default=None)
    diff.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN")
    diff.add_argument("--allow-mismatch", action="append", default=[], metavar="PATTERN")
    diff.add_argument("--json", action="store_true", help="print the full load report as JSON")
    diff.set_defaults(func=diff_command)

    convert = sub.add_parser("convert", parents=[common],
                             help="to safetensors, sharded with an HF index above --max-shard-size")
    convert.add_argument("src")
    convert.add_argument("dst", help="a .safetensors file, or a directory (gets model.safetensors)")
    convert.add_argument("--max-shard-size", default="2GB", help="bytes, or e.g. 500MB, 2GB (default 2GB)")
    convert.add_argument("--strip-wrappers", action="store_true", help="remove module. / _orig_mod. from names")
    convert.set_defaults(func=convert_command)

    adapter = sub.add_parser("adapter", help="the LoRA adapter alone of an adapter=lora run's training state")
    adapter.add_argument("state", help="a training state (RUN_DIR/checkpoints/last.ckpt)")
    adapter.add_argument("dst", help="the .safetensors file to write")
    adapter.set_defaults(func=adapter_command)
    return parser


def inspect_command(args: argparse.Namespace) -> int:
    """Print what a checkpoint holds."""
    info = describe_checkpoint(args.path, trust_pickle=args.trust_pickle, ema=args.ema)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key + ':':<14}{value}")
    return 0


def describe_checkpoint(path: str, *, trust_pickle: bool = False, ema: bool = False) -> dict[str, Any]:
    """Format, counts, dtypes, top-level prefixes and metadata of a checkpoint."""
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle, ema=ema)
    tensors = ckpt.tensors.values()
    wrappers = Counter(strip_wrappers(k)[1] for k in ckpt.tensors)
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "container": ".".join(ckpt.container) or "-",
        "tensors": len(ckpt.tensors),
        "parameters": sum(t.numel() for t in tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors)),
        "prefixes": dict(Counter(k.split(".", 1)[0] for k in ckpt.tensors).most_common(12)),
        "wrappers": {w: n for w, n in wrappers.items() if w},
        "metadata": ckpt.metadata,
        "non_tensor": ckpt.skipped,
    }


def diff_command(args: argparse.Namespace) -> int:
    """Build the model with random weights and dry-run the load."""
    check_patterns(args.allow_missing, key="--allow-missing")
    check_patterns(args.allow_mismatch, key="--allow-mismatch")
    model = build_model(args.model, source=args.source, num_classes=args.num_classes, in_chans=args.in_chans)
    remap = json.loads(args.remap) if args.remap.lstrip().startswith("{") else args.remap
    report = load_pretrained(
        model, args.path, remap=remap, allow_missing=args.allow_missing, allow_mismatch=args.allow_mismatch,
        trust_pickle=args.trust_pickle, in_chans=args.in_chans, dry_run=True,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table(max_items=8))
        renamed = list(report.remapped.items())
        for src, dst in renamed[:20]:
            print(f"    {src} -> {dst}")
        if len(renamed) > 20:
            print(f"    ... +{len(renamed) - 20} more renamed (--json for all)")
    return 1 if report.problems else 0


def build_model(name: str, *, source: str, num_classes: int | None, in_chans: int | None) -> torch.nn.Module:
    """A timm or torchvision model with random weights (never downloads)."""
    kwargs = {k: v for k, v in {"num_classes": num_classes}.items() if v is not None}
    try:
        if source == "torchvision":
            import torchvision

            if in_chans not in (None, 3):
                raise UserError(f"--in-chans {in_chans} is not supported for torchvision models: use a timm model")
            return torchvision.models.get_model(name, weights=None, **kwargs)
        import timm

        return timm.create_model(name, pretrained=False, **kwargs, **({"in_chans": in_chans} if in_chans else {}))
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"cannot build {source} model '{name}' ({err}): check --model and --source") from None


def convert_command(args: argparse.Namespace) -> int:
    """Write a checkpoint as safetensors, sharded with an HF index when large."""
    ckpt = read_checkpoint(args.src, trust_pickle=args.trust_pickle, ema=args.ema)
    tensors = ckpt.tensors
    if args.strip_wrappers:
        tensors = {strip_wrappers(k)[0]: v for k, v in tensors.items()}
        if len(tensors) != len(ckpt.tensors):
            raise UserError(f"--strip-wrappers makes two names in '{args.src}' equal: convert without it")
    size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size  # bytes, or "2GB"
    metadata = {"format": "pt", "source_format": ckpt.format}
    written = save_safetensors(tensors, args.dst, max_shard_size=size, metadata=metadata)
    for path in written:
        print(path)
    return 0


def adapter_command(args: argparse.Namespace) -> int:
    """Write the LoRA adapter of a training state alone (peft's key names; its settings in the metadata)."""
    from finetune.adapters import adapter_from_config, adapter_state
    from finetune.checkpoint import load_training_state

    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise UserError(f"'{args.dst}' should end in .safetensors: the adapter is written as safetensors")
    state = load_training_state(args.state)
    model_state = state["model"]
    adapter = adapter_from_config(str(state.get("config_yaml") or ""), model_state)
    metadata = adapter.metadata() | {"model_name": str(state["weights_metadata"].get("model_name", ""))}
    print(_atomic_save(_unshare(adapter_state(model_state)), dst, metadata))
    return 0


def save_safetensors(
    tensors: dict[str, torch.Tensor], dst: str | Path, *, max_shard_size: str | int, metadata: dict[str, str]
) -> list[Path]:
    """Save to one file, or to shards plus ``<file>.index.json`` (the Hugging Face layout).

    Shard planning is ``huggingface_hub.split_torch_state_dict_into_shards``; each
    file is written atomically (temp file, fsync, ``os.replace``).

    Returns:
        The files written (index last).
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    dst = Path(dst)
    file = dst if dst.suffix == ".safetensors" else dst / "model.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = _unshare(tensors)
    try:
        split = split_torch_state_dict_into_shards(tensors, filename_pattern=file.stem + "{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
    except ValueError as err:
        raise UserError(f"--max-shard-size {max_shard_size!r} is not a size ({err}): write e.g. 500MB or 2GB") from None
    written = []
    for name, keys in split.filename_to_tensors.items():
        written.append(_atomic_save({k: tensors[k] for k in keys}, file.parent / name, metadata))
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **metadata},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        written.append(_atomic_write_text(json.dumps(index, indent=2), file.parent / f"{file.name}.index.json"))
    return written


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()  # empty tensors may all report 0: never clone those
        result[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor.contiguous()
        seen.add(ptr)
    return result


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` to a temporary name beside ``path``, moved into place (`staged_path`)."""
    from safetensors.torch import save_file

    with staged_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _atomic_write_text(text: str, path: Path) -> Path:
    atomic_write_text(path, text)
    return path


if __name__ == "__main__":
    sys.exit(main())
