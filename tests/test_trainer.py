"""The Trainer on its own: no config, small models, in-memory batches."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from finetune.errors import UserError
from finetune.metrics import MetricAccumulator
from finetune.optim import build_optimizer, build_param_groups, build_scheduler
from finetune.trainer import Trainer, TrainerHook, TrainingDiverged, TrainState

CPU = torch.device("cpu")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 2, 2, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def make_trainer(model: nn.Module, *, lr: float = 0.1, opt: str = "momentum", **kw) -> Trainer:
    groups = build_param_groups(model, head="3", weight_decay=0.0)
    optimizer = build_optimizer(groups, name=opt, lr=lr, momentum=0.0)
    kw.setdefault("max_epochs", 1)
    return Trainer(model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), device=CPU,
                   num_classes=3, progress_bar=False, **kw)


def test_accumulation_equals_one_big_batch():
    big = batches(1, 8)
    small = [(big[0][0][:4], big[0][1][:4]), (big[0][0][4:], big[0][1][4:])]
    a, b, initial = mlp(), mlp(), mlp()
    make_trainer(a).train_epoch(big, TrainState())
    state = TrainState()
    make_trainer(b, accumulate=2).train_epoch(small, state)
    assert state.global_step == 1
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert not all(torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), initial.parameters()))  # it updated


def test_grad_clip_bounds_the_update():
    model, before = mlp(), [p.detach().clone() for p in mlp().parameters()]
    make_trainer(model, lr=1.0, grad_clip=0.01).train_epoch(batches(1, 8), TrainState())
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert change.norm().item() == pytest.approx(0.01, rel=1e-4)  # unclipped, this update's norm is ~0.53


def test_scheduler_is_stepped_on_every_update():
    model = mlp()
    trainer = make_trainer(model, opt="adamw", lr=1e-2)
    trainer.scheduler = build_scheduler(trainer.optimizer, name="cosine", epochs=2, updates_per_epoch=5,
                                        warmup_epochs=1, warmup_lr=1e-4, min_lr=0.0)
    seen = []

    class Record(TrainerHook):
        def on_step(self, state, logs):
            seen.append((state.global_step, logs["lr/head"]))

    trainer.hooks = [Record()]
    trainer.train_epoch(batches(5, 4), TrainState())
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    rates = [lr for _, lr in seen]  # the rate each update used (logged before the scheduler steps past it)
    assert rates == pytest.approx([1e-4 + t * (1e-2 - 1e-4) / 5 for t in range(5)])  # warming up, one step at a time
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # warmup ends at the peak rate


def test_bf16_autocast_on_cpu_trains():
    model = timm.create_model("test_resnet", num_classes=3)
    trainer = Trainer(model=model, optimizer=build_optimizer(build_param_groups(model, head="fc", weight_decay=0),
                                                             name="adamw", lr=1e-3),
                      loss_fn=nn.CrossEntropyLoss(), device=CPU, num_classes=3, max_epochs=1,
                      autocast_dtype=torch.bfloat16, channels_last=True, progress_bar=False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = [(images, torch.tensor([0, 1, 2, 0]))] * 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = trainer.train_epoch(data, TrainState())
    assert torch.isfinite(torch.tensor(logs["train/loss"]))
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    result = trainer.evaluate(data)
    model.eval()  # the same bf16 forward, computed here: the reported metrics are this model's on this data
    inputs, target = data[0][0].to(memory_format=torch.channels_last), data[0][1]
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(inputs).float()
    assert result.acc1 == (logits.argmax(dim=1) == target).float().mean().item()
    assert result.loss == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)


def test_early_stopping_on_a_metric_that_stops_improving():
    trainer = make_trainer(mlp(), lr=1e-12, max_epochs=10, monitor="val/loss", patience=2, min_delta=1e-3)
    state = trainer.fit(batches(2, 4), batches(1, 6, seed=1))
    assert state.epoch == 3 and state.best_epoch == 1 and state.stale_epochs == 2
    assert trainer.mode == "min"


def test_unknown_monitor_is_a_clear_error():
    trainer = make_trainer(mlp(), monitor="val/f1")
    with pytest.raises(UserError, match=r"checkpoint.monitor 'val/f1' is not a metric of this run; "
                                        r"choose one of lr/.*, train/loss, val/acc1, val/loss$"):
        trainer.fit(batches(1, 4), batches(1, 4))


def test_nan_loss_raises_before_the_weights_change():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    bad = [(torch.full((4, 3, 2, 2), float("nan")), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(TrainingDiverged, match="train/loss became nan at epoch 1, batch 1"):
        make_trainer(model).train_epoch(bad, TrainState())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_ema_weights_are_evaluated_when_ema_is_on():
    from timm.utils import ModelEmaV3

    model = mlp()
    ema = ModelEmaV3(model, decay=0.0)  # EMA == the weights after the last update
    trainer = make_trainer(model, ema=ema)
    trainer.train_epoch(batches(2, 4), TrainState())
    for p, q in zip(model.parameters(), ema.module.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        model[3].weight.zero_()  # the raw model diverges from EMA; evaluation must not see it
    val = batches(1, 12, seed=3)
    with torch.no_grad():
        ema_loss = F.cross_entropy(ema.module(val[0][0]), val[0][1]).item()
        raw_loss = F.cross_entropy(model(val[0][0]), val[0][1]).item()
    assert ema_loss != pytest.approx(raw_loss)  # so the check below tells the two apart
    assert trainer.evaluate(val).loss == pytest.approx(ema_loss)
    assert trainer.evaluate(val, model=model).loss == pytest.approx(raw_loss)


def test_metrics_top1_top5_per_class_and_confusion():
    acc = MetricAccumulator(6)
    logits = torch.eye(6)[[0, 1, 2, 3]] * 10
    target = torch.tensor([0, 1, 3, 3])
    acc.update(logits, target, loss_sum=2.0)
    result = acc.result()
    assert result.acc1 == 0.75 and result.acc5 == 1.0 and result.loss == 0.5
    assert result.confusion[3, 2] == 1 and result.confusion[3, 3] == 1
    assert result.per_class_acc[:4] == [1.0, 1.0, 0.0, 0.5]
    assert MetricAccumulator(3).result().acc5 is None
