"""Benchmark ``python -m finetune.serve``: closed-loop clients over loopback, throughput and latency.

    python scripts/bench_serve.py [--model efficientnet_lite0] [--img-size 224] [--requests 192]

Trains a random-init ``--model`` for one epoch on a few generated images (no download), exports it to
ONNX, then serves it in turn as:

- ``onnx, max_batch_size=1``: every request runs alone;
- ``onnx, dynamic``: the defaults (``max_batch_size=32 max_delay_ms=5``);
- ``onnx, max_batch_size=8``: smaller batches, so that decoding and the model overlap at concurrency 32;
- ``torch, dynamic``: the eager model, same batching.

"model busy" is the share of the wall time the model ran (the server's ``finetune_batch_duration_seconds``):
below 100% the model waits for the requests' decoding and HTTP, which batching cannot speed up.

Against each server, ``tritonclient.http`` clients (one per thread, each sending one JPEG per request
and waiting for the answer before the next: a closed loop) run at concurrency 1, 8 and 32 until
``--requests`` requests are answered (64 at concurrency 1), after a warm-up. Prints a table of
throughput (requests/s) and p50/p99 latency (ms), then the ratios the issue asks for, from this one
run: dynamic vs ``max_batch_size=1`` at concurrency 32, onnx vs torch, and int8 vs fp32: ``onnx int8,
dynamic`` serves ``python -m finetune.export quantize=int8`` (refused, and left out, if its check against
fp32 fails), and ``model_int8_vs_fp32`` times the two ONNX files alone in onnxruntime (batch 1 and 32).
``--servers`` picks some of the servers by name prefix.

Server and clients share the machine (2 cores here): the figures include the client's own cost.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CONCURRENCY = (1, 8, 32)


def make_run(work: Path, model: str, img_size: int) -> Path:
    """A random-init ``model`` trained one epoch on 3 x 6 generated images, and its ONNX export."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c in range(3):
            folder = work / "images" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (img_size, img_size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    run = work / "run"
    group = [f"model={model}"] if (Path(__file__).parent.parent / "conf" / "model" / f"{model}.yaml").is_file() else []
    check([sys.executable, "-m", "finetune", *group, f"model.name={model}", "model.pretrained=false", "data=custom",
           f"data.root={work / 'images'}", f"data.img_size={img_size}", "data.batch_size=6", "data.num_workers=0",
           "trainer.max_epochs=1", "logger.progress_bar=false", f"hydra.run.dir={run}"])
    check([sys.executable, "-m", "finetune.export", f"ckpt={run}", f"out={work / 'model.onnx'}"])
    int8 = subprocess.run([sys.executable, "-m", "finetune.export", f"ckpt={run}", "quantize=int8", "calib_images=18",
                           f"out={work / 'model.int8.onnx'}"], capture_output=True, text=True, timeout=1800)
    print((int8.stdout + int8.stderr).strip().splitlines()[-1] if int8.returncode == 2 else
          next(line for line in int8.stdout.splitlines() if line.startswith("int8 vs fp32")))
    return run


def model_only(work: Path) -> None:
    """int8 vs fp32 ONNX files in onnxruntime alone (no HTTP, no decoding): images/s at batch 1 and 32."""
    import onnxruntime

    fp32 = {}
    for batch in (1, 32):
        rates = {}
        for name in ("model.onnx", "model.int8.onnx"):
            session = onnxruntime.InferenceSession(str(work / name), providers=["CPUExecutionProvider"])
            shape = [batch, *session.get_inputs()[0].shape[1:]]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            session.run(None, {"input": x})
            started, runs = time.perf_counter(), max(2, 64 // batch)
            for _ in range(runs):
                session.run(None, {"input": x})
            rates[name] = runs * batch / (time.perf_counter() - started)
        fp32[batch] = rates["model.onnx"]
        print(f"model_int8_vs_fp32_batch{batch}: {rates['model.int8.onnx'] / rates['model.onnx']:.2f} "
              f"({rates['model.int8.onnx']:.1f} vs {rates['model.onnx']:.1f} images/s)")
    print(f"model_fp32_batch32_vs_batch1: {fp32[32] / fp32[1]:.2f} (images/s per image: what batching can gain)")


def check(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with log.open("w") as out:  # safe-write: log is in the temporary dir this script made
        proc = subprocess.Popen([sys.executable, "-m", "finetune.serve", "port=0", "device=cpu", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while (match := re.search(r"serving model .* at http://(\S+)", log.read_text())) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, match.group(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def closed_loop(address: str, image: bytes, *, concurrency: int, requests: int) -> dict[str, float]:
    """``requests`` requests from ``concurrency`` clients, each waiting for its answer before the next."""
    import tritonclient.http as triton

    data = np.array([image], dtype=np.object_)
    latencies: list[float] = []
    left = [requests]
    lock = threading.Lock()

    def client() -> None:
        connection = triton.InferenceServerClient(address, network_timeout=300, connection_timeout=60)
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(data)
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            started = time.perf_counter()
            connection.infer("finetune", [tensor])
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - started
    ms = sorted(1000 * x for x in latencies)
    return {"rps": len(ms) / seconds, "p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def model_seconds(address: str) -> tuple[float, float]:
    """(seconds the model has run, batches) so far, from the server's own ``/metrics``."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=60).read().decode()
    value = {name: float(re.search(rf"^finetune_batch_duration_seconds_{name} (\S+)$", text, re.M).group(1))
             for name in ("sum", "count")}
    return value["sum"], value["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--servers", nargs="*", default=None, help="name prefixes of the servers to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        work = Path(folder)
        run = make_run(work, args.model, args.img_size)
        buffer = io.BytesIO()
        Image.open(next((work / "images" / "val").rglob("*.jpg"))).resize((320, 320)).save(buffer, "JPEG", quality=90)
        configs = {"onnx, max_batch_size=1": [f"ckpt={work / 'model.onnx'}", "backend=onnx", "max_batch_size=1"],
                   "onnx, dynamic": [f"ckpt={work / 'model.onnx'}", "backend=onnx"],
                   "onnx, max_batch_size=8": [f"ckpt={work / 'model.onnx'}", "backend=onnx", "max_batch_size=8"],
                   "torch, dynamic": [f"ckpt={run}", "backend=torch"]}
        if (work / "model.int8.onnx").is_file():
            configs["onnx int8, dynamic"] = [f"ckpt={work / 'model.int8.onnx'}", "backend=onnx"]
            model_only(work)
        if args.servers:
            configs = {k: v for k, v in configs.items() if any(k.startswith(p) for p in args.servers)}
        results = {}
        print(f"{args.model} at {args.img_size} px, one 320x320 JPEG per request, {os.cpu_count()} CPUs")
        print("| server | concurrency | requests/s | p50 ms | p99 ms | model busy | images/batch |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        for name, server_args in configs.items():
            proc, address = start(server_args, work / "server.log")
            try:
                closed_loop(address, buffer.getvalue(), concurrency=4, requests=16)  # warm-up
                for concurrency in CONCURRENCY:
                    count = 64 if concurrency == 1 else args.requests
                    (busy, batches), started = model_seconds(address), time.perf_counter()
                    r = results[name, concurrency] = closed_loop(address, buffer.getvalue(), concurrency=concurrency,
                                                                 requests=count)
                    wall, (busy_after, batches_after) = time.perf_counter() - started, model_seconds(address)
                    print(f"| {name} | {concurrency} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                          f"{(busy_after - busy) / wall:.0%} | {count / (batches_after - batches):.1f} |", flush=True)
            finally:
                stop(proc)
        print()
        ratio("serve_dynamic_vs_batch1", results, "onnx, dynamic", "onnx, max_batch_size=1", (32,), "(target >= 2)")
        ratio("serve_onnx_vs_torch", results, "onnx, dynamic", "torch, dynamic", CONCURRENCY)
        ratio("serve_int8_vs_fp32", results, "onnx int8, dynamic", "onnx, dynamic", CONCURRENCY, "(target >= 1.5)")


def ratio(name: str, results: dict, a: str, b: str, concurrencies: tuple[int, ...], note: str = "") -> None:
    """``name_at_C: a/b`` throughput for each concurrency both servers ran at."""
    for c in concurrencies:
        if (a, c) in results and (b, c) in results:
            print(f"{name}_at_{c}: {results[a, c]['rps'] / results[b, c]['rps']:.2f} {note}".rstrip())


if __name__ == "__main__":
    main()
