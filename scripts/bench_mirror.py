"""What ``checkpoint.mirror`` costs the training thread, against the upload it hands off.

A checkpoint directory as a run leaves it (``last.ckpt`` of ``--state-mb``, ``best.safetensors`` and
``last.safetensors`` of a third of that, ``manifest.json``) is mirrored to moto's S3 server on 127.0.0.1
through s3fs. Each round writes a new ``last.ckpt`` and ``last.safetensors`` (as a save does), then times
``Mirror.push`` (what the saving thread pays: a hard link per file, the manifest copied) and the upload
that follows on the mirror's thread (``wait_idle``). Medians of ``--rounds``:

    python scripts/bench_mirror.py                      # 100 MB state, 5 rounds
    python scripts/bench_mirror.py --state-mb 400 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.checkpoint import Manifest, atomic_write_stream
from finetune.checkpoint.mirror import Mirror


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto's server did not start")


def save(directory: Path, manifest: Manifest, name: str, megabytes: float, step: int) -> None:
    """A new file under ``name`` (fresh random bytes, written atomically as a save writes), recorded."""
    facts = atomic_write_stream(directory / name, lambda f: f.write(os.urandom(int(megabytes * (1 << 20)))))
    manifest.record(name, facts, kind="state" if name.endswith(".ckpt") else "last", epoch=step, step=step,
                    metric="val/acc1", value=None)
    manifest.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    os.environ |= {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    server = start_server(port)
    try:
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            manifest = Manifest(directory / "manifest.json", fresh=True)
            save(directory, manifest, "best.safetensors", args.state_mb / 3, 0)
            mirror = Mirror("s3://bench/run")
            mirror.check_writable()
            pushes, uploads = [], []
            for step in range(1, args.rounds + 1):
                save(directory, manifest, "last.safetensors", args.state_mb / 3, step)
                save(directory, manifest, "last.ckpt", args.state_mb, step)
                start = time.perf_counter()
                mirror.push(directory, manifest.data)
                pushed = time.perf_counter()
                mirror.wait_idle()
                pushes.append(pushed - start)
                uploads.append(time.perf_counter() - pushed)
            mirror.close()
    finally:
        server.terminate()
        server.wait()
    changed = args.state_mb * 4 / 3
    upload = statistics.median(uploads)
    print(f"state {args.state_mb:g} MB, {changed:g} MB changed per save, {args.rounds} rounds")
    print(f"push on the saving thread: {statistics.median(pushes) * 1000:.1f} ms median "
          f"(max {max(pushes) * 1000:.1f} ms)")
    print(f"upload on the mirror thread: {upload:.2f} s median ({changed / upload:.0f} MB/s)")


if __name__ == "__main__":
    main()
