"""finetune: config-driven transfer learning for PyTorch image classifiers."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def load_model(path: Any, **kwargs: Any) -> Any:
    """Rebuild a fine-tuned model from a weights file; see ``finetune.checkpoint.load_model``."""
    from finetune.checkpoint import load_model as _load_model

    return _load_model(path, **kwargs)
