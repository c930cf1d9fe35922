"""What stays fixed while fine-tuning, when it starts to learn, and proof that it stayed fixed.

A backbone is cut into ordered *stages* (timm's coarse ``group_matcher``; for models
without one, e.g. torchvision's, the top-level children in order), the new head
last. ``plan_freeze`` turns ``freeze.*`` into the set of frozen parameters plus an
unfreeze schedule, failing on any name or pattern that matches nothing;
``apply_freeze`` applies it before the optimizer exists. Frozen parameters get
``requires_grad=False`` and stay in the optimizer (no gradient, no update, no state),
so its layout never depends on what is frozen.

BatchNorm of frozen parts (``bn``): ``train`` keeps normalising with batch statistics
and updating running ones; ``eval`` pins the layer in eval mode, so every later
``model.train()`` leaves it alone; ``frozen`` swaps plain ``BatchNorm2d`` for
``FrozenBatchNorm2d`` (other BN types are pinned to eval, which computes the same).

``FreezeController`` is the ``TrainerHook`` that unfreezes on schedule, logs the
per-stage table and checks after each epoch that every frozen tensor is bit-identical
to its value when frozen. Its ``state_dict()`` is what a resume must restore.

Modules, in the order a run uses them:

- `finetune.freezing.stages`: cut a model into named stages (``find_stages``);
- `finetune.freezing.plan`: resolve ``freeze.*`` into a ``FreezePlan`` (``plan_freeze``);
- `finetune.freezing.apply`: apply a plan, BatchNorm included (``apply_freeze``);
- `finetune.freezing.controller`: the schedule hook, bit-exact verification and the table.
"""

from finetune.freezing.apply import (BN_MODES, FrozenBatchNorm2d, apply_freeze, batchnorm_layers, bn_mode, freeze_bn,
                                     is_bn_frozen, pin_eval, unfreeze_bn, unpin)
from finetune.freezing.controller import (FreezeController, FrozenParametersChanged, fingerprint, freeze_table,
                                          frozen_tensors)
from finetune.freezing.plan import ALL, FREEZE_MODES, FreezePlan, plan_freeze, resolve_target
from finetune.freezing.stages import HEAD_STAGE, Stage, find_stages, group_label

__all__ = [
    "ALL",
    "BN_MODES",
    "FREEZE_MODES",
    "HEAD_STAGE",
    "FreezeController",
    "FreezePlan",
    "FrozenBatchNorm2d",
    "FrozenParametersChanged",
    "Stage",
    "apply_freeze",
    "batchnorm_layers",
    "bn_mode",
    "find_stages",
    "fingerprint",
    "freeze_bn",
    "freeze_table",
    "frozen_tensors",
    "group_label",
    "is_bn_frozen",
    "pin_eval",
    "plan_freeze",
    "resolve_target",
    "unfreeze_bn",
    "unpin",
]
