"""WebDataset shards (issue 23): python -m finetune.shard, and data=webdataset's exact, resumable epochs."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import free_port, make_image_folder, run_cli, s3_client
from finetune import shard as shard_tool
from finetune.data import ShardSplit, build_stream_loaders
from finetune.data import shards as shards_lib
from finetune.data.stream import ShardOrder
from finetune.errors import UserError
from finetune.signals import stop_workers
from test_checkpoint import assert_same_result
from test_cli import assert_clean_error

SIGNAL_AT = str(Path(__file__).parent / "signal_at")
PER_SHARD = 5


def pixels_digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """33 train images in 7 shards of at most 5 (the last holds 3), 12 val images in 3 shards."""
    root = tmp_path_factory.mktemp("stream")
    images = make_image_folder(root / "images", classes=3, train=11, val=4)
    out = root / "shards"
    assert shard_tool.main([str(images), str(out), "--max-count", str(PER_SHARD)]) == 0
    return root, images, out


def train_urls(out: Path) -> str:
    return f"{out}/train-{{000000..000006}}.tar"


def val_urls(out: Path) -> str:
    return f"{out}/val-{{000000..000002}}.tar"


def source_digests(images: Path, split: str) -> list[tuple[str, int]]:
    """Every image of the folder as (pixels digest, label): what an epoch must hold."""
    classes = sorted(p.name for p in (images / split).iterdir())
    return sorted((pixels_digest(T.PILToTensor()(Image.open(f).convert("RGB"))), c)
                  for c, name in enumerate(classes) for f in sorted((images / split / name).iterdir()))


def loaders(out: Path, *, workers: int = 0, rank: int = 0, world: int = 1, batch: int = 4, buffer: int = 8,
            seed: int = 0, transform=None):
    split = ShardSplit(shards_lib.list_shards(train_urls(out)), shards_lib.list_shards(val_urls(out)),
                       shards_lib.read_classes(str(out)), root=train_urls(out))
    return build_stream_loaders(split, train_transform=transform or T.PILToTensor(), eval_transform=T.PILToTensor(),
                                batch_size=batch, num_workers=workers, buffer=buffer, seed=seed,
                                storage_options=None, channels=3, rank=rank, world_size=world)


def epoch(loader, number: int, *, start_batches: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(number)
    if start_batches:
        loader.sampler.set_start(start_batches * loader.sampler.global_batch)
    return list(loader)


def items(batches) -> list[tuple[str, int]]:
    return [(pixels_digest(x), int(y)) for inputs, target in batches for x, y in zip(inputs, target)]


# ------------------------------------------------------------------ the shard tool
def test_the_shard_tool_writes_every_image_once_with_its_label_classes_and_counts(data):
    root, images, out = data
    index = json.loads((out / "index.json").read_text())
    assert (out / "classes.txt").read_text().splitlines() == ["class_0", "class_1", "class_2"]
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"train-{i:06d}.tar" for i in range(7)] + [f"val-{i:06d}.tar" for i in range(3)]
    originals = {p.read_bytes(): int(p.parent.name[-1]) for split in ("train", "val")
                 for p in (images / split).rglob("*.png")}
    found = []
    for name in names:
        with tarfile.open(out / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.split(".")[0] for n in members})
        assert index["shards"][name]["samples"] == len(keys) <= PER_SHARD
        assert index["shards"][name]["bytes"] == (out / name).stat().st_size
        labels = [int(members[f"{k}.cls"]) for k in keys]
        assert index["shards"][name]["classes"] == [labels.count(c) for c in range(3)]
        found += [(members[f"{k}.png"], int(members[f"{k}.cls"])) for k in keys]
    assert sorted(found) == sorted(originals.items())  # every image once, its own bytes, its label
    assert not list(out.glob(".*"))  # no temporary file left


def test_shards_are_reproducible_and_a_folder_with_shards_is_refused(data, tmp_path, capsys):
    root, images, out = data
    again = tmp_path / "again"
    assert shard_tool.main([str(images), str(again), "--max-count", str(PER_SHARD)]) == 0
    for name in (p.name for p in out.iterdir()):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    capsys.readouterr()
    assert shard_tool.main([str(images), str(again)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: OUT '{again}' already holds shards: choose "
                                                           "an empty or new folder"]
    assert shard_tool.main([str(images), str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert "--shard-size 'lots' is not a size" in capsys.readouterr().err


def test_the_shard_size_bounds_each_shard(data, tmp_path):
    _, images, _ = data
    out = tmp_path / "small"
    assert shard_tool.main([str(images), str(out), "--shard-size", "8KiB"]) == 0
    index = json.loads((out / "index.json").read_text())
    sizes = [e["bytes"] for e in index["shards"].values()]
    assert len(sizes) > 10 and all(e["samples"] >= 1 for e in index["shards"].values())
    # members within 8 KiB (+ the 1 KiB end-of-archive), the file padded to tarfile's 10 KiB record
    assert all(size == 10240 for size in sizes), sizes
    assert max(e["samples"] for e in index["shards"].values()) >= 2  # not one sample a shard regardless


def test_an_interrupted_shard_write_leaves_only_complete_shards_and_no_index(data, tmp_path, monkeypatch):
    _, images, _ = data
    calls, real = [], shard_tool.sample_members

    def failing(path, label, key):
        calls.append(key)
        if len(calls) == 12:
            raise OSError(28, "No space left on device")
        return real(path, label, key)

    monkeypatch.setattr(shard_tool, "sample_members", failing)
    out = tmp_path / "broken"
    with pytest.raises(OSError):
        shard_tool.write_shards(str(images), str(out), max_count=PER_SHARD)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000001.tar"]  # 10 samples done
    for name in ("train-000000.tar", "train-000001.tar"):
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 2 * PER_SHARD


# ------------------------------------------------------------------ exact epochs
@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_sees_every_sample_exactly_once_in_an_order_fixed_by_seed_and_epoch(data, workers):
    root, images, out = data
    loader = loaders(out, workers=workers).train
    first = epoch(loader, 0)
    assert len(first) == len(loader)
    seen = items(first)
    expected = source_digests(images, "train")
    left_out = loader.sampler.left_out()  # a last single image of a stream (one stream: 33 = 8 x 4 + 1)
    assert left_out == 1 if workers == 0 else left_out <= workers
    assert len(seen) == len(set(seen)) == 33 - left_out and set(seen) <= set(expected)
    assert items(epoch(loader, 0)) == seen  # the same epoch again: the same order
    assert items(epoch(loaders(out, workers=workers).train, 0)) == seen  # in a fresh loader too
    second = items(epoch(loader, 1))
    assert second != seen and len(set(second)) == len(second) == 33 - loader.sampler.left_out()
    assert items(epoch(loaders(out, workers=workers, seed=1).train, 0)) != seen


def test_one_process_without_workers_trains_on_every_sample_when_no_single_image_is_left(data):
    root, images, out = data
    loader = loaders(out, batch=3).train  # 33 = 11 x 3
    assert sorted(items(epoch(loader, 0))) == source_digests(images, "train")
    assert loader.sampler.left_out() == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_yields_exactly_the_rest_with_the_same_augmentation(data, workers):
    _, _, out = data
    augment = T.Compose([T.RandomResizedCrop(16, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])
    full = epoch(loaders(out, workers=workers, transform=augment).train, 2)
    for skipped in (1, 4, 7):
        rest = epoch(loaders(out, workers=workers, transform=augment).train, 2, start_batches=skipped)
        assert len(rest) == len(full) - skipped
        for (a, ya), (b, yb) in zip(rest, full[skipped:]):
            assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_split_the_shards_without_a_duplicate_and_take_equal_steps(data, workers):
    root, images, out = data
    ranks = [loaders(out, workers=workers, rank=r, world=2) for r in (0, 1)]
    batches = [epoch(r.train, 3) for r in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0].train) > 0
    seen = [items(b) for b in batches]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1])
    assert len(seen[0]) + len(seen[1]) + ranks[0].train.sampler.left_out() == 33
    assert set(seen[0] + seen[1]) <= set(source_digests(images, "train"))
    evaluated = [items(r.val) for r in ranks]
    assert sorted(evaluated[0] + evaluated[1]) == source_digests(images, "val")  # exactly the val set, once


def test_streams_differ_in_size_by_one_sample_at_most_and_cover_every_sample_once():
    """7 shards of 5, 5, 5, 5, 5, 5 and 3 samples: dealt whole, 2 streams would hold 4 and 3 shards."""
    counts = [5, 5, 5, 5, 5, 5, 3]
    for world, workers in ((1, 2), (2, 2), (1, 3)):
        for epoch_number in range(4):
            order = ShardOrder(counts, seed=0, batch_size=4, buffer=8, workers=workers, world_size=world)
            order.set_epoch(epoch_number)
            sizes = order.stream_sizes()
            assert max(sizes) - min(sizes) <= 1, (world, workers, epoch_number, sizes)
            held = [(p.shard, i) for stream in order.stream_pieces() for p in stream for i in range(p.first, p.stop)]
            assert sorted(held) == [(s, i) for s, n in enumerate(counts) for i in range(n)]


def test_workers_serve_every_pass_and_a_pass_left_early_leaves_nothing_in_the_next(data, busy_cpus):
    """Under CPU load: the same two worker processes serve an epoch left after one batch (they had fetched
    more), then a resumed epoch, which equals that of a fresh loader; stopping them leaves no process."""
    _, _, out = data
    loader, fresh = loaders(out, workers=2).train, loaders(out, workers=2).train
    try:
        expected = epoch(fresh, 1, start_batches=2)
        stop_workers(fresh)
        loader.sampler.set_epoch(0)
        next(iter(loader))
        workers = sorted(p.pid for p in multiprocessing.active_children())
        assert len(workers) == 2
        rest = epoch(loader, 1, start_batches=2)
        assert sorted(p.pid for p in multiprocessing.active_children()) == workers
        assert len(rest) == len(expected) > 0
        for (a, ya), (b, yb) in zip(rest, expected):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    finally:
        stop_workers(loader)
    assert multiprocessing.active_children() == []  # the run's teardown stops them
    assert items(epoch(loader, 1, start_batches=2)) == items(expected)  # and the next pass starts new ones
    stop_workers(loader)


# ------------------------------------------------------------------ bad shards
def copy_shards(out: Path, target: Path) -> Path:
    target.mkdir()
    for p in out.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target


def first_epoch_error(out: Path, *, workers: int = 0) -> str:
    with pytest.raises(UserError) as err:
        ls = loaders(out, workers=workers)
        epoch(ls.train, 0)
        list(ls.val)
    return str(err.value).splitlines()[-1]  # raised in a worker: torch adds the worker's traceback before it


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_is_one_line_naming_it_and_stops_the_workers(data, tmp_path, workers):
    bad = copy_shards(data[2], tmp_path / "bad")
    shard = bad / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    message = first_epoch_error(bad, workers=workers)
    assert f"shard '{shard}'" in message and "truncated" in message
    assert multiprocessing.active_children() == []  # else a failed run would wait for them forever at exit


def test_a_shard_holding_another_count_than_its_index_is_refused(data, tmp_path):
    bad = copy_shards(data[2], tmp_path / "bad")
    index = json.loads((bad / "index.json").read_text())
    index["shards"]["val-000001.tar"]["samples"] += 1
    (bad / "index.json").write_text(json.dumps(index))
    assert "index says 6" in first_epoch_error(bad)


def test_shards_without_an_index_or_missing_from_it_are_refused(data, tmp_path):
    bad = copy_shards(data[2], tmp_path / "bad")
    index = json.loads((bad / "index.json").read_text())
    del index["shards"]["train-000002.tar"]
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="is not in its index"):
        shards_lib.list_shards(train_urls(bad))
    (bad / "index.json").unlink()
    with pytest.raises(UserError, match="index.json' does not exist"):
        shards_lib.list_shards(train_urls(bad))
    index["shards"]["../../etc/passwd"] = {"samples": 1}
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="bad entry for '../../etc/passwd'"):
        shards_lib.list_shards(train_urls(bad))


def test_a_member_over_the_size_limit_is_refused_before_it_is_read(data, monkeypatch):
    monkeypatch.setattr(shards_lib, "MAX_MEMBER_BYTES", 100)
    message = first_epoch_error(data[2])
    assert "over the limit of 100" in message and "refused" in message


def test_a_label_outside_the_classes_is_one_line(tmp_path):
    out = tmp_path / "odd"
    out.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    with tarfile.open(out / "s-0.tar", "w") as tar:
        for name, payload in (("a.png", buffer.getvalue()), ("a.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (out / "index.json").write_text(json.dumps({"format": shards_lib.INDEX_FORMAT, "shards": {"s-0.tar": {"samples": 1}}}))
    reader_shards = shards_lib.list_shards(f"{out}/s-0.tar")
    sample = next(shards_lib.iter_shard(reader_shards[0].url))
    with pytest.raises(UserError, match="has label 7, outside the 3 classes"):
        shards_lib.image_and_label(sample, url=reader_shards[0].url, num_classes=3)


# ------------------------------------------------------------------ end to end
def stream_args(out: Path, *, epochs: int = 2, workers: int = 0) -> list[str]:
    return ["model=resnet18", "model.name=test_resnet", "model.pretrained=false", "data=webdataset",
            f"data.train_urls='{train_urls(out)}'", f"data.val_urls='{val_urls(out)}'", "data.img_size=32",
            "data.batch_size=4", f"data.num_workers={workers}", "data.shuffle_buffer=8",
            f"trainer.max_epochs={epochs}", "logger.progress_bar=false"]


def resume_args(out: Path | str) -> list[str]:
    return stream_args(out, workers=2) + ["checkpoint.every_n_steps=4"]


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    """An uninterrupted run on the local shards, two loader workers: what the other runs must equal."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run_cli(resume_args(data[2]) + [f"hydra.run.dir={cwd / 'ref'}"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "ref"


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_ends_bit_identical(data, reference_run, tmp_path):
    """SIGKILL right after update 6 of 8 in the first epoch (last save at step 4), two loader workers."""
    args = resume_args(data[2])
    run = tmp_path / "run"
    killed = run_cli(args + [f"hydra.run.dir={run}"], cwd=tmp_path,
                     env={"FT_SIGNAL_AT": "0:6:SIGKILL", "PYTHONPATH": SIGNAL_AT})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["train_state"]["batches_seen"] == 4
    other = run_cli([*args, f"hydra.run.dir={run}", "resume=auto", "data.num_workers=1"], cwd=tmp_path)
    assert_clean_error(other, "in 2 stream(s) per process", "resume with data.num_workers=2")  # and nothing lost:
    resumed = run_cli(args + [f"hydra.run.dir={run}", "resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_result(run, reference_run)
    split = json.loads((run / "split.json").read_text())
    assert split["layout"] == "shards" and len(split["shards"]["train"]) == 7


# ------------------------------------------------------------------ object storage
BUCKET = "shards-bucket"


@pytest.fixture(scope="module")
def s3(data, s3_server):
    """The shards uploaded to s3://shards-bucket/set/ and, with one shard cut short, to s3://shards-bucket/bad/
    on the module's S3 server (`conftest.s3_server`). Yields the environment a user's job would have."""
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    for path in data[2].iterdir():
        body = path.read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"set/{path.name}", Body=body)
        cut = path.name == "train-000001.tar"
        client.put_object(Bucket=BUCKET, Key=f"bad/{path.name}", Body=body[:2000] if cut else body)
    return s3_server


def run_all(runs: dict[str, tuple[list[str], dict]], *, cwd: Path, timeout: float = 300) -> dict:
    """``python -m finetune ARGS`` with each its own environment, started at once; killed past ``timeout``."""
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=cwd, env=base | env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, env) in runs.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.slow
def test_training_from_s3_equals_training_from_local_shards_and_writes_no_credential(s3, reference_run, tmp_path):
    run = tmp_path / "s3run"
    result = run_all({"s3": (resume_args(f"s3://{BUCKET}/set") + [f"hydra.run.dir={run}"], s3)}, cwd=tmp_path)["s3"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_result(run, reference_run)  # the same shards through S3: the same run to the last bit
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".hydra" for p in files) and any(p.suffix == ".ckpt" for p in files)
    for path in files:
        content = path.read_bytes()
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            assert s3[name].encode() not in content, f"{name} written into {path}"


@pytest.mark.slow
def test_storage_failures_end_in_one_line_within_a_bound(s3, tmp_path):
    one_epoch = ["trainer.max_epochs=1", "data.num_workers=0"]
    good = stream_args(f"s3://{BUCKET}/set") + one_epoch
    runs = {
        "credentials": (good, s3 | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
        "bucket": (stream_args("s3://no-such-bucket/set") + one_epoch, s3),
        "truncated": (stream_args(f"s3://{BUCKET}/bad") + one_epoch, s3),
        "unreachable": (good, s3 | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}),
    }
    runs = {name: (args + [f"hydra.run.dir={tmp_path / name}"], env) for name, (args, env) in runs.items()}
    results = run_all(runs, cwd=tmp_path, timeout=240)  # each must end by itself well before
    index = f"s3://{BUCKET}/set/index.json"
    assert_clean_error(results["credentials"], f"cannot read '{index}' (PermissionError", "AWS_ACCESS_KEY_ID")
    assert_clean_error(results["bucket"], "shard index 's3://no-such-bucket/set/index.json' does not exist")
    assert_clean_error(results["truncated"], f"shard 's3://{BUCKET}/bad/train-000001.tar' is not a complete tar")
    assert_clean_error(results["unreachable"], f"cannot read '{index}'", "AWS_ENDPOINT_URL")


@pytest.mark.slow
def test_bad_shard_settings_end_in_one_line(data, reference_run, tmp_path):
    _, _, out = data
    evaluate = subprocess.run([sys.executable, "-m", "finetune.evaluate", f"ckpt={reference_run}", *stream_args(out)[3:6]],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_clean_error(evaluate, "finetune.evaluate reads image folders and tables, not shards (yet)")
    missing = run_cli(stream_args(out)[:4] + ["trainer.max_epochs=1"], cwd=tmp_path)
    assert_clean_error(missing, "data=webdataset needs data.train_urls and data.val_urls")
    bad = copy_shards(out, tmp_path / "bad")
    (bad / "train-000001.tar").write_bytes((bad / "train-000001.tar").read_bytes()[:2000])
    truncated = run_cli(stream_args(bad, workers=2), cwd=tmp_path)
    assert_clean_error(truncated, f"shard '{bad}/train-000001.tar' is not a complete tar file")
    ignored = run_cli(stream_args(out) + ["data.root=/x"], cwd=tmp_path)
    assert_clean_error(ignored, "data.root is set but has no effect with data.name=webdataset")


@pytest.mark.slow
def test_two_ddp_processes_train_on_disjoint_shards_in_equal_steps(data, tmp_path):
    """torchrun, 2 processes (gloo, CPU): each trains on its own streams for the same number of batches
    (the run would hang otherwise), and the evaluation covers the val shards exactly once (checked in the loop)."""
    from test_distributed import ok, torchrun

    _, _, out = data
    run = tmp_path / "ddp"
    ok(torchrun(stream_args(out, epochs=2) + [f"hydra.run.dir={run}"], nproc=2, cwd=tmp_path))
    counts = [s.samples for s in shards_lib.list_shards(train_urls(out))]
    steps = [ShardOrder(counts, seed=0, batch_size=4, buffer=8, world_size=2, rank=0) for _ in range(2)]
    for epoch_number, order in enumerate(steps):
        order.set_epoch(epoch_number)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["train_state"]["global_step"] == sum(o.steps() for o in steps)
    assert state["data_order"]["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
