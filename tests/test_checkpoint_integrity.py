"""Failure paths that lose runs (issue 8): digests that match the bytes on disk, a crashed run that
exits, a full disk that reads as one line, and a manifest that disagrees with a loadable file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import blake3
import pytest
import torch
from torch import nn

import finetune.checkpoint as checkpoint
from conftest import assert_manifest_matches_files, compose_config, make_image_folder, run_cli, tiny_overrides
from finetune.checkpoint import HashingSink, atomic_write_stream, save_training_state, save_weights
from finetune.errors import UserError
from finetune.run import run


class SlowFirstUpdate:
    """A digest whose first ``update`` sleeps: the hashing thread lags far behind the writer."""

    def __init__(self, make):
        self.inner, self.first = make(), True

    def update(self, data) -> None:
        if self.first:
            time.sleep(0.5)
            self.first = False
        self.inner.update(data)

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


@pytest.fixture
def slow_hashing(monkeypatch):
    for name, make in dict(checkpoint.DIGESTS).items():
        monkeypatch.setitem(checkpoint.DIGESTS, name, lambda make=make: SlowFirstUpdate(make))


def many_layer_state() -> dict:
    """The training state of 400 small Linear layers with AdamW moments: its pickled record > 64 KiB."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(400)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return {"format": checkpoint.STATE_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def pickled_record_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return next(i.file_size for i in archive.infolist() if i.filename.endswith("/data.pkl"))


def test_training_state_digest_is_the_files_even_when_hashing_lags(tmp_path, slow_hashing):
    facts = save_training_state(tmp_path / "last.ckpt", many_layer_state())
    data = (tmp_path / "last.ckpt").read_bytes()
    assert pickled_record_bytes(tmp_path / "last.ckpt") > 64 << 10  # the case that raced
    assert (facts.algorithm, facts.digest, facts.bytes) == ("blake3", blake3.blake3(data).hexdigest(), len(data))


@pytest.mark.parametrize("weights_format", ["safetensors", "torch"])
def test_weights_file_digest_is_the_files_even_when_hashing_lags(tmp_path, slow_hashing, weights_format):
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(300)])
    path = tmp_path / f"best{checkpoint.WEIGHTS_EXTENSIONS[weights_format]}"
    facts = save_weights(path, model, {"format": checkpoint.WEIGHTS_FORMAT}, weights_format)
    assert facts.digest == blake3.blake3(path.read_bytes()).hexdigest()


def test_a_state_with_a_large_pickled_record_verifies(tmp_path):
    facts = save_training_state(tmp_path / "last.ckpt", many_layer_state())
    checkpoint.verify_file(tmp_path / "last.ckpt", facts.entry())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["format"] == checkpoint.STATE_FORMAT


def test_a_multi_slice_write_is_hashed_whole(tmp_path):
    data = os.urandom(3 * HashingSink.SLICE + 12345)  # one write() larger than the slices the thread follows
    facts = atomic_write_stream(tmp_path / "big.bin", lambda f: f.write(data))
    assert facts.digest == blake3.blake3(data).hexdigest() and facts.bytes == len(data)


def test_a_full_disk_inside_torch_save_is_the_os_error_not_torchs(tmp_path, monkeypatch):
    """torch.save turns the stream's OSError into a RuntimeError; the writer re-raises the original."""
    real_write, budget = os.write, [200_000]

    def write_until_full(fd, data):
        if budget[0] < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        budget[0] -= len(data)
        return real_write(fd, data)

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")
    monkeypatch.setattr(os, "write", write_until_full)
    with pytest.raises(OSError) as err:
        save_training_state(target, many_layer_state())
    assert err.value.errno == errno.ENOSPC and target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------- manifest vs file
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    base = tmp_path_factory.mktemp("integrity")
    overrides = tiny_overrides(make_image_folder(base / "images"), epochs=2) + ["checkpoint.keep_last_k=1"]
    run(compose_config(overrides), run_dir=base / "ref")
    return base / "ref", overrides


def copy_with_wrong_digests(ref: Path, to: Path) -> Path:
    """The run with every training state's manifest digest wrong (the files themselves are fine)."""
    subprocess.run(["cp", "-a", str(ref), str(to)], check=True)
    manifest_path = to / "checkpoints" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["files"].items():
        if name.endswith(".ckpt"):
            entry["blake3"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    return to


def test_a_loadable_state_with_a_wrong_manifest_is_named_and_refused(finished, tmp_path, caplog):
    ref, overrides = finished
    out = copy_with_wrong_digests(ref, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    with pytest.raises(UserError, match="no valid training state") as err:
        run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto"]), run_dir=out)
    assert "resume_allow_unverified=true" in caplog.text
    assert "but the file loads as a valid training state: the manifest may be wrong" in caplog.text
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before  # nothing lost


def test_resume_allow_unverified_resumes_from_it(finished, tmp_path, caplog):
    ref, overrides = finished
    out = copy_with_wrong_digests(ref, tmp_path / "run")
    run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto", "resume_allow_unverified=true"]),
        run_dir=out)
    assert "resuming from it (resume_allow_unverified=true)" in caplog.text
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["epoch"] == 3
    assert_manifest_matches_files(out / "checkpoints")  # rewritten files are recorded right again


def test_a_file_that_does_not_load_is_still_refused_with_resume_allow_unverified(finished, tmp_path):
    """Only a file that loads as a training state can be taken unverified (flipped tensor bytes would
    load: the manifest's digest is what catches them, which is why the option is off by default)."""
    ref, overrides = finished
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(ref), str(out)], check=True)
    for state in (out / "checkpoints").glob("*.ckpt"):
        state.write_bytes(state.read_bytes()[: state.stat().st_size * 2 // 3])  # cut short by a kill or a copy
    with pytest.raises(UserError, match="no valid training state"):
        run(compose_config(overrides + ["trainer.max_epochs=3", "resume=auto", "resume_allow_unverified=true"]),
            run_dir=out)


# ------------------------------------------------------ runs that end badly
CRASHING_CLI = """
import sys
import finetune.trainer as trainer
real_step, calls = trainer.Trainer.train_step, [0]

def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        raise RuntimeError("boom from a test hook")
    return real_step(self, *args, **kwargs)

trainer.Trainer.train_step = step
from finetune.__main__ import main
main()
"""


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_an_unexpected_exception_with_loader_workers_exits_and_leaves_no_process(tmp_path):
    root = make_image_folder(tmp_path / "images", train=8)
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(root, epochs=2) if not a.startswith("data.num_workers")]
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CLI, *args, "data.num_workers=2",
                             f"hydra.run.dir={out}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        console, _ = proc.communicate(timeout=120)  # before the fix: no exit at all (workers joined forever)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not exit after an unexpected exception")
    assert proc.returncode != 0 and "boom from a test hook" in console
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom from a test hook"
    assert processes_in_group(proc.pid) == []  # no loader worker left behind


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 40 MB tmpfs (needs the right to mount; skipped with the reason otherwise)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_writing_last_ckpt_is_one_line_and_loses_nothing(tmp_path, small_tmpfs):
    """The default model at 32 px: best and last weights fit in 40 MB, the training state does not."""
    root = make_image_folder(tmp_path / "images")
    out = small_tmpfs / "run"
    args = [a for a in tiny_overrides(root, epochs=2) if not a.startswith("model")]
    result = run_cli(args + ["model=efficientnet_lite0", f"hydra.run.dir={out}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.strip()]
    assert error == [f"error: could not write checkpoint '{out / 'checkpoints' / 'last.ckpt'}': No space left on "
                     "device (ENOSPC); the previous checkpoint files are intact: free space, then continue with "
                     "resume=auto"], result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("CheckpointWriteError: could not write")
    manifest = assert_manifest_matches_files(out / "checkpoints")  # what was written before is intact
    assert {"best.safetensors", "last.safetensors"} <= set(manifest["files"])
    assert not list((out / "checkpoints").glob(".*.tmp"))
