"""Shared fixtures: the real configs composed through Hydra, tiny models, tiny images."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# Two xdist workers share CI's 2 cores (pyproject's addopts): each process, the worker and every run it
# starts, computes on one thread. Two threads each oversubscribe the cores, and OpenMP's waiting threads
# spin: the suite's CPU time rose from 58 to 82 minutes in two workers with the default threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # the runs it starts
    import torch

    torch.set_num_threads(1)  # this process: torch may be imported already (doctest collection)

import blake3
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from finetune.__main__ import CONFIG_DIR  # also registers the schema

REPO = Path(__file__).resolve().parent.parent
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30)]


def make_image_folder(root: Path, *, classes: int = 3, train: int = 6, val: int = 3, size: int = 32,
                      split: bool = True) -> Path:
    """Small learnable images: a coloured square per class on noise (class = colour)."""
    rng = np.random.default_rng(0)
    layouts = {"train": train, "val": val} if split else {"": train + val}
    for sub, count in layouts.items():
        for c in range(classes):
            folder = root / sub / f"class_{c}" if sub else root / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                x, y = rng.integers(0, size // 2, 2)
                pixels[y:y + size // 2, x:x + size // 2] = COLOURS[c % len(COLOURS)]
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def as_large_jpegs(root: Path, *, scale: int = 4) -> Path:
    """Every PNG under ``root`` replaced by a JPEG ``scale`` times its size (quality 90): for a 32 px
    model, large enough to be decoded at a reduced size (`finetune.data.transforms.Preprocess`)."""
    for png in sorted(root.rglob("*.png")):
        with Image.open(png) as image:
            image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC).save(
                png.with_suffix(".jpg"), quality=90)
        png.unlink()
    return root


@pytest.fixture
def busy_cpus():
    """Two processes spinning for the whole test: the 2-core machine is oversubscribed."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


def run_together(commands: dict[str, list[str]], *, module: str, cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """``{name: args}`` of ``python -m MODULE ARGS`` started at once (each mostly imports torch, on one
    of the two cores); their results by name once all have ended."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {name: subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def assert_one_line_errors(results: dict[str, subprocess.CompletedProcess], expected: dict[str, list[str]]) -> None:
    """Each named run failed with exit status 2 and one ``error:`` line holding every expected text."""
    for name, texts in expected.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr[-2000:])
        assert all(text in lines[0] for text in texts), (name, lines[0])


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_overrides(root: Path, *, epochs: int = 2) -> list[str]:
    """A complete run in seconds: timm's test_resnet on 32px images, random init."""
    return ["model=resnet18", "model.name=test_resnet", "model.pretrained=false", "data=custom",
            f"data.root={root}", "data.img_size=32", "data.batch_size=4", "data.num_workers=0",
            f"trainer.max_epochs={epochs}", "logger.progress_bar=false"]


def compose_config(overrides: list[str]):
    """The real conf/ tree composed with Hydra's compose API, as the CLI would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], *, cwd: Path, timeout: float = 600, env: dict | None = None, module: str = "finetune"):
    """``python -m MODULE ARGS`` (``finetune`` by default) in a subprocess; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def assert_manifest_matches_files(checkpoint_dir: Path) -> dict:
    """Every file ``manifest.json`` names exists with the recorded size and digest, re-read from disk.

    The digest is recomputed here with the hash libraries directly, not with the code under test.
    Returns the manifest.
    """
    manifest = json.loads((checkpoint_dir / "manifest.json").read_text())
    assert manifest["files"], f"'{checkpoint_dir / 'manifest.json'}' lists no file"
    for name, entry in manifest["files"].items():
        data = (checkpoint_dir / name).read_bytes()
        assert len(data) == entry["bytes"], f"{name}: {len(data)} bytes on disk, manifest says {entry['bytes']}"
        if "blake3" in entry:
            assert blake3.blake3(data).hexdigest() == entry["blake3"], f"{name}: blake3 differs from manifest.json"
        else:
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name}: sha256 differs from manifest.json"
    return manifest


# Address space a bounded child may map: importing torch alone maps about 3.6 GB here, so this leaves
# about 2.5 GB for the work itself. An attack that needs more fails at once (MemoryError, bad_alloc)
# instead of swapping the machine.
BOUNDED_ADDRESS_SPACE = 6 << 30


def run_bounded(args: list[str], *, cwd: Path, timeout: float = 120, address_space: int = BOUNDED_ADDRESS_SPACE,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess capped in time (killed after ``timeout`` seconds, the test then
    fails, never hangs) and in address space (``RLIMIT_AS``): how hostile-input tests assert that work
    and memory stay bounded. A run that hit the time limit has ``returncode`` None."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=full_env, text=True, preexec_fn=cap,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, None, out, err + f"\n[killed after {timeout} s]")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


SHAPE_CLASSES = ("red", "green", "blue", "yellow")


def make_multilabel_table(root: Path, *, images: int = 48, size: int = 32, classes: int = 3, seed: int = 0,
                          name: str = "labels.csv") -> Path:
    """Images of pasted shapes, a label set each: a square of a class's colour in its own quadrant for each
    class the image has (none too), on noise. Returns ``root/labels.csv`` (path,labels with ';')."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    quarter = size // 2
    for i in range(images):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        present = [c for c in range(classes) if rng.random() < 0.4]
        for c in present:
            y, x = divmod(c, 2)
            side = int(rng.integers(quarter // 2, quarter + 1))
            oy, ox = rng.integers(0, quarter - side + 1, 2)
            top, left = y * quarter + oy, x * quarter + ox
            pixels[top:top + side, left:left + side] = COLOURS[c % len(COLOURS)]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{';'.join(SHAPE_CLASSES[c] for c in present)}")
    (root / name).write_text("\n".join(rows) + "\n")
    return root / name


# ------------------------------------------------------------------ object storage
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the S3 server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the S3 server did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with authentication on (requests need a key it issued). Yields the
    environment a user's job would have (credentials and endpoint: the standard AWS variables)."""
    import boto3

    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    with (root / "moto.log").open("wb") as log:  # the first 3 requests (issuing the key) need no key
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        wait_for_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="none",
                           aws_secret_access_key="none")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": str(root / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "none"),
               "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_client(env: dict[str, str]):
    """A boto3 S3 client with the credentials and endpoint of ``env`` (from `s3_server`)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


# The test files that take longest (--durations in CI), started first: each of the two workers takes the
# next file when it is done with one (--dist loadfile), so a long file started last would run on alone.
LONGEST_FIRST = ("test_resume_cli.py", "test_distributed.py", "test_slurm.py", "test_end_of_run.py",
                 "test_lora.py", "test_hostile_inputs.py", "test_hostile_weights.py", "test_trackers.py",
                 "test_serve.py", "test_stream.py", "test_cli.py", "test_compile.py", "test_resume.py",
                 "test_optuna.py", "test_optuna_postgres.py", "test_lr_find_run.py", "test_export.py",
                 "test_misconfiguration.py", "test_mirror.py", "test_hf.py", "test_remote.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: a file stays together
