"""finetune: config-driven transfer learning for PyTorch image classifiers.

Where things happen (one module per concern; data flows one way, and no module imports another that
imports it back, tests/test_architecture.py):

- a run's setup, training and teardown: ``recipe`` (``Recipe.setup`` is the table of contents; ``run.run``
  calls it); only ``recipe`` and ``builders`` read the config, ``config`` checks it first;
- resume: ``resume`` (one ``ResumePlan``: located first, applied last);
- saving: ``checkpoint/`` (``policy`` decides, ``manager`` runs the same code on every rank, its
  ``FileWriter`` writes on rank 0); how a run ended: ``summary``;
- decisions every DDP rank must share: ``distributed.World.agree`` (rank 0's, broadcast);
- the loop: ``trainer``; trackers: ``loggers`` (the ``Logger`` Protocol); data: ``data/`` (WebDataset shards:
  ``data/shards``, exact epochs over them: ``data/stream``; writing them: ``shard``); models and
  heads: ``models``, ``heads``; pretrained weights: ``weights/``; freezing: ``freezing/``;
- inference (evaluate, predict, export share it): ``inference``; the torch-free ONNX predictor: ``onnx_predict``;
- every file written, and files from others read with bounds: ``files``; run and sweep dirs: ``rundir``;
- how a command ends and what it prints to paste: ``cli``.
"""

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
