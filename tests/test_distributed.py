"""DDP: torchrun runs on CPU (gloo, 2-3 processes), against one process and against each other.

On CPU by default; ``FT_TEST_DEVICE=cuda`` runs the same tests with NCCL on GPUs
(``scripts/ddp_gpu_check.sh``), skipping those that need more processes than there are GPUs.

The data: 21 training images (3 classes x 7) and an uneven validation set of 15, batches of 4 per
process: 3 updates of a global batch of 8 per epoch (the last one split 3 + 2), 4 validation
batches dealt 2 + 2 (or 2 + 1 + 1 with three processes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_manifest_matches_files, make_image_folder, tiny_overrides
from safetensors.torch import load_file

from finetune.checkpoint import load_model, load_training_state
from finetune.data.sampling import EpochSampler, EvalBatches
from finetune.distributed import World, launched_world

TESTS = Path(__file__).parent
SIGNAL_AT = str(TESTS / "signal_at")
DEVICE = os.environ.get("FT_TEST_DEVICE", "cpu")
GPUS = torch.cuda.device_count() if DEVICE == "cuda" else 0
TOLERANCE = 1e-5 if DEVICE == "cpu" else 1e-3  # CUDA convolutions may run in TF32


def processes(n: int):
    """Skip on GPUs when a test needs more processes than there are GPUs (NCCL: one GPU per process)."""
    return pytest.mark.skipif(DEVICE == "cuda" and GPUS < n, reason=f"needs {n} GPUs for {n} NCCL processes")


# ---------------------------------------------------------------- helpers
def torchrun(args: list[str], *, nproc: int, cwd: Path, env: dict | None = None, launcher: tuple = ("--standalone",),
             script: tuple = ("-m", "finetune"), timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun LAUNCHER --nproc_per_node=N -m finetune ARGS`` in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FT_SIGNAL_AT")}
    full_env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SIGNAL_AT, str(TESTS)])} | (env or {})
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", *script, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def one_process(args: list[str], *, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FT_SIGNAL_AT")}
    full_env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": SIGNAL_AT} | (env or {})
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=full_env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def weights(run_dir: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / name)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", classes=3, train=7, val=5)


def args(root: Path, epochs: int = 3, *more: str) -> list[str]:
    return [*tiny_overrides(root, epochs=epochs), f"trainer.device={DEVICE}", *more]


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of 3 epochs, its run dir chosen by Hydra (``${now}``)."""
    cwd = tmp_path_factory.mktemp("ddp_run")
    ok(torchrun(args(data), nproc=2, cwd=cwd))
    runs = list(cwd.glob("outputs/*/*"))
    assert len(runs) == 1, runs  # one run dir, though every process resolved ${now} itself
    return runs[0]


# ---------------------------------------------------------- data sharding
@pytest.mark.parametrize("num_samples", [21, 16, 13, 9, 5])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_of_every_update_are_the_single_process_batch(num_samples, world_size):
    """Per update, the union of the processes' batches is the one-process batch of world x B, in order;
    an epoch is the single-process epoch, less a last batch that would give a process under 2 images."""
    b = 3
    kept = EpochSampler(num_samples, seed=5, batch_size=b, world_size=world_size).epoch_length()
    order = EpochSampler(num_samples, seed=5).epoch_order(2)[:kept]
    shards = []
    for rank in range(world_size):
        sampler = EpochSampler(num_samples, seed=5, batch_size=b, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        mine = list(sampler)
        shards.append([mine[i:i + b] for i in range(0, len(mine), b)])
    assert len({len(s) for s in shards}) == 1  # every process takes the same number of steps
    merged = [[pair for r in range(world_size) for pair in shards[r][k]] for k in range(len(shards[0]))]
    assert merged == [order[i:i + b * world_size] for i in range(0, len(order), b * world_size)]
    assert all(len(batch) >= 2 for shard in shards for batch in shard)  # BatchNorm never sees a batch of 1
    dropped = num_samples - len(order)
    assert dropped == (num_samples % (b * world_size) if num_samples % (b * world_size) < 2 * world_size else 0)


def test_a_resumed_shard_continues_where_the_epoch_stopped():
    full = EpochSampler(21, seed=1, batch_size=4, rank=1, world_size=2)
    full.set_epoch(3)
    everything = list(full)
    resumed = EpochSampler(21, seed=1, batch_size=4, rank=1, world_size=2)
    resumed.set_epoch(3)
    resumed.set_start(8)  # one global batch of 8 done
    assert list(resumed) == everything[4:]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_shards_cover_the_set_once_without_padding(world_size):
    shards = [list(EvalBatches(15, 4, rank, world_size)) for rank in range(world_size)]
    indices = sorted(i for shard in shards for batch in shard for i in batch)
    assert indices == list(range(15))
    assert sorted(b for r in range(world_size) for b in EvalBatches(15, 4, r, world_size).batch_ids) == [0, 1, 2, 3]


def test_the_world_comes_from_torchrun_or_slurm():
    assert launched_world({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}) == World(2, 0, 3)
    assert launched_world({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}) == World(1, 1, 2)
    assert launched_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == World()  # one task: not distributed


# ------------------------------------------------------------ end to end
@pytest.mark.slow
@processes(2)
def test_torchrun_two_processes_make_one_run(ddp_run):
    assert [p.name for p in ddp_run.rglob(".hydra")] == [".hydra"]
    writers = {p.name.split(".")[-2] for p in (ddp_run / "tb").glob("events.out.tfevents.*")}  # by pid
    assert len(writers) == 1  # rank 0's (its hparams summary is a second file of the same process)
    records = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 3 * -(-21 // (2 * 4))  # ceil(train images / (2 x batch)) per epoch
    assert "DDP: 2 processes x data.batch_size 4 = global batch 8" in (ddp_run / "train.log").read_text()
    assert "[rank 1]" not in (ddp_run / "train.log").read_text()
    assert_manifest_matches_files(ddp_run / "checkpoints")
    model, meta = load_model(ddp_run / "checkpoints" / "best.safetensors")  # the single-process format
    assert meta.class_names == ["class_0", "class_1", "class_2"] and not model.training
    assert not any(k.startswith("module.") for k in weights(ddp_run, "best.safetensors"))
    state = load_training_state(ddp_run / "checkpoints" / "last.ckpt")
    assert state["data_order"]["world_size"] == 2 and state["data_order"]["batch_size"] == 4
    assert len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])


@pytest.mark.slow
@processes(2)
def test_ddp_averages_gradients_like_one_process_with_the_global_batch(data, tmp_path):
    """2 processes x batch 4 == 1 process x batch 8: same samples per update (the last one uneven, 3 + 2),
    plain SGD, a LayerNorm model (no batch statistics): the weights agree to float rounding."""
    common = ["model=convnext_tiny", "model.name=test_convnext", "optim=sgd", "optim.name=momentum", "optim.momentum=0", "sched=none",
              "optim.lr=0.05"]
    ok(torchrun(args(data, 1, *common, f"hydra.run.dir={tmp_path / 'ddp'}"), nproc=2, cwd=tmp_path))
    ok(one_process(args(data, 1, *common, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"), cwd=tmp_path))
    ddp, one = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    start = load_model(tmp_path / "one" / "checkpoints" / "last.safetensors")[0]  # only to name the keys
    assert ddp.keys() == one.keys() == set(start.state_dict())
    moved = max((one[k] - weights(tmp_path / "one", "best.safetensors")[k]).abs().max() for k in one)
    assert moved == 0  # one epoch: best is last; the comparison below is of trained weights
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in one)
    assert worst < TOLERANCE, worst  # float32 rounding of a differently ordered sum (TF32 on GPUs)
    for name in ("ddp", "one"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
@processes(2)
def test_two_nodes_on_this_machine_make_the_same_run_as_two_processes(data, ddp_run, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FT_SIGNAL_AT")}
    env |= {"OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "finetune", *args(data)], cwd=tmp_path, stdout=subprocess.PIPE,
                              env=env | ({"CUDA_VISIBLE_DEVICES": str(rank)} if DEVICE == "cuda" else {}),
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    runs = list(tmp_path.glob("outputs/*/*"))
    assert len(runs) == 1, runs
    assert_bit_identical(weights(runs[0]), weights(ddp_run))


@pytest.mark.slow
def test_distributed_evaluation_equals_one_process_exactly(ddp_run, data, tmp_path):
    """World sizes 1, 2 and 3 on 15 validation images in batches of 4: every bit of the result agrees."""
    best = ddp_run / "checkpoints" / "best.safetensors"
    results = []
    for nproc in (1, 2, 3) if DEVICE == "cpu" else range(1, min(GPUS, 3) + 1):
        out = tmp_path / f"eval{nproc}.json"
        ok(torchrun([str(best), str(data), str(out)], nproc=nproc, cwd=tmp_path,
                    script=(str(TESTS / "ddp_eval_worker.py"),)))
        results.append(json.loads(out.read_text()))
    assert results[0]["images"] == 15 and results[0]["batches"] == 4
    assert [r["batches"] for r in results] == [4, 2, 2][:len(results)]  # rank 0's: batches 0-3 / 0,2 / 0,3
    for key in ("loss", "acc1", "per_class_acc", "confusion", "images"):
        assert len({json.dumps(r[key]) for r in results}) == 1, key
    best_epoch = json.loads((ddp_run / "summary.json").read_text())["best"]
    assert float.fromhex(results[0]["acc1"]) == best_epoch["value"]  # what the DDP run itself measured


@pytest.mark.slow
@processes(2)
def test_sigterm_to_one_process_stops_all_at_one_step_then_resume_is_exact(data, ddp_run, tmp_path):
    run_dir = tmp_path / "run"
    stopped = torchrun(args(data, 3, f"hydra.run.dir={run_dir}"), nproc=2, cwd=tmp_path,
                       env={"FT_SIGNAL_AT": "1:4:SIGTERM"})  # rank 1 only, mid-epoch 2
    assert stopped.returncode != 0
    assert stopped.stderr.count("exitcode  : 143") == 2, stopped.stderr[-3000:]  # both processes: 128 + SIGTERM
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    manifest = assert_manifest_matches_files(run_dir / "checkpoints")
    assert manifest["files"]["last.ckpt"]["step"] == 4
    state = load_training_state(run_dir / "checkpoints" / "last.ckpt")
    assert state["train_state"]["global_step"] == 4 and state["train_state"]["batches_seen"] == 1
    shutil.copytree(run_dir, tmp_path / "copy")  # for the resume at another world size below

    resumed = ok(torchrun(args(data, 3, "resume=auto", f"hydra.run.dir={run_dir}"), nproc=2, cwd=tmp_path))
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_bit_identical(weights(run_dir), weights(ddp_run))
    assert_bit_identical(weights(run_dir, "best.safetensors"), weights(ddp_run, "best.safetensors"))
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # The same state, continued by one process: same samples seen, the step counted in updates of 4 images.
    other = one_process(args(data, 3, "resume=auto", f"hydra.run.dir={tmp_path / 'copy'}"), cwd=tmp_path)
    ok(other)
    assert "was saved by 2 process(es), this run has 1" in other.stdout + other.stderr
    summary = json.loads((tmp_path / "copy" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 3 * 5  # 21 images in batches of 4: 5 updates per epoch (a last batch of 1 dropped)
    assert [json.loads(x)["step"] for x in (tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()] == \
        [3, 10, 15]


@pytest.mark.slow
@processes(2)
def test_a_killed_ddp_run_resumes_bit_identical(data, ddp_run, tmp_path):
    """SIGKILL (no save) to rank 0 right after update 5; torchrun takes rank 1 down. The newest state is the
    step-4 save, or the epoch end at step 3 when the kill came while step 4 was still being written in the
    background; continuing from it ends exactly where the uninterrupted run did."""
    run_dir = tmp_path / "run"
    killed = torchrun(args(data, 3, "checkpoint.every_n_steps=2", f"hydra.run.dir={run_dir}"), nproc=2, cwd=tmp_path,
                      env={"FT_SIGNAL_AT": "0:5:SIGKILL"})
    assert killed.returncode != 0
    # (a kill between last.ckpt's rename and the manifest's update leaves a file that does not match its
    # entry: resume=auto then takes the previous state, which is what "resuming from" names)
    resumed = ok(torchrun(args(data, 3, "checkpoint.every_n_steps=2", "resume=auto", f"hydra.run.dir={run_dir}"),
                          nproc=2, cwd=tmp_path))
    assert any(f"step {step}, " in resumed.stdout for step in (3, 4)), resumed.stdout[-2000:]
    assert_bit_identical(weights(run_dir), weights(ddp_run))
    assert_manifest_matches_files(run_dir / "checkpoints")


@pytest.mark.slow
@processes(2)
def test_processes_that_compose_different_configs_refuse_to_train(data, tmp_path):
    result = torchrun(args(data, 1, f"hydra.run.dir={tmp_path / 'run'}"), nproc=2, cwd=tmp_path,
                      script=(str(TESTS / "ddp_entry_seed_by_rank.py"),))
    assert result.returncode != 0
    assert "composed another config than rank 0" in result.stdout + result.stderr
    assert "seed: 0" in result.stdout + result.stderr and "seed: 1" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "manifest.json").exists()


@pytest.mark.slow
@processes(2)
def test_unfreezing_ema_bf16_channels_last_layer_decay_and_lr_auto_under_ddp_resume_exactly(data, tmp_path):
    """The rest of the trainer under DDP: freeze=gradual unfreezes the backbone at epoch 3 (the model is
    wrapped again), EMA, bf16 autocast, channels_last, layer decay, optim.lr=auto (searched on each shard,
    rank 0's rate broadcast), early stopping; SIGTERM mid-run and resume=auto end bit-identical."""
    features = ["freeze=gradual", "trainer.ema=true", "trainer.ema_decay=0.9", "trainer.precision=bf16",
                "trainer.channels_last=true", "optim.layer_decay=0.8", "optim.lr=auto", "optim.lr_find.num_updates=12",
                "optim.lr_find.trial_updates=2", "trainer.early_stopping.patience=10"]
    straight = tmp_path / "straight"
    ok(torchrun(args(data, 4, *features, f"hydra.run.dir={straight}"), nproc=2, cwd=tmp_path))
    log = (straight / "train.log").read_text()
    assert "DistributedDataParallel wraps the model again" in log
    search = json.loads((straight / "lr_find.json").read_text())  # rank 0's search, which every rank trains with
    # the log says what the record says: the rate the trials chose, and why
    assert search["selected_by"] == "trials" and search["lr"] == search["trials"]["rungs"][-1]["kept"][0]
    if search["chosen"] is not None:  # among the curve's candidates
        assert f"optim.lr=auto: chose {search['lr']:.4g} ({search['choice']})" in log
    else:  # the curve gave none (on CPU, this 12-update test on this shard): the fallback rate and 3x it
        assert search["trials"]["candidates"] == [1e-3, 3e-3] and (
            f"optim.lr=auto: {search['reason']}; the trials chose {search['lr']:.4g} of "
            "optim.lr_find.fallback_lr=0.001 and its multiples") in log
    assert json.loads((straight / "summary.json").read_text())["status"] == "completed"

    run_dir = tmp_path / "run"
    stopped = torchrun(args(data, 4, *features, f"hydra.run.dir={run_dir}"), nproc=2, cwd=tmp_path,
                       env={"FT_SIGNAL_AT": "0:8:SIGTERM"})  # epoch 3, after the unfreezing
    assert stopped.returncode != 0 and json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    ok(torchrun(args(data, 4, *features, "resume=auto", f"hydra.run.dir={run_dir}"), nproc=2, cwd=tmp_path))
    for name in ("last.safetensors", "best.safetensors"):
        assert_bit_identical(weights(run_dir, name), weights(straight, name))
    state, again = (load_training_state(d / "checkpoints" / "last.ckpt") for d in (straight, run_dir))
    assert_bit_identical(state["ema"], again["ema"])
    assert state["lr_find"]["lr"] == again["lr_find"]["lr"] == json.loads((straight / "lr_find.json").read_text())["lr"]


@pytest.mark.slow
@processes(2)
def test_a_real_model_under_ddp_and_cpu_load_stops_saves_and_resumes_bit_identical(data, tmp_path, busy_cpus):
    """The default model (a training state of several MB) with a background save after every update,
    its collectives racing the writer thread, on an oversubscribed machine: SIGTERM to rank 1 mid-epoch,
    then resume=auto, ends bit-identical to the uninterrupted run, every file matching its manifest."""
    real = [a for a in args(data, 2) if not a.startswith("model")] + ["model=efficientnet_lite0",
                                                                       "checkpoint.every_n_steps=1"]
    ok(torchrun([*real, f"hydra.run.dir={tmp_path / 'straight'}"], nproc=2, cwd=tmp_path))
    run_dir = tmp_path / "run"
    stopped = torchrun([*real, f"hydra.run.dir={run_dir}"], nproc=2, cwd=tmp_path, env={"FT_SIGNAL_AT": "1:4:SIGTERM"})
    assert stopped.stderr.count("exitcode  : 143") == 2, stopped.stderr[-3000:]
    manifest = assert_manifest_matches_files(run_dir / "checkpoints")
    assert manifest["files"]["last.ckpt"]["step"] == 4 and manifest["files"]["last.ckpt"]["bytes"] > 4 << 20
    ok(torchrun([*real, "resume=auto", f"hydra.run.dir={run_dir}"], nproc=2, cwd=tmp_path))
    assert_bit_identical(weights(run_dir), weights(tmp_path / "straight"))
    assert_manifest_matches_files(run_dir / "checkpoints")


@pytest.mark.slow
@processes(2)
def test_sync_bn_on_cpu_is_a_clear_error(data, tmp_path):
    result = torchrun(args(data, 1, "trainer.sync_bn=true", f"hydra.run.dir={tmp_path / 'run'}"), nproc=2,
                      cwd=tmp_path)
    assert result.returncode != 0
    assert "error: trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm), but this run is on 'cpu'" in result.stderr
    assert "[rank 1] error: trainer.sync_bn=true" in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.strip().startswith('File "') and "/finetune/" in line]
    assert not ours  # no traceback from the run itself (torchrun prints its own about the failed processes)
