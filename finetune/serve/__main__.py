"""``python -m finetune.serve ckpt=RUN_DIR|FILE [host=127.0.0.1 port=8000 backend=auto ...]``: serve a model.

Loads the model (`finetune.serve.model.load_served_model`), binds the socket itself (``port=0``: any
free port), prints ``serving model 'NAME' (BACKEND) at http://HOST:PORT``, and runs the app
(`finetune.serve.app`) under uvicorn. SIGTERM (and Ctrl-C) stop accepting, run what is queued at once,
answer every request in flight, and exit 0 (uvicorn's graceful shutdown, bounded by
``drain_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from finetune.cli import exit_on_user_error
from finetune.config import CONFIG_PACKAGE
from finetune.errors import UserError

try:
    import uvicorn
except ImportError as missing:  # the serve extra is not installed: one line, as every error here
    print(f"error: python -m finetune.serve needs {missing.name}: pip install 'finetune[serve]'", file=sys.stderr)
    sys.exit(2)

log = logging.getLogger("finetune")


@dataclass
class ServeConfig:
    """The keys of ``conf/serve.yaml`` (a typo fails before any work, naming the key)."""

    ckpt: Optional[str] = None  # run dir | best/last.safetensors | last.ckpt | exported .onnx
    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    port: int = 8000  # 0: any free port (the URL is printed)
    backend: str = "auto"  # auto | onnx | torch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    model_name: str = "finetune"  # the name in /v2/models/NAME
    max_batch_size: int = 32  # images per model run (dynamic batching)
    max_delay_ms: float = 5.0  # how long the oldest request waits for others to join its batch
    max_queue: int = 256  # images waiting for the model; past it: 503 with Retry-After
    max_body_mb: float = 64.0  # request bodies over this: 413
    topk: int = 5  # classes per image in POST /predict and on the page
    drain_timeout_s: float = 30.0  # on SIGTERM: answer what is in flight and exit 0 within this


ConfigStore.instance().store(name="serve_schema", node=ServeConfig)

POSITIVE = ("max_batch_size", "max_queue", "max_body_mb", "topk", "drain_timeout_s")


def check_settings(cfg: DictConfig) -> None:
    """One line naming the first key out of range."""
    for key in POSITIVE:
        if not cfg[key] > 0:
            raise UserError(f"{key} must be positive, got '{cfg[key]}'")
    if cfg.max_delay_ms < 0:
        raise UserError(f"max_delay_ms must be 0 or more, got '{cfg.max_delay_ms}'")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"port must be from 0 to 65535 (0: any free port), got '{cfg.port}'")
    if not cfg.model_name or not all(c.isalnum() or c in "-_." for c in cfg.model_name):
        raise UserError(f"model_name '{cfg.model_name}' must be letters, digits, '-', '_' or '.'")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here so that ``port=0`` can print the port it got)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another port= (0: any free "
                        "port) or host=") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(cfg: DictConfig) -> None:
    from finetune.serve.app import Limits, Service, create_app
    from finetune.serve.model import load_served_model

    check_settings(cfg)
    model = load_served_model(cfg.ckpt, backend=cfg.backend, device=cfg.device)
    limits = Limits(max_batch_size=cfg.max_batch_size, max_delay_s=cfg.max_delay_ms / 1000,
                    max_queue=cfg.max_queue, max_body_bytes=int(cfg.max_body_mb * 2**20), topk=cfg.topk)
    service = Service(model, model_name=cfg.model_name, limits=limits)
    sock = bind(cfg.host, cfg.port)
    config = uvicorn.Config(create_app(service), log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=cfg.drain_timeout_s, server_header=False)
    server = DrainingServer(config, flush=service.batcher.flush)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info(f"serving model '{cfg.model_name}' ({model.name}, {model.backend}, {len(model.label_names)} classes) "
             f"at http://{shown}:{port}")
    setup_access_log()
    server.run(sockets=[sock])


class DrainingServer(uvicorn.Server):
    """uvicorn's `Server`, where SIGTERM is the ordinary way to stop: the queued images run at once
    (``flush``), and the process exits 0 once the requests in flight are answered (uvicorn would re-raise
    the signal after its graceful shutdown, ending the process with it)."""

    def __init__(self, config: uvicorn.Config, *, flush: Callable[[], None]) -> None:
        super().__init__(config)
        self.flush = flush
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.should_exit:
            return super().handle_exit(sig, frame)
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.flush)  # safe from a signal handler
        log.info("SIGTERM: draining (no new connections; answering the requests in flight)")


def setup_access_log() -> None:
    """``finetune.access``: one JSON object per line on stdout, nothing else on the line."""
    access = logging.getLogger("finetune.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('{"ts": "%(asctime)s", "access": %(message)s}'))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="serve")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: serve(cfg))


if __name__ == "__main__":
    main()
