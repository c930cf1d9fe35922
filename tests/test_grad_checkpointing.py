"""``trainer.grad_checkpointing`` (issue 26, item 3): the same gradients as without it, and one line where a
model cannot."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import compose_config
from finetune import builders
from finetune.errors import UserError


def built(*overrides: str):
    cfg = compose_config(["model.pretrained=false", *overrides])
    model, spec = builders.build_classifier(cfg.model, head=cfg.head, num_classes=3)
    return cfg, model, spec


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet"])
def test_the_gradients_are_those_without_it(name):
    cfg, model, spec = built(f"model.name={name}", "trainer.grad_checkpointing=true")
    plain = copy.deepcopy(model)
    builders.set_grad_checkpointing(cfg.trainer, model, spec)
    assert model.grad_checkpointing and not plain.grad_checkpointing
    torch.manual_seed(0)
    inputs, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    grads = []
    for m in (plain, model):
        m.train()
        torch.nn.functional.cross_entropy(m(inputs), target).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(plain.parameters()))
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=0, atol=1e-6, msg=key)


def test_a_model_without_it_is_refused_in_one_line():
    cfg, model, spec = built("model=tv_resnet50", "trainer.grad_checkpointing=true")
    with pytest.raises(UserError) as err:
        builders.set_grad_checkpointing(cfg.trainer, model, spec)
    assert "trainer.grad_checkpointing=true needs a timm model" in str(err.value) and "\n" not in str(err.value)
    cfg, model, spec = built("model.name=test_resnet")  # off: nothing changes
    builders.set_grad_checkpointing(cfg.trainer, model, spec)
    assert not model.grad_checkpointing
