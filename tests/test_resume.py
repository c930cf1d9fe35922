"""Resume in-process: exact continuation from any saved state, signals, best kept, config changes refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import DropPath

from conftest import compose_config, make_image_folder, tiny_overrides
from finetune import builders
from finetune.checkpoint import Manifest, load_training_state, save_training_state, verify_file
from finetune.errors import UnexpectedReadError, UserError
from finetune.models import build_model
from finetune.run import run
from finetune.signals import TrainingInterrupted
from finetune.trainer import TrainerHook
from test_checkpoint import assert_same_result

POLICY = ["checkpoint.every_n_steps=2", "checkpoint.keep_last_k=null"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted 3-epoch run (5 updates per epoch) that kept every training state."""
    base = tmp_path_factory.mktemp("resume")
    root = make_image_folder(base / "images")
    overrides = tiny_overrides(root, epochs=3) + POLICY
    run(compose_config(overrides), run_dir=base / "ref")
    return base / "ref", overrides


def copy_run(ref: Path, dest: Path) -> Path:
    shutil.copytree(ref, dest)
    return dest


class SignalAt(TrainerHook):
    """Sends ``signals`` to this process after optimizer update ``step``."""

    def __init__(self, step: int, *signals: int):
        self.step, self.signals = step, signals

    def on_step(self, state, logs) -> None:
        if state.global_step == self.step:
            for sig in self.signals:
                os.kill(os.getpid(), sig)


def with_hook(monkeypatch, hook, *, at: int | None = None) -> None:
    """Runs built by ``run`` get ``hook`` among the trainer's hooks (at index ``at``; default: last)."""
    original = builders.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.hooks.insert(len(trainer.hooks) if at is None else at, hook)
        return trainer

    monkeypatch.setattr(builders, "build_trainer", build_trainer)


def with_signals(monkeypatch, step: int, *signals: int) -> None:
    with_hook(monkeypatch, SignalAt(step, *signals))


def train_loss_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars("train/loss")]


@pytest.mark.parametrize("state_file", ["epoch001-step000006.ckpt", "epoch002-step000010.ckpt"])
def test_resume_in_place_from_an_earlier_state_ends_bit_identical(reference, tmp_path, state_file):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")  # as if killed right after that state was written
    run(compose_config(overrides + [f"resume={out / 'checkpoints' / state_file}"]), run_dir=out)
    assert_same_result(out, ref)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert train_loss_steps(out) == list(range(1, 16))  # TensorBoard purged the overlap: no step twice


def test_resume_mid_epoch_with_loader_workers_ends_bit_identical(reference, tmp_path):
    """Loader workers (persistent) start fetching the moment the loader is iterated: a resumed epoch
    still skips exactly the batches already trained on (the reference ran without workers)."""
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    state = out / "checkpoints" / "epoch001-step000006.ckpt"  # 1 batch into epoch 2
    run(compose_config(overrides + ["data.num_workers=1", f"resume={state}"]), run_dir=out)
    assert_same_result(out, ref)
    assert train_loss_steps(out) == list(range(1, 16))


def test_resume_mid_epoch_with_gradient_accumulation_ends_bit_identical(tmp_path):
    root = make_image_folder(tmp_path / "images")  # 18 images, batch 4: 5 batches, 3 updates per epoch
    overrides = tiny_overrides(root, epochs=2) + ["trainer.accumulate=2", "checkpoint.every_n_steps=1",
                                                  "checkpoint.keep_last_k=null"]
    ref = tmp_path / "ref"
    run(compose_config(overrides), run_dir=ref)
    states = {n: load_training_state(ref / "checkpoints" / n)["train_state"]
              for n in Manifest(ref / "checkpoints" / "manifest.json").states() if n != "last.ckpt"}
    mid_epoch = sorted(n for n, s in states.items() if 0 < s["batches_seen"] < s["epoch_batches"])
    assert [states[n]["batches_seen"] for n in mid_epoch] == [2, 4, 2, 4]  # updates after 2 and 4 batches
    for name in (mid_epoch[1], mid_epoch[2]):
        out = copy_run(ref, tmp_path / name)
        run(compose_config(overrides + [f"resume={out / 'checkpoints' / name}"]), run_dir=out)
        assert_same_result(out, ref)


STOCHASTIC = ["head=mlp", "head.hidden=[16]", "head.dropout=0.5", "model.drop_path_rate=0.5"]


def test_the_model_of_the_stochastic_runs_draws_random_numbers_in_training():
    """What the next test relies on: with these settings a training step draws from the RNG, and its output
    depends on what it drew, in the head (Dropout) and in the backbone (DropPath), each alone."""
    for dropout, drop_path in ((0.5, 0.0), (0.0, 0.5)):
        model, _ = build_model(name="test_resnet", source="timm", num_classes=3, head="mlp", hidden=[16],
                               dropout=dropout, drop_path_rate=drop_path)
        assert any(isinstance(m, DropPath) for m in model.modules()) == (drop_path > 0)
        for norm in model.modules():  # as after training: timm starts each block's last norm at zero, so
            if isinstance(norm, torch.nn.BatchNorm2d):  # at init the residual DropPath drops is all zeros
                torch.nn.init.ones_(norm.weight)
        x = torch.randn(4, 3, 32, 32)
        model.train()
        before = torch.get_rng_state()
        assert not torch.equal(model(x), model(x)), (dropout, drop_path)
        assert not torch.equal(torch.get_rng_state(), before)
        model.eval()
        before = torch.get_rng_state()
        assert torch.equal(model(x), model(x)) and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("state_file", ["epoch000-step000004.ckpt", "epoch001-step000005.ckpt"])
def test_resume_with_dropout_and_drop_path_restores_the_rng_and_ends_bit_identical(tmp_path, state_file):
    """The runs above draw no random numbers while training, so they pass whether or not resume restores
    the RNG state; here every step's Dropout and DropPath masks come from it: mid-epoch and at an
    epoch boundary, the resumed run ends with the uninterrupted run's weights only if it does."""
    root = make_image_folder(tmp_path / "images")  # 18 images, batch 4: 5 updates per epoch
    overrides = tiny_overrides(root, epochs=2) + POLICY + STOCHASTIC
    ref = tmp_path / "ref"
    run(compose_config(overrides), run_dir=ref)
    out = copy_run(ref, tmp_path / "run")
    run(compose_config(overrides + [f"resume={out / 'checkpoints' / state_file}"]), run_dir=out)
    assert_same_result(out, ref)
    assert train_loss_steps(out) == list(range(1, 11))


def test_sigterm_finishes_the_step_saves_and_the_resumed_run_is_identical(reference, tmp_path, monkeypatch):
    ref, overrides = reference
    out = tmp_path / "run"
    with_signals(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as err:
        run(compose_config(overrides), run_dir=out)
    assert err.value.exit_code == 128 + signal.SIGTERM
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["resume_with"].endswith(f"resume={out}")
    state = load_training_state(out / "checkpoints" / "last.ckpt")
    assert (state["train_state"]["global_step"], state["train_state"]["batches_seen"]) == (3, 3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    monkeypatch.undo()
    run(compose_config(overrides + ["resume=auto"]), run_dir=out)
    assert_same_result(out, ref)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert train_loss_steps(out) == list(range(1, 16))


class CrashAfterLogging(TrainerHook):
    """Stands in for a SIGKILL between an epoch's logs and its checkpoint (placed before the manager)."""

    def on_epoch_end(self, state, logs, result, improved) -> None:
        raise RuntimeError("killed")


def test_an_epoch_logged_but_not_checkpointed_is_logged_once_after_resume(reference, tmp_path, monkeypatch):
    """Stopped on epoch 1's last update, then killed after its evaluation was logged but not saved."""
    ref, overrides = reference
    out = tmp_path / "run"
    with_signals(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        run(compose_config(overrides), run_dir=out)
    state = load_training_state(out / "checkpoints" / "last.ckpt")["train_state"]
    assert (state["epoch"], state["global_step"], state["batches_seen"]) == (0, 5, 5)  # evaluation to come
    with_hook(monkeypatch, CrashAfterLogging(), at=2)  # after TensorBoard and metrics.jsonl, before checkpoints
    with pytest.raises(RuntimeError, match="killed"):
        run(compose_config(overrides + ["resume=auto"]), run_dir=out)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [5]
    monkeypatch.undo()

    run(compose_config(overrides + ["resume=auto"]), run_dir=out)
    assert_same_result(out, ref)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("val/acc1")] == [5, 10, 15]
    assert train_loss_steps(out) == list(range(1, 16))
    ref_events = EventAccumulator(str(ref / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [e.value for e in ref_events.Scalars("train/loss")]


def test_a_second_sigint_aborts_at_once_without_saving(reference, tmp_path, monkeypatch):
    _, overrides = reference
    out = tmp_path / "run"
    with_signals(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as err:
        run(compose_config(overrides), run_dir=out)
    assert not isinstance(err.value, TrainingInterrupted)
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    manifest = Manifest(out / "checkpoints" / "manifest.json")
    assert manifest.files["last.ckpt"]["step"] == 2  # the every_n_steps save; nothing written for step 3


def test_resume_auto_skips_a_corrupt_last_ckpt_with_a_warning_naming_it(reference, tmp_path, caplog):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    last = out / "checkpoints" / "last.ckpt"
    last.unlink()  # a fresh inode: the periodic hard links keep their bytes
    data = bytearray((ref / "checkpoints" / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        run(compose_config(overrides + ["resume=auto"]), run_dir=out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"'{last}' is corrupt" in w and "falling back" in w for w in warnings), warnings
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("epoch002-step000014.ckpt")
    assert_same_result(out, ref)


def test_resume_auto_stops_on_an_unexpected_read_error_instead_of_falling_back(reference, tmp_path, monkeypatch,
                                                                              caplog):
    """A reader failing in a way that says nothing about the file (here: as if a torch release changed
    torch.load) is not damage: the older states would fail alike, and falling back would drop the newer
    progress with only a warning. Resume stops on it, naming the newest state, with the cause kept."""
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    before = {p: p.read_bytes() for p in (out / "checkpoints").iterdir() if p.is_file()}
    boom = TypeError("load() got an unexpected keyword argument 'mmap'")

    def changed_load(*args, **kwargs):
        raise boom

    monkeypatch.setattr(torch, "load", changed_load)
    with caplog.at_level(logging.WARNING, logger="finetune"), pytest.raises(UnexpectedReadError) as info:
        run(compose_config(overrides + ["resume=auto"]), run_dir=out)
    message = str(info.value)
    assert f"'{out / 'checkpoints' / 'last.ckpt'}'" in message and "unexpected error" in message, message
    assert "TypeError: load() got an unexpected keyword" in message and info.value.__cause__ is boom
    assert not [r for r in caplog.records if "falling back" in r.getMessage()]
    assert before == {p: p.read_bytes() for p in before}, "a refused resume changed a checkpoint file"


def test_a_fresh_run_never_replaces_a_runs_checkpoints(reference, tmp_path):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "train.log"}
    with pytest.raises(UserError, match="already holds the checkpoints of a run .* continue it with resume=auto"):
        run(compose_config(overrides), run_dir=out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "train.log"} == before
    assert "left as it was" in (out / "train.log").read_text()


def test_a_refused_resume_keeps_the_runs_summary(reference, tmp_path):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    with pytest.raises(UserError, match="optim.lr"):
        run(compose_config(overrides + ["resume=auto", "optim.lr=0.5"]), run_dir=out)
    assert (out / "summary.json").read_bytes() == (ref / "summary.json").read_bytes()


def test_resume_auto_without_checkpoints_starts_fresh_with_a_notice(reference, tmp_path, caplog):
    ref, overrides = reference
    with caplog.at_level(logging.INFO, logger="finetune"):
        run(compose_config(overrides + ["resume=auto"]), run_dir=tmp_path / "run")
    assert any("no checkpoint" in r.getMessage() and "starting fresh" in r.getMessage() for r in caplog.records)
    assert_same_result(tmp_path / "run", ref)


def test_resume_from_a_file_into_a_new_run_dir(reference, tmp_path):
    ref, overrides = reference
    run(compose_config(overrides + [f"resume={ref / 'checkpoints' / 'epoch001-step000006.ckpt'}"]),
        run_dir=tmp_path / "new")
    assert_same_result(tmp_path / "new", ref)


def test_resume_from_a_file_into_a_new_run_dir_carries_over_best_and_top_k(tmp_path):
    root = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(root, epochs=3) + POLICY + ["checkpoint.save_top_k=2"]
    ref = tmp_path / "ref"
    run(compose_config(overrides), run_dir=ref)
    ref_manifest = Manifest(ref / "checkpoints" / "manifest.json")
    records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    best_epoch = max(records, key=lambda r: (r["val/acc1"], -r["epoch"]))["epoch"]
    state = next(n for n in ref_manifest.states() if ref_manifest.files[n]["epoch"] == best_epoch)

    out = tmp_path / "new"
    run(compose_config(overrides + [f"resume={ref / 'checkpoints' / state}"]), run_dir=out)
    manifest = Manifest(out / "checkpoints" / "manifest.json")
    assert manifest.data["best"] == "best.safetensors" and manifest.files["best.safetensors"]["epoch"] == best_epoch
    assert (out / "checkpoints" / "best.safetensors").read_bytes() == \
        (ref / "checkpoints" / "best.safetensors").read_bytes()  # carried over, and no later epoch beat it
    top_k = sorted(n for n in manifest.files if manifest.files[n]["kind"] == "top_k")
    assert top_k == sorted(n for n in ref_manifest.files if ref_manifest.files[n]["kind"] == "top_k")
    for name in top_k:
        verify_file(out / "checkpoints" / name, manifest.files[name])
    assert_same_result(out, ref)


def test_best_replaced_in_the_source_run_is_not_carried_over_and_that_is_said(reference, tmp_path, caplog):
    ref, overrides = reference
    records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["best"] and any(r["best"] for r in records[1:])  # epoch 1's best was replaced later
    with caplog.at_level(logging.WARNING, logger="finetune"):
        run(compose_config(overrides + [f"resume={ref / 'checkpoints' / 'epoch001-step000006.ckpt'}"]),
            run_dir=tmp_path / "new")
    assert "does not hold the best weights of epoch 1 (a later epoch replaced them)" in caplog.text
    assert_same_result(tmp_path / "new", ref)


def test_a_worse_epoch_after_resume_does_not_replace_best(reference, tmp_path):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    ckpt = out / "checkpoints"
    state = load_training_state(ckpt / "epoch001-step000005.ckpt")  # end of epoch 1
    state["train_state"]["best_value"] = 1.0  # no later epoch can beat it
    facts = save_training_state(ckpt / "epoch001-step000005.ckpt", state)
    manifest = Manifest(ckpt / "manifest.json")
    manifest.files["epoch001-step000005.ckpt"] |= facts.entry()
    manifest.save()
    best_before = (ckpt / "best.safetensors").read_bytes()
    run(compose_config(overrides + [f"resume={ckpt / 'epoch001-step000005.ckpt'}"]), run_dir=out)
    assert (ckpt / "best.safetensors").read_bytes() == best_before
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["best"] for r in records[1:]] == [False, False]
    assert load_training_state(ckpt / "last.ckpt")["train_state"]["best_value"] == 1.0


def test_overrides_that_change_the_experiment_are_refused_with_a_diff(reference, tmp_path, caplog):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    with pytest.raises(UserError) as err:
        run(compose_config(overrides + ["resume=auto", "optim.lr=0.01", "data.batch_size=2"]), run_dir=out)
    message = str(err.value)
    assert "data.batch_size: 4 -> 2" in message and "optim.lr: 0.001 -> 0.01" in message
    assert "resume_allow_config_change=true" in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="finetune"):
        run(compose_config(overrides + ["resume=auto", "optim.lr=0.01", "resume_allow_config_change=true"]),
            run_dir=out)
    assert any("optim.lr: 0.001 -> 0.01" in r.getMessage() for r in caplog.records)


def test_run_time_settings_may_change_on_resume(reference, tmp_path):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    changed = ["trainer.max_epochs=4", "data.num_workers=1", "trainer.device=cpu", "logger.log_every_n_steps=2",
               "checkpoint.every_n_steps=3"]
    run(compose_config(overrides + ["resume=auto"] + changed), run_dir=out)
    assert load_training_state(out / "checkpoints" / "last.ckpt")["train_state"]["epoch"] == 4



def lr_curve(run_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    tag = sorted(t for t in events.Tags()["scalars"] if t.startswith("lr/"))[0]
    return {e.step: e.value for e in events.Scalars(tag)}


def test_raising_max_epochs_on_resume_continues_on_the_longer_schedule(reference, tmp_path, caplog):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        run(compose_config(overrides + ["resume=auto", "trainer.max_epochs=5"]), run_dir=out)
    assert "resumed with changed settings (trainer.max_epochs: 3 -> 5): they apply from step 15" in caplog.text
    fresh = tmp_path / "fresh"
    run(compose_config(overrides + ["trainer.max_epochs=5"]), run_dir=fresh)
    resumed, planned = lr_curve(out), lr_curve(fresh)
    assert sorted(resumed) == sorted(planned) == list(range(1, 26))
    assert [resumed[k] for k in range(16, 26)] == [planned[k] for k in range(16, 26)]
    # lr/<group> at step N is the rate update N used: step 15 is the 3-epoch cosine's last, smallest rate,
    # and a schedule stuck at its end would stay at or below it
    assert resumed[16] > 2 * lr_curve(ref)[15]


def test_an_allowed_rate_change_on_resume_takes_effect(reference, tmp_path, caplog):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    state = out / "checkpoints" / "epoch001-step000006.ckpt"
    with caplog.at_level(logging.WARNING, logger="finetune"):
        run(compose_config(overrides + [f"resume={state}", "optim.lr=0.01", "resume_allow_config_change=true"]),
            run_dir=out)
    assert "they apply from step 6" in caplog.text
    fresh = tmp_path / "fresh"
    run(compose_config(overrides + ["optim.lr=0.01"]), run_dir=fresh)
    resumed, planned = lr_curve(out), lr_curve(fresh)
    assert [resumed[k] for k in range(7, 16)] == [planned[k] for k in range(7, 16)]
    assert resumed[6] == lr_curve(ref)[6]  # before the resume: the old rate


def test_lowering_max_epochs_below_what_was_trained_is_refused(reference, tmp_path):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    with pytest.raises(UserError, match=r"trainer.max_epochs=2 but '.*last.ckpt' has already trained 3 epochs"):
        run(compose_config(overrides + ["resume=auto", "trainer.max_epochs=2"]), run_dir=out)
    assert_same_result(out, ref)  # nothing touched


def test_resuming_a_finished_run_trains_nothing_and_says_so(reference, tmp_path, caplog):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="finetune"):
        run(compose_config(overrides + ["resume=auto"]), run_dir=out)
    assert "has already trained all 3 epochs: nothing left to train" in caplog.text
    assert_same_result(out, ref)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_state_resumed_from_is_never_pruned(reference, tmp_path):
    ref, overrides = reference
    out = copy_run(ref, tmp_path / "run")
    run(compose_config(overrides + ["resume=auto", "trainer.max_epochs=4", "checkpoint.keep_last_k=1"]), run_dir=out)
    manifest = Manifest(out / "checkpoints" / "manifest.json")
    periodic = sorted(n for n, e in manifest.files.items() if e["kind"] == "periodic")
    assert periodic == ["epoch003-step000015.ckpt", "epoch003-step000018.ckpt"]  # resumed-from + the newest 1
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == periodic + ["last.ckpt"]
    assert (out / "checkpoints" / "best.safetensors").is_file()
