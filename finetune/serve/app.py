"""The HTTP application: the Open Inference Protocol's routes, ``POST /predict``, the page, ``/metrics``.

A Starlette app (uvicorn runs it, `finetune.serve.__main__`). Every request handler reads its body
through `read_body` (bounded by ``max_body_bytes``, refused from ``Content-Length`` before reading
when it can be), decodes images off the event loop (a thread), and waits for the `Batcher`; a
`RequestError` anywhere becomes ``{"error": "..."}`` with its status, which ``tritonclient`` raises
as its own ``InferenceServerException``. Unknown paths and methods get the same JSON shape.

`Observed` (pure ASGI middleware) counts every response by route template and status, times it,
and writes one JSON access-log line per request (logger ``finetune.access``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Route

from finetune.serve import protocol
from finetune.serve.batching import Batcher
from finetune.serve.errors import RequestError, bad_request
from finetune.serve.metrics import ServeMetrics
from finetune.serve.model import ServedModel

access_log = logging.getLogger("finetune.access")
VERSION = "1"
MAX_FILES = 256  # images in one POST /predict


@dataclass(frozen=True)
class Limits:
    """What the server accepts: the batching knobs and the request size."""

    max_batch_size: int = 32
    max_delay_s: float = 0.005
    max_queue: int = 256  # images waiting for the model; past it: 503 with Retry-After
    max_body_bytes: int = 64 << 20
    topk: int = 5  # classes per image in POST /predict (the page shows them)


class Service:
    """One served model and its batcher, metrics and limits: what the handlers share."""

    def __init__(self, model: ServedModel, *, model_name: str, limits: Limits) -> None:
        self.model, self.model_name, self.limits = model, model_name, limits
        self.metrics = ServeMetrics()
        self.batcher = Batcher(model.probabilities, max_batch_size=limits.max_batch_size,
                               max_delay_s=limits.max_delay_s, max_queue=limits.max_queue,
                               on_batch=self.metrics.observe_batch, on_queue=self.metrics.queue_depth.set)
        self.ready = False

    # ---------------------------------------------------------------- health and metadata
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "finetune", "version": VERSION, "extensions": ["binary_tensor_data"]})

    async def model_ready(self, request: Request) -> Response:
        self.check_model(request)
        return JSONResponse({"name": self.model_name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        self.check_model(request)
        return JSONResponse(protocol.model_metadata(
            name=self.model_name, version=VERSION, platform=self.platform, input_shape=self.model.input_shape,
            classes=len(self.model.label_names)) | {"classes": self.model.label_names})

    @property
    def platform(self) -> str:
        return {"onnx": "onnxruntime_onnx", "torch": "pytorch_eager"}[self.model.backend]

    def check_model(self, request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version", VERSION)
        if name != self.model_name:
            raise RequestError(404, f"unknown model {protocol.quoted(name)}: this server serves "
                                    f"'{self.model_name}'")
        if version != VERSION:
            raise RequestError(404, f"model '{name}' has no version {protocol.quoted(version)}: it has version "
                                    f"{VERSION}")

    # ---------------------------------------------------------------- inference
    async def infer(self, request: Request) -> Response:
        """``POST /v2/models/{name}/infer``: the Open Inference Protocol, JSON or binary tensors."""
        self.check_model(request)
        body = await read_body(request, self.limits.max_body_bytes)
        parsed = await asyncio.to_thread(protocol.parse_request, body, request.headers.get(protocol.HEADER_LENGTH))
        batch = await asyncio.to_thread(self.input_batch, parsed)
        probs = await self.batcher.submit(batch)
        outputs = {protocol.PROBABILITIES: probs.numpy().astype(np.float32), protocol.LABEL: self.model.labels(probs)}
        content, headers = protocol.encode_response(model_name=self.model_name, version=VERSION,
                                                    request_id=parsed.id, outputs=outputs, binary=parsed.outputs)
        return Response(content, headers=headers)

    def input_batch(self, parsed: protocol.InferRequest) -> torch.Tensor:
        """The request's input as a preprocessed ``(N, C, H, W)`` batch (images decoded here)."""
        count = parsed.shape[0]
        self.check_count(count, what=f"input '{parsed.input}'")
        if parsed.input == protocol.PIXELS:
            expected = [count, *self.model.input_shape]
            if parsed.shape != expected:
                raise bad_request(f"input 'pixels' has shape {parsed.shape}: this model takes FP32 [N,"
                                  f"{','.join(map(str, self.model.input_shape))}] (preprocessed images)")
            return torch.from_numpy(np.ascontiguousarray(parsed.data))
        if len(parsed.shape) != 1:
            raise bad_request(f"input 'image' has shape {parsed.shape}: it must be [N], one encoded file per element")
        return torch.stack([self.model.read(data, name=f"image {i}") for i, data in enumerate(parsed.data)])

    def check_count(self, count: int, *, what: str) -> None:
        if count < 1:
            raise bad_request(f"{what} holds no image: send at least one")
        if count > self.limits.max_queue:
            raise RequestError(413, f"{what} holds {count} images, more than the server ever queues (max_queue="
                                    f"{self.limits.max_queue}): split it into smaller requests")

    async def predict(self, request: Request) -> Response:
        """``POST /predict``: a multipart upload of images -> JSON top-k per image (as ``finetune.predict``)."""
        started = time.perf_counter()
        files = await self.uploaded_files(request)
        self.check_count(len(files), what="the upload")
        topk = topk_of(request.query_params.get("topk"), self.limits.topk)
        batch = await asyncio.to_thread(lambda: torch.stack([self.model.read(data, name=protocol.quoted(name))
                                                             for name, data in files]))
        probs = await self.batcher.submit(batch)
        rows = self.model.top_k(probs, [name for name, _ in files], topk=topk)
        return JSONResponse({"model": self.model_name, "backend": self.model.backend,
                             "seconds": round(time.perf_counter() - started, 6),
                             "predictions": [prediction(row) for row in rows]})

    async def uploaded_files(self, request: Request) -> list[tuple[str, bytes]]:
        """``(file name, bytes)`` of every file in a ``multipart/form-data`` body, in order."""
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise RequestError(415, f"POST /predict takes multipart/form-data (files), not {protocol.quoted(kind)}: "
                                    "curl -F file=@photo.jpg URL/predict")
        body = await read_body(request, self.limits.max_body_bytes)
        replay = Request(request.scope, receive=replaying(body))
        try:
            form = await replay.form(max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=len(body) + 1)
        except HTTPException as err:  # python-multipart: malformed, or over max_files
            raise bad_request(f"the multipart body is malformed ({err.detail})") from None
        try:
            files = [(str(value.filename or key), await value.read()) for key, value in form.multi_items()
                     if not isinstance(value, str)]
        finally:
            await form.close()
        if not files:
            raise bad_request("the upload holds no file: send images as files (curl -F file=@photo.jpg)")
        return files

    # ---------------------------------------------------------------- operations and the page
    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def page(self, request: Request) -> Response:
        text = resources.files("finetune.serve").joinpath("page.html").read_text()
        facts = {"model": self.model_name, "backend": self.model.backend, "classes": self.model.label_names,
                 "architecture": self.model.name}
        # JSON inside a <script>: "<" escaped so that no class name can close the script element
        return HTMLResponse(text.replace("/*FACTS*/{}", json.dumps(facts).replace("<", "\\u003c"))
                            .replace("{{title}}", html.escape(self.model_name)))


def prediction(row: dict[str, Any]) -> dict[str, Any]:
    """A ``finetune.predict`` row as JSON: ``{file, label, prob, top: [{label, prob}, ...]}``."""
    top = [{"label": row["label"], "prob": row["prob"]}]
    top += [{"label": row[f"top{k}"], "prob": row[f"prob{k}"]} for k in range(2, len(row) // 2 + 1)
            if f"top{k}" in row]
    return {"file": row["path"], "label": row["label"], "prob": row["prob"], "top": top}


def topk_of(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
        raise bad_request(f"topk {protocol.quoted(text)} is not a whole number from 1 to 1000")
    return int(text)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it passes ``limit`` bytes: from ``Content-Length`` before
    reading anything, else while reading (a chunked body), never holding more than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body is {size} bytes or more, over the server's max_body_mb "
                             f"({limit / 2**20:g} MB): send fewer or smaller images per request")


def replaying(body: bytes):
    """An ASGI ``receive`` that hands ``body`` (already read) to a second `Request` of the same scope."""
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


# ---------------------------------------------------------------- errors, metrics and the access log
async def request_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, RequestError)
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


async def http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    message = {404: f"no such path {protocol.quoted(request.url.path)}: see GET /v2/models/NAME for the model, "
                    "POST /v2/models/NAME/infer, POST /predict",
               405: f"{request.method} is not allowed on {protocol.quoted(request.url.path)}"}
    return JSONResponse({"error": message.get(err.status_code, str(err.detail))}, status_code=err.status_code,
                        headers=err.headers)


async def server_error(request: Request, err: Exception) -> Response:
    """A bug, not the client's mistake: the traceback is in the log (uvicorn's), the client gets JSON."""
    return JSONResponse({"error": f"the server failed on this request ({type(err).__name__}); see its log"},
                        status_code=500)


class Observed:
    """ASGI middleware: each HTTP response counted (route template, status), timed, and access-logged."""

    def __init__(self, app: Any, service: Service, routes: list[Route]) -> None:
        self.app, self.service, self.routes = app, service, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, sent = time.perf_counter(), [500], [0]

        async def observe(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.record(scope, status[0], sent[0], time.perf_counter() - started)

    def record(self, scope: dict, status: int, sent: int, seconds: float) -> None:
        endpoint = next((route.path for route in self.routes if route.matches(scope)[0] == Match.FULL), "other")
        self.service.metrics.observe_request(endpoint, status, seconds)
        client = scope.get("client") or ("", 0)
        access_log.info(json.dumps({"client": f"{client[0]}:{client[1]}", "method": scope["method"],
                                    "path": scope["path"][:200], "endpoint": endpoint, "status": status,
                                    "bytes": sent, "ms": round(seconds * 1000, 3)}))


def create_app(service: Service) -> Starlette:
    """The app serving ``service``: its batcher runs while the app does (started and stopped by the lifespan)."""
    s = service
    routes = [
        Route("/", s.page), Route("/metrics", s.metrics_text),
        Route("/v2", s.server_metadata), Route("/v2/health/live", s.live), Route("/v2/health/ready", s.server_ready),
        Route("/v2/models/{name}", s.model_metadata), Route("/v2/models/{name}/versions/{version}", s.model_metadata),
        Route("/v2/models/{name}/ready", s.model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", s.model_ready),
        Route("/v2/models/{name}/infer", s.infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", s.infer, methods=["POST"]),
        Route("/predict", s.predict, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        s.batcher.start()
        s.ready = True
        try:
            yield
        finally:
            s.ready = False
            await s.batcher.stop()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={RequestError: request_error, HTTPException: http_error,
                                        Exception: server_error})
    app.add_middleware(Observed, service=s, routes=routes)
    return app
