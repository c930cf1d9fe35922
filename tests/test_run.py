"""Whole runs in-process through run(cfg): every output file, determinism, freezing, reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import assert_manifest_matches_files, compose_config, make_image_folder, tiny_overrides
from finetune import load_model
from finetune.errors import UserError
from finetune.run import run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    base = tmp_path_factory.mktemp("run")
    root = make_image_folder(base / "images")
    cfg = compose_config(tiny_overrides(root, epochs=3) + ["trainer.ema=true"])
    final = run(cfg, run_dir=base / "out")
    return base / "out", final, root


def test_run_writes_every_output_and_each_loads(finished_run):
    out, final, _ = finished_run
    ckpt = out / "checkpoints"
    for name in ("best.safetensors", "last.safetensors", "last.ckpt", "manifest.json"):
        assert (ckpt / name).is_file(), name
    for name in ("metrics.jsonl", "summary.json", "load_report.json", "train.log", "split.json"):
        assert (out / name).is_file(), name
    state = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert state["train_state"]["epoch"] == 3 and state["optimizer"]["state"]
    assert set(state["model"]) == set(load_file(ckpt / "last.safetensors"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["best"]["metric"] == "val/acc1"
    assert summary["best"]["value"] == final["best/value"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train/loss", "val/loss", "val/acc1", "lr", "seconds", "step"} <= set(lines[0])
    assert "val/acc5" not in lines[0]  # 3 classes: no top-5
    assert "epoch 3/3" in (out / "train.log").read_text()
    assert json.loads((out / "load_report.json").read_text())["source"] is None
    split = json.loads((out / "split.json").read_text())
    assert split["layout"] == "train_val" and split["class_names"] == ["class_0", "class_1", "class_2"]
    assert split["counts"] == {"train": dict.fromkeys(split["class_names"], 6),
                               "val": dict.fromkeys(split["class_names"], 3)}
    assert set(load_file(ckpt / "best.safetensors")) == set(state["model"])


def test_manifest_checksums_match_the_files(finished_run):
    manifest = assert_manifest_matches_files(finished_run[0] / "checkpoints")
    assert manifest["best"] == "best.safetensors"
    assert {"best.safetensors", "last.safetensors", "last.ckpt"} <= set(manifest["files"])


def test_tensorboard_events_hold_the_curves(finished_run):
    out = finished_run[0]
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert len(events.Scalars("train/loss")) == steps
    assert len(events.Scalars("lr/head")) == steps and len(events.Scalars("lr/backbone")) == steps
    assert [e.step for e in events.Scalars("val/acc1")] == [steps // 3, 2 * steps // 3, steps]
    assert "val/confusion_matrix" in tags["images"]


def test_tensorboard_hparams_hold_the_settings_and_the_best_value(finished_run):
    out, _, root = finished_run
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0}).Reload()
    plugin = {tag.removeprefix("_hparams_/"): HParamsPluginData.FromString(content)
              for tag, content in events.PluginTagToContent("hparams").items()}
    assert {"experiment", "session_start_info", "session_end_info"} <= set(plugin)
    hparams = plugin["session_start_info"].session_start_info.hparams
    assert hparams["model.name"].string_value == "test_resnet"
    assert hparams["data.root"].string_value == str(root)
    assert hparams["trainer.max_epochs"].number_value == 3
    assert hparams["data.batch_size"].number_value == 4
    assert hparams["trainer.ema"].number_value == 1  # true
    finals = ["val/acc1", "val/loss", "train/loss"]
    assert sorted(m.name.tag for m in plugin["experiment"].experiment.metric_infos) == \
        sorted(["hparam/best"] + [f"hparam/final/{k}" for k in finals])
    summary = json.loads((out / "summary.json").read_text())
    assert [e.value for e in events.Scalars("hparam/best")] == [pytest.approx(summary["best"]["value"], rel=1e-6)]
    for key in finals:  # float32 in the event file
        assert [e.value for e in events.Scalars(f"hparam/final/{key}")] == [pytest.approx(summary["final"][key],
                                                                                          rel=1e-6)]


def test_weights_file_rebuilds_the_model_with_classes_and_preprocessing(finished_run):
    out, _, root = finished_run
    model, meta = load_model(out / "checkpoints" / "best.safetensors")
    assert meta.class_names == ["class_0", "class_1", "class_2"]
    assert meta.data_config["input_size"] == (3, 32, 32)
    with safe_open(str(out / "checkpoints" / "best.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert f.metadata()["model_name"] == "test_resnet"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reloaded, _ = load_model(out / "checkpoints" / "last.ckpt")
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    # the same weights put into a model built here with timm alone
    best = timm.create_model("test_resnet", num_classes=3).eval()
    best.load_state_dict(load_file(out / "checkpoints" / "best.safetensors"))
    trained = timm.create_model("test_resnet", num_classes=3).eval()
    trained.load_state_dict(state["model"])  # the raw model at the end of training (EMA is deployed, not this)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        torch.testing.assert_close(model(x), best(x), rtol=0, atol=0)
        torch.testing.assert_close(reloaded(x), trained(x), rtol=0, atol=0)
        assert not torch.allclose(reloaded(x), best(x))  # two different checkpoints, told apart
    assert reloaded.state_dict().keys() == state["model"].keys()
    assert all(torch.equal(state["model"][k], v) for k, v in reloaded.state_dict().items())


def test_ema_weights_are_the_deployed_ones(finished_run):
    out = finished_run[0] / "checkpoints"
    state = torch.load(out / "last.ckpt", weights_only=True)
    deployed = load_file(out / "last.safetensors")
    assert state["ema"] is not None
    key = next(k for k in deployed if k.endswith("weight") and deployed[k].ndim == 4)
    assert torch.equal(deployed[key], state["ema"]["module." + key])  # ModelEmaV3 wraps the model
    assert not torch.equal(deployed[key], state["model"][key])


def test_same_seed_and_config_give_bit_identical_weights(tmp_path):
    root = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(root, epochs=2) + ["model.drop_path_rate=0.1", "head.dropout=0.2"]
    for name in ("a", "b"):
        run(compose_config(overrides), run_dir=tmp_path / name)
    a = load_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run(compose_config(overrides + ["seed=1"]), run_dir=tmp_path / "c")
    c = load_file(tmp_path / "c" / "checkpoints" / "last.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_head_only_keeps_backbone_and_batchnorm_statistics_bit_identical(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run(compose_config(tiny_overrides(root, epochs=1) + ["freeze=head_only", "head.init=default"]),
        run_dir=tmp_path / "out")
    from finetune.models import build_model
    import finetune.runtime as rt
    rt.seed_everything(0)
    initial, _ = build_model(name="test_resnet", source="timm", num_classes=3, input_size=32)
    trained = load_file(tmp_path / "out" / "checkpoints" / "last.safetensors")
    for key, value in initial.state_dict().items():
        if key.startswith("fc."):
            assert not torch.equal(trained[key], value), f"head {key} did not train"
        else:
            assert torch.equal(trained[key], value), f"frozen {key} changed"


def test_flat_folder_is_split_and_the_split_recorded(tmp_path, monkeypatch):
    """An uneven flat folder (4, 10, 10 images), split 70/30: data.balance=loss_weights weighs the loss by
    N / (C * count) of the training split's class counts."""
    root = make_image_folder(tmp_path / "images", split=False, train=8, val=2)
    for image in sorted((root / "class_0").iterdir())[4:]:
        image.unlink()
    trainers = spy_on_trainers(monkeypatch)
    run(compose_config(tiny_overrides(root, epochs=1) + ["data.val_split=0.3", "data.balance=loss_weights"]),
        run_dir=tmp_path / "out")
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert record["layout"] == "split" and record["val_split"] == 0.3
    assert record["class_names"] == ["class_0", "class_1", "class_2"]
    counts = [record["counts"]["train"][name] for name in record["class_names"]]
    assert [c + record["counts"]["val"][n] for c, n in zip(counts, record["class_names"])] == [4, 10, 10]
    expected = torch.tensor([sum(counts) / (3 * c) for c in counts])
    assert len(trainers) == 1 and expected[0] > expected[1]  # the rare class weighs more
    torch.testing.assert_close(trainers[0].loss_fn.weight, expected)
    run(compose_config(tiny_overrides(root, epochs=1) + ["data.val_split=0.3"]), run_dir=tmp_path / "plain")
    assert len(trainers) == 2 and trainers[1].loss_fn.weight is None  # data.balance=none: an unweighted loss


def spy_on_trainers(monkeypatch) -> list:
    """The trainers the runs of this test build, in order."""
    from finetune import builders

    built, original = [], builders.build_trainer

    def build_trainer(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(builders, "build_trainer", build_trainer)
    return built


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    run(compose_config(tiny_overrides(root, epochs=1)), run_dir=out)
    before = (out / "checkpoints" / "last.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"train/loss became (nan|inf)"):  # a resume with a rate far too high
        run(compose_config(tiny_overrides(root, epochs=2) + ["resume=auto", "optim.lr=1e30",
                                                              "resume_allow_config_change=true"]), run_dir=out)
    assert (out / "checkpoints" / "last.safetensors").read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_num_classes_comes_from_the_data_unless_set(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run(compose_config(tiny_overrides(root, epochs=1) + ["model.num_classes=5"]), run_dir=tmp_path / "out")
    _, meta = load_model(tmp_path / "out" / "checkpoints" / "last.safetensors")
    assert meta.num_classes == 5


@pytest.mark.parametrize("in_chans", [1, 4])
def test_grey_and_rgba_models_train_on_image_folders(tmp_path, in_chans):
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    run(compose_config(tiny_overrides(root, epochs=1) + [f"model.in_chans={in_chans}"]), run_dir=out)
    model, meta = load_model(out / "checkpoints" / "last.safetensors")
    assert meta.in_chans == in_chans and meta.data_config["input_size"] == (in_chans, 32, 32)
    assert len(meta.data_config["mean"]) == in_chans
    assert model(torch.randn(2, in_chans, 32, 32)).shape == (2, 3)


def test_an_unreadable_channel_count_is_refused_before_training(tmp_path):
    root = make_image_folder(tmp_path / "images")
    with pytest.raises(UserError, match="model.in_chans=2: image files give"):
        run(compose_config(tiny_overrides(root, epochs=1) + ["model.in_chans=2"]), run_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
