"""finetune: config-driven transfer learning for PyTorch image classifiers."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def load_model(path: Any, **kwargs: Any) -> Any:
    """Rebuild a fine-tuned model from a weights file, a ``last.ckpt`` or a run dir (its best weights).

    Returns ``(model, meta)``: the model in eval mode, and its ``ModelMeta`` (``class_names``,
    ``data_config``, ``read_image(path)`` and ``transform()`` for the preprocessing it was evaluated with)::

        model, meta = finetune.load_model("outputs/2026-11-28/10-00-00")
        x = meta.transform()(meta.read_image("cat.jpg")).unsqueeze(0)
        print(meta.class_names[model(x).argmax(1).item()])
    """
    from finetune.checkpoint import load_model as _load_model
    from finetune.inference import resolve_checkpoint

    return _load_model(resolve_checkpoint(path), **kwargs)
