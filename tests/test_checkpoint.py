"""Checkpoint policy and safe writes, in-process: what is written, verified, pruned, and survives faults."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_manifest_matches_files, compose_config, make_image_folder, tiny_overrides
from finetune import load_model
from finetune.checkpoint import (CheckpointPolicy, atomic_write_stream, file_digest, load_training_state,
                                 verify_file)
from finetune.errors import UserError
from finetune.run import run

POLICY = ["checkpoint.every_n_steps=2", "checkpoint.save_top_k=2", "checkpoint.keep_last_k=2"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_result(a: Path, b: Path) -> None:
    """Bit-identical final model, optimizer state and deployed weights."""
    sa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert sa["train_state"]["global_step"] == sb["train_state"]["global_step"]
    assert same_tensors(sa["model"], sb["model"]), "final weights differ"
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa and oa.keys() == ob.keys(), "the optimizer holds state for other parameters"
    for k in oa:
        assert oa[k].keys() == ob[k].keys() and all(torch.equal(oa[k][n], ob[k][n]) for n in oa[k]), \
            f"optimizer state {k} differs"
    assert same_tensors(load_file(a / "checkpoints" / "last.safetensors"),
                        load_file(b / "checkpoints" / "last.safetensors"))


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("policy")
    root = make_image_folder(base / "images")
    run(compose_config(tiny_overrides(root, epochs=4) + POLICY + ["trainer.ema=true"]), run_dir=base / "out")
    return base / "out", root


def test_every_file_loads_weights_only_and_matches_its_manifest_entry(policy_run):
    out = policy_run[0] / "checkpoints"
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json", ".lock"}  # .lock: the run-dir lock
    assert on_disk == set(manifest["files"]), "every file is in the manifest and nothing else is on disk"
    assert_manifest_matches_files(out)
    for name, entry in manifest["files"].items():
        if name.endswith(".ckpt"):
            state = torch.load(out / name, weights_only=True)
            assert state["train_state"]["global_step"] == entry["step"]
        else:
            with safe_open(str(out / name), framework="pt") as f:
                assert f.metadata()["format"] == "finetune.weights/1" and f.metadata()["model_name"] == "test_resnet"
    state = torch.load(out / "last.ckpt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "ema", "rng", "train_state", "data_order", "checkpoint_policy",
                "config_yaml", "versions", "freeze"):
        assert key in state, key
    assert isinstance(state["config_yaml"], str) and "test_resnet" in state["config_yaml"]
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])


def test_top_k_files_are_the_k_best_epochs_named_by_epoch_and_metric(policy_run):
    out, _ = policy_run
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ranked = sorted(records, key=lambda r: (-r["val/acc1"], r["epoch"]))[:2]
    expected = {f"epoch{r['epoch']:03d}-val_acc1-{r['val/acc1']:.4f}.safetensors" for r in ranked}
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert {n for n, e in manifest["files"].items() if e["kind"] == "top_k"} == expected
    best = max(records, key=lambda r: (r["val/acc1"], -r["epoch"]))
    assert manifest["files"]["best.safetensors"]["epoch"] == best["epoch"]
    policy = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["checkpoint_policy"]
    assert {e["name"] for e in policy["top_k"]} == expected


def test_periodic_states_are_pruned_to_keep_last_k(policy_run):
    out = policy_run[0] / "checkpoints"
    manifest = json.loads((out / "manifest.json").read_text())
    periodic = sorted(n for n, e in manifest["files"].items() if e["kind"] == "periodic")
    assert len(periodic) == 2
    last_step = manifest["files"]["last.ckpt"]["step"]
    assert all(manifest["files"][n]["step"] < last_step for n in periodic)
    assert not list(out.glob(".*.tmp"))


def test_mode_is_inferred_from_the_metric_name():
    assert CheckpointPolicy(monitor="val/loss").resolved_mode == "min"
    assert CheckpointPolicy(monitor="val/acc1").resolved_mode == "max"
    assert CheckpointPolicy(monitor="val/acc1", mode="min").better(0.1, 0.2)


def test_best_weights_rebuild_the_model_and_start_a_new_fine_tune(policy_run, tmp_path):
    out, root = policy_run
    best = out / "checkpoints" / "best.safetensors"
    model, meta = load_model(best)
    assert meta.class_names == ["class_0", "class_1", "class_2"] and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    run(compose_config(tiny_overrides(root, epochs=1) + [f"model.weights={best}"]), run_dir=tmp_path / "next")
    report = json.loads((tmp_path / "next" / "load_report.json").read_text())
    assert report["loaded_fraction"] == 1.0 and not report["missing"] and not report["head"]


def test_three_lines_of_python_classify_images_as_the_run_evaluated_them(policy_run):
    """``finetune.load_model(RUN_DIR)``, ``meta.preprocess(path)``: over the validation images, the
    accuracy is exactly the best val/acc1 the run measured (EMA weights, as saved)."""
    out, _ = policy_run
    split = json.loads((out / "split.json").read_text())
    model, meta = load_model(out)  # a run dir: its best weights
    hits = 0
    for relative, label in split["files"]["val"]:
        x = meta.preprocess(Path(split["root"]) / relative).unsqueeze(0)
        hits += int(model(x).argmax(1).item() == label)
    best = json.loads((out / "summary.json").read_text())["best"]
    assert hits / len(split["files"]["val"]) == best["value"]


def test_torch_weights_format_writes_pt_files_that_load(tmp_path):
    root = make_image_folder(tmp_path / "images")
    run(compose_config(tiny_overrides(root, epochs=1) + ["checkpoint.weights_format=torch"]), run_dir=tmp_path / "out")
    best = tmp_path / "out" / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["weights_metadata"]["model_name"] == "test_resnet"
    model, meta = load_model(best)
    assert meta.num_classes == 3


def test_atomic_write_failing_mid_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.bin"
    facts = atomic_write_stream(target, lambda f: f.write(b"old content"))
    assert facts.digest == file_digest(target) and facts.bytes == 11

    def full_disk(f):
        f.write(b"new partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_stream(target, full_disk)
    assert target.read_bytes() == b"old content" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_replacing_a_large_file_frees_the_old_one_and_a_failure_keeps_it(tmp_path, monkeypatch):
    """A replaced large file is set aside under a second name and unlinked off the caller's time."""
    target, big = tmp_path / "last.ckpt", 20 << 20
    atomic_write_stream(target, lambda f: f.write(b"a" * big))
    facts = atomic_write_stream(target, lambda f: f.write(b"b" * big))
    assert facts.digest == file_digest(target) and target.read_bytes()[:1] == b"b"
    for _ in range(500):  # the background unlink finishes (a liveness wait, not a timing check)
        if [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]:
            break
        time.sleep(0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    def refuse(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic_write_stream(target, lambda f: f.write(b"c" * big))
    assert target.read_bytes()[:1] == b"b" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_disk_full_during_a_save_is_reported_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(root, epochs=2)
    run(compose_config(overrides), run_dir=tmp_path / "ref")
    out, ckpt = tmp_path / "out", tmp_path / "out" / "checkpoints"
    real_save, saved = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):  # the 2nd state: part reaches the file, then the disk is full
        if obj.get("format") == "finetune.train_state/1" and saved:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append((ckpt / "last.ckpt").exists())
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(UserError, match=r"could not write checkpoint '.*last\.ckpt': No space left on device \(ENOSPC\)"):
        run(compose_config(overrides), run_dir=out)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["train_state"]["epoch"] == 1
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["files"]["last.ckpt"]["epoch"] == 1
    for name, entry in manifest["files"].items():
        verify_file(ckpt / name, entry)
    assert not list(ckpt.glob(".*.tmp"))
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    run(compose_config(overrides + ["resume=auto"]), run_dir=out)  # space is back: continue
    assert_same_result(out, tmp_path / "ref")


def test_damaged_files_are_named(policy_run, tmp_path):
    out, root = policy_run
    ckpt = out / "checkpoints"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    name = sorted(n for n, e in manifest["files"].items() if e["kind"] == "periodic")[0]
    data = (ckpt / name).read_bytes()
    work = tmp_path / "checkpoints"
    work.mkdir()
    (work / "manifest.json").write_text(json.dumps({"files": {name: manifest["files"][name]}, "best": None}))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    cases = {bytes(flipped): "is corrupt: its blake3 does not match", data[: len(data) // 3]: "is truncated"}
    for content, message in cases.items():
        (work / name).write_bytes(content)
        with pytest.raises(UserError, match=message) as err:
            verify_file(work / name, manifest["files"][name])
        assert str(work / name) in str(err.value)
    (tmp_path / "junk.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=r"training state '.*junk\.ckpt' cannot be read"):
        load_training_state(tmp_path / "junk.ckpt")
    overrides = tiny_overrides(root, epochs=4) + POLICY + ["trainer.ema=true"]
    with pytest.raises(UserError, match=r"'.*junk\.ckpt' cannot be read"):
        run(compose_config(overrides + [f"resume={tmp_path / 'junk.ckpt'}"]), run_dir=tmp_path / "r1")
    with pytest.raises(UserError, match=rf"'{work / name}' is truncated"):
        run(compose_config(overrides + [f"resume={work / name}"]), run_dir=tmp_path / "r2")
