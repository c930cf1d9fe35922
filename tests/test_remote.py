"""Files named by URL (finetune/remote.py) against a real S3 server (moto) on 127.0.0.1: ckpt=s3://RUN_DIR
for predict, evaluate and export, model.weights=s3://FILE for training, finetune.ckpt on a URL; the local
cache (fetched once, fetched again when damaged or replaced), a run dir's manifest digest, and bad URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder, run_cli, s3_client, tiny_overrides
from finetune.errors import UserError

BUCKET = "runs"


@pytest.fixture(scope="module")
def remote(s3_server, tmp_path_factory):
    """A tiny trained run, its checkpoints uploaded to s3://runs/a/checkpoints/, and the S3 environment."""
    work = tmp_path_factory.mktemp("remote")
    images = make_image_folder(work / "images", train=4, val=3)
    trained = run_cli([*tiny_overrides(images), f"hydra.run.dir={work / 'run'}"], cwd=work)
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    for path in (work / "run" / "checkpoints").iterdir():
        client.put_object(Bucket=BUCKET, Key=f"a/checkpoints/{path.name}", Body=path.read_bytes())
    return {"work": work, "images": images, "env": s3_server, "client": client}


@pytest.fixture
def s3_env(remote, monkeypatch, tmp_path):
    """This process reads S3 as a user's job would (the AWS variables), with a cache of the test's own."""
    for key, value in remote["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_predict_on_a_run_dir_url_equals_the_local_run_and_fetches_once(remote, s3_env, caplog):
    from finetune.predict import predict

    images = sorted((remote["images"] / "val").rglob("*.png"))
    local = predict(remote["work"] / "run", images, topk=3)
    with caplog.at_level("INFO", logger="finetune"):
        fetched = predict("s3://runs/a", images, topk=3)
        again = predict("s3://runs/a", images, topk=3)
    assert fetched == local and again == local
    assert sum("fetched 's3://runs/a/checkpoints/best.safetensors'" in r.message for r in caplog.records) == 1
    (copy,) = s3_env.rglob("best.safetensors")
    assert copy.read_bytes() == (remote["work"] / "run" / "checkpoints" / "best.safetensors").read_bytes()


def test_a_damaged_cached_copy_or_a_replaced_file_is_fetched_again(remote, s3_env, caplog):
    from finetune.remote import fetch

    url = "s3://runs/a/checkpoints/best.safetensors"
    original = (remote["work"] / "run" / "checkpoints" / "best.safetensors").read_bytes()
    copy = fetch(url)
    copy.write_bytes(b"x" * len(original))  # same size, other bytes: the digest tells
    with caplog.at_level("WARNING", logger="finetune"):
        assert fetch(url).read_bytes() == original
    assert any("fetched again" in r.message and "does not match" in r.message for r in caplog.records)
    remote["client"].put_object(Bucket=BUCKET, Key="b/w.safetensors", Body=original)
    first = fetch("s3://runs/b/w.safetensors")
    remote["client"].put_object(Bucket=BUCKET, Key="b/w.safetensors", Body=original[:-8] + b"12345678")
    second = fetch("s3://runs/b/w.safetensors")
    assert second != first and second.read_bytes()[-8:] == b"12345678" and first.read_bytes() == original


def test_a_run_dirs_best_file_that_does_not_match_its_manifest_is_refused(remote, s3_env):
    from finetune.inference import resolve_checkpoint

    checkpoints = remote["work"] / "run" / "checkpoints"
    for path in checkpoints.iterdir():
        body = path.read_bytes()
        if path.name == "best.safetensors":  # replaced in the bucket, the manifest not (yet)
            body = (checkpoints / "last.safetensors").read_bytes() if (checkpoints / "last.safetensors").exists() \
                else body[:-1] + bytes([body[-1] ^ 1])
        remote["client"].put_object(Bucket=BUCKET, Key=f"torn/checkpoints/{path.name}", Body=body)
    with pytest.raises(UserError, match=r"checkpoint 's3://runs/torn/checkpoints/best.safetensors' does not match "
                                        r"its manifest entry") as err:
        resolve_checkpoint("s3://runs/torn")
    assert "\n" not in str(err.value)
    assert not list(s3_env.rglob("best.safetensors"))  # nothing unverified left in the cache


def test_weights_by_url_train_and_finetune_ckpt_reads_a_url(remote, s3_env, tmp_path, capsys):
    from finetune.ckpt import main as ckpt_main

    assert ckpt_main(["inspect", "--json", "s3://runs/a/checkpoints/best.safetensors"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "safetensors"
    url = "s3://runs/a/checkpoints/best.safetensors"
    args = [a for a in tiny_overrides(remote["images"]) if a != "model.pretrained=false"]
    result = run_cli([*args, f"model.weights={url}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     env={**remote["env"], "FINETUNE_CACHE": str(s3_env)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "load_report.json").read_text())
    assert report["loaded_fraction"] == 1.0 and not report["missing"], report
    for secret in (remote["env"]["AWS_SECRET_ACCESS_KEY"], remote["env"]["AWS_ACCESS_KEY_ID"]):
        assert not any(secret in p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*")
                       if p.is_file() and p.suffix in (".yaml", ".json", ".log", ".csv", ".jsonl"))


def test_export_of_a_url_writes_into_the_working_directory_not_the_cache(remote, s3_env, tmp_path, monkeypatch):
    from finetune.export import export

    monkeypatch.chdir(tmp_path)
    written = export("s3://runs/a", format="safetensors").path
    assert written.resolve().parent == (tmp_path / "export").resolve()
    weights = load_file(str(written))
    reference = load_file(str(remote["work"] / "run" / "checkpoints" / "best.safetensors"))
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.parametrize("url, message", [
    ("s3://runs/a/checkpoints/none.safetensors",
     "checkpoint 's3://runs/a/checkpoints/none.safetensors' does not exist"),
    ("s3://runs/nowhere", "checkpoint 's3://runs/nowhere' is neither a weights file"),
    ("s3://no-such-bucket/w.safetensors", "does not exist"),
])
def test_a_bad_url_is_one_line_naming_it(remote, s3_env, url, message):
    from finetune.inference import resolve_checkpoint

    with pytest.raises(UserError, match=message) as err:
        resolve_checkpoint(url)
    assert "\n" not in str(err.value)


def test_wrong_credentials_are_one_line_without_the_secret(remote, tmp_path):
    """In a process of its own (s3fs keeps one connection per process, made with the first credentials)."""
    env = {**os.environ, **remote["env"], "AWS_SECRET_ACCESS_KEY": "not-the-secret",
           "FINETUNE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "finetune.ckpt", "inspect", "s3://runs/a/checkpoints/best.safetensors"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: cannot read 's3://runs/a/checkpoints/best.safetensors' (") and \
        "check the URL, the credentials" in lines[0], lines[0]
    assert "not-the-secret" not in result.stderr + result.stdout


def test_a_shard_index_by_url_fetches_its_shards_and_refuses_a_name_outside(remote, s3_env, tmp_path, capsys):
    """A sharded safetensors checkpoint (finetune.ckpt convert) uploaded as a folder: the index's URL reads as
    the whole checkpoint, every tensor equal to the file it was cut from; an index naming '../x' is refused."""
    from finetune.ckpt import main as ckpt_main

    best = remote["work"] / "run" / "checkpoints" / "best.safetensors"
    sharded = tmp_path / "sharded"
    assert ckpt_main(["convert", str(best), str(sharded / "model.safetensors"), "--max-shard-size", "200000"]) == 0
    files = sorted(p.name for p in sharded.iterdir())
    assert len(files) > 3 and "model.safetensors.index.json" in files, files
    for name in files:
        remote["client"].put_object(Bucket=BUCKET, Key=f"sharded/{name}", Body=(sharded / name).read_bytes())
    capsys.readouterr()
    assert ckpt_main(["inspect", "--json", f"s3://{BUCKET}/sharded/model.safetensors.index.json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "sharded-safetensors"
    from finetune.weights import read_checkpoint

    got, want = read_checkpoint(f"s3://{BUCKET}/sharded/model.safetensors.index.json").tensors, load_file(best)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../a/checkpoints/best.safetensors"
    remote["client"].put_object(Bucket=BUCKET, Key="sharded/bad.index.json", Body=json.dumps(index).encode())
    with pytest.raises(UserError, match=r"shard index 's3://runs/sharded/bad.index.json' names the shard "
                                        r"'\.\./a/checkpoints/best\.safetensors': only plain file names"):
        read_checkpoint(f"s3://{BUCKET}/sharded/bad.index.json")
