"""checkpoint.mirror and resume=URL (issue 23): checkpoints uploaded to S3 as they are saved (manifest last),
a run killed with its node continued from the bucket on a fresh one, bit-identical to a straight run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from pathlib import Path

import blake3
import pytest

from conftest import free_port, make_image_folder, run_cli, s3_client, tiny_overrides
from finetune.checkpoint import Manifest
from finetune.checkpoint import mirror as mirror_lib
from finetune.checkpoint.mirror import Mirror, fetch_checkpoints
from finetune.errors import UserError
from test_checkpoint import assert_same_result
from test_cli import assert_clean_error
from test_stream import SIGNAL_AT, run_all

BUCKET = "runs-bucket"


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_client(s3_server).create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(autouse=True)
def fresh_clients():
    """fsspec keeps one file system per set of options: each test's own endpoint and keys get a new one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def aws(s3, monkeypatch):
    """This process speaks to the module's S3 server as a user's job would (the standard AWS variables)."""
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    return s3


def bucket_files(env: dict, prefix: str) -> dict[str, bytes]:
    client = s3_client(env)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def assert_bucket_holds(env: dict, prefix: str, checkpoint_dir: Path) -> None:
    """The bucket holds the local manifest and, under each name it lists, the bytes it records (BLAKE3 here)."""
    remote = bucket_files(env, prefix)
    manifest = json.loads(remote.pop("manifest.json"))
    assert manifest == json.loads((checkpoint_dir / "manifest.json").read_text())
    assert sorted(remote) == sorted(manifest["files"])
    for name, entry in manifest["files"].items():
        assert len(remote[name]) == entry["bytes"] and blake3.blake3(remote[name]).hexdigest() == entry["blake3"], name
        assert remote[name] == (checkpoint_dir / name).read_bytes(), name


def local_set(directory: Path, contents: dict[str, bytes], *, step: int) -> dict:
    """Files in ``directory`` and the manifest describing them, as a save point leaves them: each file
    written under a fresh name, then renamed over the old one (the saver never writes a file in place)."""
    directory.mkdir(exist_ok=True)
    manifest = Manifest(directory / "manifest.json", fresh=True)
    for name, data in contents.items():
        fresh = directory / f"{name}.writing"
        fresh.write_bytes(data)
        os.replace(fresh, directory / name)
        manifest.record(name, kind="state" if name.endswith(".ckpt") else "best", epoch=1, step=step,
                        metric="val/acc1", value=None)
    manifest.set_best("best.safetensors")
    manifest.save()
    return json.loads((directory / "manifest.json").read_text())


# ------------------------------------------------------------------ the upload thread
def test_sets_upload_manifest_last_newest_wins_and_links_go(aws, tmp_path, busy_cpus):
    """Five save points handed over at once on a busy machine: the bucket ends with the newest set exactly
    (a file the newest manifest no longer names is removed), and no staging link is left behind."""
    mirror = Mirror(f"s3://{BUCKET}/sets")
    mirror.check_writable()
    ckpt = tmp_path / "checkpoints"
    for step in range(1, 6):
        extra = {"epoch000-step000001.ckpt": b"old state"} if step < 5 else {}
        manifest = local_set(ckpt, {"last.ckpt": f"state {step}".encode() * 1000, "best.safetensors": b"best"} | extra,
                             step=step)
        for gone in set(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) - set(manifest["files"]) - {
                "manifest.json"}:
            (ckpt / gone).unlink()
        mirror.push(ckpt, manifest)
    assert mirror.wait_idle(timeout=120)
    mirror.close()
    assert_bucket_holds(aws, "sets/checkpoints/", ckpt)
    assert not list(ckpt.glob(".*"))
    assert mirror.uploaded_step == 5


def test_a_file_changed_in_place_after_its_save_never_reaches_the_mirror(aws, tmp_path, caplog):
    """A checkpoint rewritten in place after the save point was handed over (not something the saver does,
    but a user's script might): the set is refused with one warning, the mirror keeps the complete set
    before it, and the next proper save is uploaded."""
    mirror = Mirror(f"s3://{BUCKET}/in-place")
    ckpt = tmp_path / "checkpoints"
    mirror.push(ckpt, local_set(ckpt, {"last.ckpt": b"state 1" * 100, "best.safetensors": b"best"}, step=1))
    assert mirror.wait_idle(timeout=120)
    before = bucket_files(aws, "in-place/checkpoints/")
    manifest = local_set(ckpt, {"last.ckpt": b"state 2" * 100, "best.safetensors": b"best"}, step=2)
    with mirror._changed:  # the upload thread waits until the file has been changed under the staged link
        mirror.push(ckpt, manifest)
        with open(ckpt / "last.ckpt", "r+b") as f:  # in place: the staged hard link sees it too
            f.write(b"X")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert mirror.wait_idle(timeout=120)
    assert [r.getMessage() for r in caplog.records if "'last.ckpt' changed after it was saved" in r.getMessage()]
    assert bucket_files(aws, "in-place/checkpoints/") == before and mirror.uploaded_step == 1
    mirror.push(ckpt, local_set(ckpt, {"last.ckpt": b"state 3" * 100, "best.safetensors": b"best"}, step=3))
    assert mirror.wait_idle(timeout=120)
    mirror.close()
    assert_bucket_holds(aws, "in-place/checkpoints/", ckpt)
    assert mirror.uploaded_step == 3


def test_an_upload_never_holds_up_the_saver_and_the_flush_is_bounded(tmp_path, monkeypatch, caplog):
    """An endpoint that takes the connection and never answers: ``push`` returns with the upload in flight,
    and ``close`` gives up after ``flush_timeout`` with one warning; the local files are untouched."""
    silent = socket.create_server(("127.0.0.1", 0))  # listens, never answers
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    ckpt = tmp_path / "checkpoints"
    manifest = local_set(ckpt, {"last.ckpt": b"state", "best.safetensors": b"best"}, step=3)
    mirror = Mirror("s3://hanging/run", flush_timeout=1)
    mirror.push(ckpt, manifest)
    assert not mirror.wait_idle(timeout=0)  # returned while the upload is still in flight
    with caplog.at_level(logging.WARNING, logger="finetune"):
        mirror.close()
    assert [r.getMessage() for r in caplog.records if "not finished within" in r.getMessage()]
    assert (ckpt / "last.ckpt").read_bytes() == b"state" and not list(ckpt.glob(".*.mirror.tmp"))
    silent.close()


def test_a_failing_upload_is_retried_then_one_warning_and_the_local_files_stay(aws, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(mirror_lib, "BACKOFF_S", 0.01)
    ckpt = tmp_path / "checkpoints"
    manifest = local_set(ckpt, {"last.ckpt": b"state", "best.safetensors": b"best"}, step=7)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    mirror = Mirror("s3://no-such-bucket/run")  # its bucket is gone after the start
    with caplog.at_level(logging.WARNING, logger="finetune"):
        mirror.push(ckpt, manifest)
        mirror.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "finetune" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not upload the checkpoints of step 7" in warnings[0], warnings
    assert f"after {mirror_lib.ATTEMPTS} attempt(s)" in warnings[0] and "local files are intact" in warnings[0]
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


# ------------------------------------------------------------------ fetching
def test_a_half_uploaded_set_is_never_taken(aws, tmp_path, caplog):
    """Files without a manifest are no checkpoints; a manifest naming a missing or changed file gets the
    files that verify, and the others are left out of the local manifest."""
    ckpt = tmp_path / "source"
    manifest = local_set(ckpt, {"last.ckpt": b"state 4", "epoch000-step000002.ckpt": b"state 2",
                                "best.safetensors": b"best"}, step=4)
    mirror = Mirror(f"s3://{BUCKET}/half")
    mirror.push(ckpt, manifest)
    mirror.close()
    client, prefix = s3_client(aws), "half/checkpoints/"
    client.put_object(Bucket=BUCKET, Key=f"{prefix}last.ckpt", Body=b"state 5")  # replaced, the manifest not yet
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}best.safetensors")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        fetched = fetch_checkpoints(f"s3://{BUCKET}/half", tmp_path / "a", required=True)
    assert sorted(fetched["files"]) == ["epoch000-step000002.ckpt"] and fetched["best"] is None
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["epoch000-step000002.ckpt", "manifest.json"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == fetched
    text = caplog.text
    assert f"'s3://{BUCKET}/half/checkpoints/last.ckpt' does not match its manifest entry" in text
    assert f"'s3://{BUCKET}/half/checkpoints/best.safetensors' is listed in its manifest but missing" in text

    client.delete_object(Bucket=BUCKET, Key=f"{prefix}manifest.json")  # the files alone: not a checkpoint set
    with pytest.raises(UserError, match=f"resume 's3://{BUCKET}/half' holds no checkpoints"):
        fetch_checkpoints(f"s3://{BUCKET}/half", tmp_path / "b", required=True)
    assert fetch_checkpoints(f"s3://{BUCKET}/half", tmp_path / "c", required=False) is None
    assert not (tmp_path / "b" / "manifest.json").exists()


# ------------------------------------------------------------------ end to end
def mirror_args(root: Path) -> list[str]:
    """2 epochs of 6 updates, a training state every 2 updates."""
    return tiny_overrides(root, epochs=2) + ["checkpoint.every_n_steps=2"]


@pytest.mark.slow
def test_a_run_killed_with_its_node_resumes_from_the_bucket_bit_identical(s3, tmp_path):
    """Node 1 is SIGKILLed after update 9 (the mirror holds step 8). Node 2 resumes with resume=s3://... in a
    fresh, empty run dir, the credentials given as checkpoint.storage_options from other variables, and is
    stopped by SIGTERM after update 11 (no save due there): the state the stop saves reaches the mirror
    before the process exits. Node 3 resumes
    from there and finishes: the final weights equal a straight run's, the bucket holds node 3's checkpoints,
    and no file holds the secret key."""
    root = make_image_folder(tmp_path / "images", train=8)  # 24 images: 6 updates per epoch
    args, url = mirror_args(root), f"s3://{BUCKET}/runs/killed"
    ref = tmp_path / "ref"
    straight = run_cli(args + [f"hydra.run.dir={ref}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli(args + [f"checkpoint.mirror={url}", f"hydra.run.dir={tmp_path / 'node1'}"], cwd=tmp_path,
                     env=s3 | {"FT_SIGNAL_AT": "0:9:SIGKILL", "PYTHONPATH": SIGNAL_AT})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert mirrored_step(s3) == 8

    secrets = {"MIRROR_KEY": s3["AWS_ACCESS_KEY_ID"], "MIRROR_SECRET": s3["AWS_SECRET_ACCESS_KEY"]}
    env = {k: v for k, v in s3.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET"))} | secrets
    from_bucket = args + [f"resume={url}", "+checkpoint.storage_options.key=${oc.env:MIRROR_KEY}",
                          "+checkpoint.storage_options.secret=${oc.env:MIRROR_SECRET}"]
    stopped = run_all({"r": (from_bucket + [f"hydra.run.dir={tmp_path / 'node2'}"],
                             env | {"FT_SIGNAL_AT": "0:11:SIGTERM", "PYTHONPATH": SIGNAL_AT})}, cwd=tmp_path)["r"]
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    console = stopped.stdout + stopped.stderr
    assert "fetched 4 checkpoint file(s)" in console and "epoch 1, step 8, 2 batches into" in console, console[-3000:]
    assert "holds the checkpoints of step 11" in console and mirrored_step(s3) == 11  # flushed before the exit

    final = tmp_path / "node3"
    resumed = run_all({"r": (from_bucket + [f"hydra.run.dir={final}"], env)}, cwd=tmp_path)["r"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 11, 5 batches into" in resumed.stdout + resumed.stderr
    assert_same_result(final, ref)
    assert_bucket_holds(s3, "runs/killed/checkpoints/", final / "checkpoints")
    for path in [p for d in ("node1", "node2", "node3") for p in (tmp_path / d).rglob("*") if p.is_file()]:
        assert s3["AWS_SECRET_ACCESS_KEY"].encode() not in path.read_bytes(), f"the secret key written into {path}"


def mirrored_step(env: dict) -> int:
    """The step of the training state the bucket's manifest names as ``last.ckpt``."""
    return json.loads(bucket_files(env, "runs/killed/checkpoints/")["manifest.json"])["files"]["last.ckpt"]["step"]


@pytest.mark.slow
def test_bad_mirror_settings_end_in_one_line_before_training(s3, tmp_path):
    root = make_image_folder(tmp_path / "images", train=2, val=1)
    args = tiny_overrides(root, epochs=1)
    good = f"checkpoint.mirror=s3://{BUCKET}/runs/bad"
    runs = {
        "credentials": (args + [good], s3 | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
        "bucket": (args + ["checkpoint.mirror=s3://no-such-bucket/runs/a"], s3),
        "unreachable": (args + [good], s3 | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}),
        "empty": (args + [f"resume=s3://{BUCKET}/runs/never"], s3),
        "literal": (args + [good, "+checkpoint.storage_options.secret=plain-text-secret"], s3),
        "occupied": (args + [f"resume=s3://{BUCKET}/runs/never"], s3),
    }
    (tmp_path / "occupied" / "checkpoints").mkdir(parents=True)  # a run's checkpoints are here already
    (tmp_path / "occupied" / "checkpoints" / "manifest.json").write_text('{"files": {}, "best": null}')
    runs = {name: (a + [f"hydra.run.dir={tmp_path / name}"], env) for name, (a, env) in runs.items()}
    results = run_all(runs, cwd=tmp_path, timeout=240)  # each must end by itself well before
    where = f"checkpoint.mirror 's3://{BUCKET}/runs/bad' cannot be written"
    assert_clean_error(results["credentials"], where, "PermissionError", "AWS_ACCESS_KEY_ID")
    assert_clean_error(results["bucket"], "'s3://no-such-bucket/runs/a' cannot be written: its bucket does not exist")
    assert_clean_error(results["unreachable"], where, "AWS_ENDPOINT_URL")
    assert_clean_error(results["empty"], f"resume 's3://{BUCKET}/runs/never' holds no checkpoints",
                       f"'s3://{BUCKET}/runs/never/checkpoints/manifest.json' does not exist")
    assert_clean_error(results["literal"], "checkpoint.storage_options.secret is written out", "${oc.env:VAR}")
    assert_clean_error(results["occupied"], f"'{tmp_path / 'occupied' / 'checkpoints'}' already holds checkpoints",
                       f"resume=auto checkpoint.mirror=s3://{BUCKET}/runs/never")
    for name in runs:
        assert not list((tmp_path / name).rglob("*.ckpt")), name  # refused before any training
    assert not [p for p in (tmp_path / "literal").rglob("*") if p.is_file() and b"plain-text-secret" in p.read_bytes()]
