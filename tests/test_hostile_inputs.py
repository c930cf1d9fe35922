"""Run directories someone else made (issue 10): names in a manifest or a training state that point
out of the directory, an overrides.yaml with injected flags, and two processes on one run dir.

Each case ends in one clear line (exit 2 from the CLI) and touches nothing outside the run dir: a
sentinel file beside it must survive. The weights-file corpus is in ``test_hostile_weights.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import compose_config, make_image_folder, run_cli, tiny_overrides
from finetune.checkpoint import Manifest, load_training_state, save_training_state
from finetune.confine import confined
from finetune.errors import UserError
from finetune.run import run
from test_cli import assert_clean_error


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 2-epoch run with top-k files, written in-process by the real CLI config."""
    base = tmp_path_factory.mktemp("hostile")
    overrides = tiny_overrides(make_image_folder(base / "images"), epochs=2) + ["checkpoint.save_top_k=2",
                                                                               "checkpoint.keep_last_k=2"]
    result = run_cli(overrides + [f"hydra.run.dir={base / 'ref'}"], cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "ref", overrides


def victim_beside(run_dir: Path) -> Path:
    """A file next to the run dir's checkpoints/ that nothing may read, link or delete."""
    victim = run_dir / "victim.ckpt"
    victim.write_text("sentinel")
    return victim


def edit_manifest(run_dir: Path, edit) -> None:
    path = run_dir / "checkpoints" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_confined_refuses_what_leaves_the_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "outside.ckpt").write_text("x")
    (tmp_path / "d" / "link.ckpt").symlink_to(tmp_path / "outside.ckpt")
    assert confined(tmp_path / "d", "last.ckpt", named_in="m.json") == tmp_path / "d" / "last.ckpt"
    for name, says in [("../x.ckpt", "outside"), ("/etc/passwd", "outside"), ("a/../../x", "outside"),
                       ("C:\\x.ckpt", "outside"), ("link.ckpt", "a link out of"), (7, "not a file name"),
                       (None, "not a file name"), ("", "not a file name")]:
        with pytest.raises(UserError, match=says) as err:
            confined(tmp_path / "d", name, named_in="m.json")
        assert "m.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["../victim.ckpt", "ABSOLUTE", "link.ckpt"])
def test_a_manifest_naming_a_file_outside_is_refused_and_nothing_is_deleted(finished, tmp_path, entry):
    """Today's code deleted '../victim.ckpt' while pruning periodic states on resume=auto."""
    ref, overrides = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    victim = victim_beside(out)
    (out / "checkpoints" / "link.ckpt").symlink_to(victim)
    name = str(victim) if entry == "ABSOLUTE" else entry
    edit_manifest(out, lambda m: m["files"].__setitem__(name, {**m["files"]["last.ckpt"], "kind": "periodic",
                                                                "step": 0, "epoch": 0}))
    result = run_cli(overrides + ["trainer.max_epochs=3", "resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert_clean_error(result, f"'{out / 'checkpoints' / 'manifest.json'}' names", "refused")
    assert victim.read_text() == "sentinel"


@pytest.mark.parametrize("bad", [{"files": []}, {"files": {"last.ckpt": {"bytes": "1", "epoch": 0, "step": 0}}},
                                 {"files": {}, "best": ["x"]}, {"files": {}, "best": "../best.safetensors"}])
def test_a_malformed_manifest_is_one_clear_line(finished, tmp_path, bad):
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "checkpoints" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="manifest.json") as err:
        Manifest(out / "checkpoints" / "manifest.json")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["../victim.ckpt", "/tmp/elsewhere.safetensors", 42])
def test_a_training_state_whose_top_k_names_leave_the_directory_is_refused(finished, tmp_path, name):
    """The policy state inside last.ckpt names top-k files that a resume links, keeps or deletes."""
    ref, overrides = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    victim = victim_beside(out)
    state_path = out / "checkpoints" / "last.ckpt"
    state = load_training_state(state_path)
    state["checkpoint_policy"]["top_k"][0]["name"] = name
    facts = save_training_state(state_path, state)
    manifest = Manifest(out / "checkpoints" / "manifest.json")
    manifest.files["last.ckpt"] |= facts.entry()
    manifest.save()
    for resume in (str(state_path), "auto"):  # into a new run dir, and in place
        with pytest.raises(UserError, match=r"last\.ckpt' (names|holds)") as err:
            run(compose_config(overrides + ["trainer.max_epochs=3", f"resume={resume}"]),
                run_dir=out if resume == "auto" else tmp_path / "elsewhere")
        assert "\n" not in str(err.value)
    assert victim.read_text() == "sentinel"


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["--info=plugins", "-m", "hydra/launcher=basic", "--config-dir=/tmp",
                                   "hydra.run.dir=/tmp/elsewhere", "not an override", "SCALAR"])
def test_resume_run_dir_refuses_an_overrides_file_with_injected_entries(finished, tmp_path, entry):
    """Today's code replayed '--info=plugins': it printed Hydra's plugin list and exited 0."""
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    saved = out / ".hydra" / "overrides.yaml"
    recorded = yaml.safe_load(saved.read_text())
    saved.write_text(yaml.safe_dump(entry if entry == "SCALAR" else [entry] + recorded))
    result = run_cli([f"resume={out}", "trainer.max_epochs=3"], cwd=tmp_path)
    assert_clean_error(result, f"'{saved}' holds", "refused to replay it")
    assert "plugin" not in result.stdout.lower()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2  # nothing ran


@pytest.mark.slow
def test_the_recorded_overrides_of_a_real_run_replay(finished, tmp_path):
    """The check passes every override the CLI itself records (groups, dotted keys, + groups)."""
    ref, _ = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    saved = out / ".hydra" / "overrides.yaml"
    saved.write_text(yaml.safe_dump(yaml.safe_load(saved.read_text()) + ["++trainer.ema=false", "+experiment=example"]))
    result = run_cli([f"resume={out}", "trainer.max_epochs=3", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_epochs: 3" in result.stdout


def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    manifest = run_dir / "checkpoints" / "manifest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not manifest.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before the test could start a second one"


@pytest.mark.slow
def test_a_second_process_on_a_run_dir_in_use_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path):
    root = make_image_folder(tmp_path / "images", train=8)
    out = tmp_path / "run"
    args = tiny_overrides(root, epochs=100) + ["checkpoint.every_n_steps=1", f"hydra.run.dir={out}"]
    with (tmp_path / "first.txt").open("wb") as console:
        first = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=tmp_path, stdout=console,
                                 stderr=subprocess.STDOUT)
    try:
        wait_for_training(out, first)
        result = run_cli(args[:-1] + ["resume=auto", f"hydra.run.dir={out}"], cwd=tmp_path)
        assert_clean_error(result, f"run dir '{out}' is in use by pid {first.pid}")
        assert first.poll() is None  # the first run goes on, its files untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / "checkpoints" / ".lock").read_text().strip() == str(first.pid)  # left behind by the kill
    done = json.loads((out / "checkpoints" / "manifest.json").read_text())["files"]["last.ckpt"]["epoch"]
    result = run_cli([a for a in args if not a.startswith("trainer.max_epochs")] +
                     [f"trainer.max_epochs={done + 1}", "resume=auto"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


class WritesAMarker:
    """A pickle that, if ever unpickled with code allowed, creates ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_a_pickled_payload_as_a_training_state_runs_nothing(finished, tmp_path, caplog):
    """A last.ckpt that carries code: resume=FILE.ckpt refuses it in one line; resume=auto skips it
    (it fails its manifest check) and continues from the previous valid state. Nothing runs."""
    import torch

    ref, overrides = finished
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    marker = tmp_path / "pwned"
    state_path = out / "checkpoints" / "last.ckpt"
    torch.save({"format": "finetune.train_state/1", "payload": WritesAMarker(marker)}, state_path)
    (tmp_path / "loose").mkdir()
    shutil.copy(state_path, tmp_path / "loose" / "last.ckpt")  # a file with no manifest entry to check it against
    with pytest.raises(UserError, match="cannot be read") as err:
        run(compose_config(overrides + ["trainer.max_epochs=3", f"resume={tmp_path / 'loose' / 'last.ckpt'}"]),
            run_dir=tmp_path / "elsewhere")
    assert "\n" not in str(err.value)
    run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto"]), run_dir=out)
    assert re.search(r"last\.ckpt' is (corrupt|truncated)", caplog.text) and "falling back to the previous" in caplog.text
    assert not marker.exists()
