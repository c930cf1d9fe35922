"""``python -m finetune.serve``: the real service, started as a subprocess on 127.0.0.1 (a free port it
picks and prints), talked to over loopback by Triton's own client (``tritonclient.http``), by plain HTTP
(``requests``) and by a real headless Chromium; stopped in each fixture's ``finally`` even when a test
fails.

What it answers equals ``finetune.predict`` for the same files (eager: within 1e-5; ONNX: within 1e-5 of
``predict`` on the exported file); bad requests get a 4xx JSON error naming the problem and the next good
request succeeds; requests that arrive together run as one batch, each getting its own rows (under CPU
load); past ``max_queue`` the answer is 503 with Retry-After; SIGTERM answers what is in flight and
exits 0.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import make_image_folder, run_together, tiny_overrides
from finetune.predict import predict

pytestmark = pytest.mark.slow
START_TIMEOUT = 240  # seconds for a server to import torch, load (or export) the model and listen
CLASSES = ["class_0", "class_1", "class_2"]


# ---------------------------------------------------------------- the server, as a subprocess
class Server:
    """A running ``python -m finetune.serve``: its process, URL and log."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.address = url.removeprefix("http://")

    def client(self, **kwargs) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.address, network_timeout=120, connection_timeout=60, **kwargs)

    def metric(self, name: str) -> float:
        """One sample of ``GET /metrics`` (Prometheus text), e.g. ``finetune_queue_depth``."""
        text = requests.get(f"{self.url}/metrics", timeout=30).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics:\n{text[:3000]}"
        return float(match.group(1))

    def wait_for_queue(self, depth: int) -> None:
        """Until ``depth`` images wait in the queue (bounded: the test fails, never hangs)."""
        deadline = time.monotonic() + 120
        while self.metric("finetune_queue_depth") != depth:
            assert time.monotonic() < deadline, f"the queue never held {depth} images:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)


@contextmanager
def serving(ckpt: Path, log: Path, *args: str) -> Iterator[Server]:
    """The service on 127.0.0.1, any free port; stopped (SIGTERM, then SIGKILL) however the block ends."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "finetune.serve", f"ckpt={ckpt}", "port=0", "device=cpu", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    try:
        yield Server(proc, wait_for_url(proc, log), log)
    finally:
        stop(proc)


def wait_for_url(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while (match := re.search(r"serving model .* at (http://\S+)", log.read_text())) is None:
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the server did not start in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    url = match.group(1)
    while requests.get(f"{url}/v2/health/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, f"the server never became ready:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    return url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------- the run, its images and predict's answers
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A trained tiny run, its ONNX export, and ``finetune.predict``'s rows for the validation images
    (eager and ONNX), as JSON."""
    work = tmp_path_factory.mktemp("serve")
    images = make_image_folder(work / "images", train=4, val=3)
    trained = run_together({"train": [*tiny_overrides(images), f"hydra.run.dir={work / 'run'}"]}, cwd=work,
                           module="finetune")
    assert trained["train"].returncode == 0, trained["train"].stderr[-3000:]
    from finetune.export import export

    export(work / "run", "onnx", out=work / "model.onnx")
    files = val_images(work)
    for name, ckpt in (("eager", work / "run"), ("onnx", work / "model.onnx")):
        rows = predict(ckpt, [str(f) for f in files], topk=3, device="cpu")
        (work / f"predict_{name}.json").write_text(json.dumps(rows))
    return work


def val_images(work: Path) -> list[Path]:
    return sorted((work / "images" / "val").rglob("*.png"))


def predicted(work: Path, backend: str = "eager") -> dict[str, dict]:
    """``finetune.predict``'s row for each validation image, by path: label and the probability of each class."""
    rows = json.loads((work / f"predict_{backend}.json").read_text())
    return {row["path"]: {"label": row["label"],
                          "probs": {row[k]: row[k.replace("top", "prob") if k != "label" else "prob"]
                                    for k in ("label", "top2", "top3")}} for row in rows}


def as_vector(probs: dict[str, float]) -> np.ndarray:
    return np.array([probs[name] for name in CLASSES])


def image_input(files: list[Path], *, binary: bool = True) -> triton.InferInput:
    """Input ``image``: the files' bytes as binary data, or in JSON as base64 text (JSON has no bytes)."""
    data = np.array([f.read_bytes() if binary else base64.b64encode(f.read_bytes()) for f in files], dtype=np.object_)
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def assert_equal_to_predict(work: Path, files: list[Path], probs: np.ndarray, labels: list, *,
                            backend: str = "eager") -> None:
    expected = predicted(work, backend)
    for file, row, label in zip(files, probs, labels, strict=True):
        want = expected[str(file)]
        assert (label.decode() if isinstance(label, bytes) else label) == want["label"], file
        np.testing.assert_allclose(row, as_vector(want["probs"]), atol=1e-5, rtol=0, err_msg=str(file))


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[Server]:
    """The eager model, a 1 MB body limit (to test it), default batching."""
    with serving(work / "run", work / "server.log", "backend=torch", "max_body_mb=1") as running:
        yield running


# ---------------------------------------------------------------- the protocol, with Triton's own client
def test_tritonclient_gets_what_predict_writes(server, work):
    client = server.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("finetune")
    metadata = client.get_model_metadata("finetune")
    assert metadata["platform"] == "pytorch_eager"
    assert {i["name"]: i["shape"] for i in metadata["inputs"]} == {"image": [-1], "pixels": [-1, 3, 32, 32]}
    assert {o["name"]: o["shape"] for o in metadata["outputs"]} == {"probabilities": [-1, 3], "label": [-1]}
    files = val_images(work)
    for binary in (True, False):  # the binary-data extension, and plain JSON (images as base64)
        result = client.infer("finetune", [image_input(files, binary=binary)], request_id="r1", outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary),
            triton.InferRequestedOutput("label", binary_data=not binary)])
        assert result.get_response()["id"] == "r1"
        assert result.as_numpy("probabilities").shape == (len(files), 3)
        assert_equal_to_predict(work, files, result.as_numpy("probabilities"), list(result.as_numpy("label")))


def test_preprocessed_pixels_give_the_same_answer(server, work):
    """Input ``pixels`` (FP32 [N,3,H,W]): the checkpoint's own preprocessing, done by the client."""
    from finetune.inference import eval_transform, load_checkpoint

    _, meta, _ = load_checkpoint(work / "run")
    transform = eval_transform(meta)
    files = val_images(work)[:4]
    pixels = np.stack([transform(meta.read_image(f)).numpy() for f in files]).astype(np.float32)
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = server.client().infer("finetune", [tensor])
    assert_equal_to_predict(work, files, result.as_numpy("probabilities"), list(result.as_numpy("label")))


def test_predict_endpoint_answers_a_multipart_upload_with_top_k(server, work):
    files = val_images(work)[:3]
    upload = [("file", (f.name, f.read_bytes(), "image/png")) for f in files]
    answer = requests.post(f"{server.url}/predict?topk=2", files=upload, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = predicted(work)
    assert [p["file"] for p in body["predictions"]] == [f.name for f in files]
    for file, item in zip(files, body["predictions"]):
        want = expected[str(file)]
        assert item["label"] == want["label"] and len(item["top"]) == 2
        for top in item["top"]:
            assert abs(top["prob"] - want["probs"][top["label"]]) <= 1e-5


def test_metrics_and_the_access_log(server, work):
    server.client().infer("finetune", [image_input(val_images(work)[:2])])
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    assert re.search(r'^finetune_requests_total\{endpoint="/v2/models/\{name\}/infer",status="200"\} [1-9]', text, re.M)
    assert re.search(r"^finetune_request_duration_seconds_count\{endpoint=\"/v2/models/\{name\}/infer\"\} [1-9]",
                     text, re.M)
    assert re.search(r"^finetune_batch_size_count [1-9]", text, re.M)
    assert re.search(r"^finetune_queue_depth 0\.0$", text, re.M)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith('{"ts"')]
    infers = [line["access"] for line in lines if line["access"]["endpoint"] == "/v2/models/{name}/infer"]
    assert infers and infers[-1]["status"] == 200 and infers[-1]["method"] == "POST" and infers[-1]["ms"] > 0


# ---------------------------------------------------------------- bad requests
def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (10^10: over the training limit), in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def infer_bytes(server: Server, elements: list[bytes], model: str = "finetune"):
    tensor = triton.InferInput("image", [len(elements)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
    return server.client().infer(model, [tensor])


def infer_fp32(server: Server, name: str, shape: list[int]):
    tensor = triton.InferInput(name, shape, "FP32")
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
    return server.client().infer("finetune", [tensor])


def post(server: Server, path: str, **kwargs):
    answer = requests.post(f"{server.url}{path}", timeout=60, **kwargs)
    if answer.status_code >= 400:
        raise InferenceServerException(answer.json()["error"], status=str(answer.status_code))
    return answer


def truncated_png(work: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(val_images(work)[0]).resize((256, 256)).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_REQUESTS = {  # name: (send(server, work), status, texts the error names)
    "not an image": (lambda s, w: infer_bytes(s, [b"hello, this is text"]), 400, ["image 0 is not an image"]),
    "truncated": (lambda s, w: infer_bytes(s, [truncated_png(w)]), 400, ["image 0", "truncated"]),
    "decompression bomb": (lambda s, w: infer_bytes(s, [bomb_png()]), 400, ["too many pixels", "10000000000"]),
    "no elements": (lambda s, w: infer_bytes(s, []), 400, ["holds no image"]),
    "wrong datatype": (lambda s, w: infer_fp32(s, "image", [1, 4]), 400, ["'image'", "'FP32'", "BYTES"]),
    "wrong shape": (lambda s, w: infer_fp32(s, "pixels", [1, 3, 16, 16]), 400, ["[1, 3, 16, 16]", "[N,3,32,32]"]),
    "unknown input": (lambda s, w: infer_fp32(s, "input", [1, 3, 32, 32]), 400, ["unknown input 'input'"]),
    "unknown model": (lambda s, w: infer_bytes(s, [png_bytes(val_images(w)[0])], model="resnet"), 404,
                      ["unknown model 'resnet'", "'finetune'"]),
    "more images than max_queue": (lambda s, w: infer_bytes(s, [b"x"] * 257), 413, ["257 images", "max_queue=256"]),
    "oversized body": (lambda s, w: infer_bytes(s, [b"\0" * (2 << 20)]), 413, ["max_body_mb", "1 MB"]),
    "not JSON": (lambda s, w: post(s, "/v2/models/finetune/infer", data=b"{nope"), 400, ["not JSON"]),
    "lying header length": (lambda s, w: post(s, "/v2/models/finetune/infer", data=b"{}",
                                              headers={"Inference-Header-Content-Length": "99"}), 400,
                            ["Inference-Header-Content-Length '99'"]),
    "predict: wrong content type": (lambda s, w: post(s, "/predict", data=b"x", headers={"Content-Type": "image/png"}),
                                    415, ["multipart/form-data", "'image/png'"]),
    "predict: a text file": (lambda s, w: post(s, "/predict", files={"file": ("notes.txt", b"text")}), 400,
                             ["'notes.txt' is not an image"]),
    "predict: chunked, too large": (lambda s, w: post(s, "/predict", headers={"Content-Type": "multipart/form-data"},
                                                      data=iter([b"x" * (1 << 19)] * 4)), 413, ["max_body_mb"]),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_clear_error_and_the_server_goes_on(server, work, name):
    send, status, texts = BAD_REQUESTS[name]
    with pytest.raises(InferenceServerException) as raised:
        send(server, work)
    assert raised.value.status() == str(status), raised.value
    assert all(text in raised.value.message() for text in texts), raised.value.message()
    assert server.proc.poll() is None
    files = val_images(work)[:2]
    result = server.client().infer("finetune", [image_input(files)])
    assert_equal_to_predict(work, files, result.as_numpy("probabilities"), list(result.as_numpy("label")))


# ---------------------------------------------------------------- batching, the bounded queue, SIGTERM
@pytest.fixture(scope="module")
def batching_server(work: Path) -> Iterator[Server]:
    """A batch runs only once 8 images wait (the delay is a minute): which requests share a batch is
    then decided by the test, not by timing."""
    with serving(work / "run", work / "batching.log", "backend=torch", "max_batch_size=8", "max_delay_ms=60000",
                 "max_queue=8") as running:
        yield running


def test_concurrent_requests_run_as_one_batch_each_getting_its_own_rows(batching_server, work, busy_cpus):
    files = (val_images(work) * 2)[:8]
    before = batching_server.metric("finetune_batch_size_count")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f: batching_server.client().infer("finetune", [image_input([f])]), files))
    assert batching_server.metric("finetune_batch_size_count") == before + 1  # one model run for the 8 requests
    probs = np.concatenate([r.as_numpy("probabilities") for r in results])
    assert_equal_to_predict(work, files, probs, [r.as_numpy("label")[0] for r in results])


def test_past_max_queue_the_answer_is_503_with_retry_after(batching_server, work):
    files = val_images(work)
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(lambda: batching_server.client().infer("finetune", [image_input(files[:7])]))
        batching_server.wait_for_queue(7)
        answer = requests.post(f"{batching_server.url}/predict", timeout=60,
                               files=[("file", (f.name, f.read_bytes())) for f in files[:2]])
        assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1, answer.text
        assert "7 images are queued (max_queue=8)" in answer.json()["error"]
        last = batching_server.client().infer("finetune", [image_input(files[7:8])])  # fills the batch: both run
        first = waiting.result(timeout=120)
    probs = np.concatenate([first.as_numpy("probabilities"), last.as_numpy("probabilities")])
    labels = [*first.as_numpy("label"), *last.as_numpy("label")]
    assert_equal_to_predict(work, files[:8], probs, labels)


def test_sigterm_answers_the_requests_in_flight_and_exits_0(work, busy_cpus):
    files = val_images(work)[:3]
    with serving(work / "run", work / "sigterm.log", "backend=torch", "max_batch_size=8", "max_delay_ms=60000",
                 "drain_timeout_s=30") as server:
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(lambda f=f: server.client().infer("finetune", [image_input([f])])) for f in files]
            server.wait_for_queue(3)  # all three wait for a batch that would need 8 images
            server.proc.send_signal(signal.SIGTERM)
            results = [p.result(timeout=120) for p in pending]
        assert server.proc.wait(timeout=120) == 0, server.log.read_text()[-3000:]
    probs = np.concatenate([r.as_numpy("probabilities") for r in results])
    assert_equal_to_predict(work, files, probs, [r.as_numpy("label")[0] for r in results])
    assert "SIGTERM: draining" in server.log.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v2/health/live", timeout=10)


# ---------------------------------------------------------------- the ONNX backend and the page
@pytest.fixture(scope="module")
def onnx_server(work: Path) -> Iterator[Server]:
    """backend=auto on a run dir: the weights exported to ONNX, checked, and run by onnxruntime."""
    with serving(work / "run", work / "onnx.log", "model_name=pets") as running:
        yield running


def test_auto_backend_serves_onnx_equal_to_predict_on_the_exported_file(onnx_server, work):
    client = onnx_server.client()
    assert client.get_model_metadata("pets")["platform"] == "onnxruntime_onnx"
    files = val_images(work)
    result = client.infer("pets", [image_input(files)])
    assert_equal_to_predict(work, files, result.as_numpy("probabilities"), list(result.as_numpy("label")),
                            backend="onnx")
    eager = predicted(work, "eager")
    assert [eager[str(f)]["label"] for f in files] == [x.decode() for x in result.as_numpy("label")]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_shows_the_top_classes_of_an_uploaded_image(onnx_server, work, tmp_path):
    from playwright.sync_api import sync_playwright

    image = val_images(work)[4]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{onnx_server.url}/", timeout=60_000)
            assert page.text_content("#model") == "pets"
            assert page.text_content("#classes") == ", ".join(CLASSES)
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result .row", timeout=60_000)
            rows = page.query_selector_all("#result .row .label")
            assert [r.text_content() for r in rows][0] == predicted(work, "onnx")[str(image)]["label"]
            assert len(rows) == 3 and "ms round trip" in page.text_content("#latency")
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()


# ---------------------------------------------------------------- scale-out: a Triton model repository
def test_export_writes_a_triton_repository_that_tritons_own_proto_parses(work):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import onnxruntime

    repo = work / "repository"
    result = run_together({"triton": [f"ckpt={work / 'run'}", "format=triton", f"out={repo}", "model_name=pets",
                                      "max_batch_size=16"]}, module="finetune.export", cwd=work)["triton"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "onnx vs eager" in result.stdout and f"--model-repository={repo}" in result.stdout
    # text_format.Parse raises on any field, enum value or syntax Triton's model_config.proto does not have
    config = text_format.Parse((repo / "pets" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("pets", "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds > 0
    session = onnxruntime.InferenceSession(str(repo / "pets" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [(t.name, list(t.dims)) for t in declared] == [(t.name, list(t.shape[1:])) for t in actual]
        assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in declared)
    assert config.output[0].label_filename == "labels.txt"
    assert (repo / "pets" / "labels.txt").read_text().splitlines() == CLASSES


# ---------------------------------------------------------------- int8: exported, then served as fp32 is
def onnx_predict_rows(model: Path, files: list[Path], cwd: Path) -> dict[str, dict]:
    """``finetune-predict-onnx MODEL FILES`` (a subprocess: the torch-free predictor), its CSV rows by path."""
    import csv

    result = subprocess.run([sys.executable, "-m", "finetune.onnx_predict", str(model), *map(str, files)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {row["path"]: row for row in csv.DictReader(io.StringIO(result.stdout))}


def test_int8_export_is_checked_against_fp32_and_served_as_fp32_is(work):
    import onnx

    out = work / "model.int8.onnx"
    result = run_together({"int8": [f"ckpt={work / 'run'}", "quantize=int8", "calib_images=6", f"out={out}"]},
                          module="finetune.export", cwd=work)["int8"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 vs fp32 on 9 validation images: top-1 agreement 100.0%" in result.stdout
    assert "calibrated on 6 training images" in result.stdout
    model = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    assert all(init.data_type != onnx.TensorProto.FLOAT for init in model.graph.initializer if init.name.endswith(
        "weight_quantized"))
    files = val_images(work)
    rows = onnx_predict_rows(out, files, work)
    fp32 = predicted(work, "onnx")
    assert [rows[str(f)]["label"] for f in files] == [fp32[str(f)]["label"] for f in files]  # as the check said
    with serving(out, work / "int8.log", "backend=onnx") as server:
        answer = server.client().infer("finetune", [image_input(files)])
    probs, labels = answer.as_numpy("probabilities"), [x.decode() for x in answer.as_numpy("label")]
    assert labels == [rows[str(f)]["label"] for f in files]
    for file, row in zip(files, probs, strict=True):  # the served top-1 probability = finetune-predict-onnx's
        assert abs(row.max() - float(rows[str(file)]["prob"])) < 1e-5, file


def test_an_int8_model_that_disagrees_with_fp32_is_refused_and_nothing_is_written(work, monkeypatch):
    import finetune.quantize
    from finetune.errors import UserError
    from finetune.export import export

    monkeypatch.setattr(finetune.quantize, "MIN_AGREEMENT", 1.01)  # no model can pass: the refusal path, for real
    out = work / "refused.int8.onnx"
    with pytest.raises(UserError, match=r"int8 model is refused: .*top-1 agreement 100\.0% \(>= 101% needed\), "
                                        r"acc1 .* -> .* \(drop .* points, <= 1 allowed\); nothing written"):
        export(work / "run", "onnx", out=out, quantize="int8", calib_images=4)
    assert not out.exists() and not [p for p in work.iterdir() if p.name.startswith(".refused")]


def test_int8_bad_settings_are_one_line_errors(work):
    from conftest import assert_one_line_errors

    results = run_together({
        "unknown": [f"ckpt={work / 'run'}", "quantize=int4"],
        "format": [f"ckpt={work / 'run'}", "quantize=int8", "format=torchscript"],
        "calib": [f"ckpt={work / 'run'}", "quantize=int8", "calib_images=0"],
        "no run": [f"ckpt={work / 'model.onnx'}", "quantize=int8"],
    }, module="finetune.export", cwd=work)
    assert_one_line_errors(results, {"unknown": ["quantize 'int4' is not known", "int8"],
                                     "format": ["applies to format=onnx only", "torchscript"],
                                     "calib": ["calib_images must be a positive integer", "'0'"],
                                     "no run": ["model.onnx"]})
    assert not list(work.glob("**/*.int8.onnx.tmp*"))


def test_bad_settings_are_one_line_errors(work):
    from conftest import assert_one_line_errors

    results = run_together({
        "no checkpoint": [f"ckpt={work / 'missing'}", "port=0"],
        "batch size": [f"ckpt={work / 'run'}", "max_batch_size=0"],
        "backend": [f"ckpt={work / 'model.onnx'}", "backend=torch", "port=0"],
    }, module="finetune.serve", cwd=work)
    assert_one_line_errors(results, {"no checkpoint": ["does not exist", "missing"],
                                     "batch size": ["max_batch_size must be positive", "'0'"],
                                     "backend": ["backend=torch needs a weights file", "model.onnx"]})
