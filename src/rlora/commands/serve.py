"""`rlora serve`: trained runs (and their base model) behind an OpenAI-compatible HTTP API.

    POST /v1/chat/completions   messages -> the run's chat template -> generated reply (streamed with "stream": true)
    POST /v1/completions        a prompt, encoded as `rlora generate` encodes it -> generated text (streamed or not)
    GET  /v1/models[/{id}]      the served runs and the base model; a request picks one by its "model"
    GET  /health                {"status": "ok", "queued": ..., "running": ...}

The port is bound before the model loads (a taken or impossible port is a one-line error at once), "serving ... on"
is printed once the runs are loaded and the socket listens. The parts are in `rlora.serving` (docs/serving.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingPackage

logger = logging.getLogger(__name__)

SERVE_HINT = 'pip install "rlora[serve]"'
API_KEY_ENV = "RLORA_API_KEY"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line `ConfigError` saying why not (before anything loads)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 0 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host}: not an address of this machine ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror})") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    run_dirs: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_dir: str | None = None,
    max_model_len: int | None = None,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    settings_args: dict | None = None,
) -> None:
    """Loads the runs and serves them until stopped (Ctrl-C or SIGTERM: uvicorn finishes open requests, then exits).
    `settings_args`: `serving.app.Settings` fields (limits, request timeout)."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackage(f"rlora serve needs {' and '.join(missing)}; install them with: {SERVE_HINT}")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and api_key is None:
        logger.warning(
            "warning: --host %s is reachable from other machines and no API key is set: anyone who can reach it can "
            "use the server (give --api-key or set %s)",
            host,
            API_KEY_ENV,
        )
    sock = bind(host, port)
    try:
        _serve_on(sock, run_dirs, cache_dir, max_model_len, api_key, max_batch, max_queue, settings_args or {})
    finally:
        sock.close()
    logger.info("stopped")


def _serve_on(sock, run_dirs, cache_dir, max_model_len, api_key, max_batch, max_queue, settings_args) -> None:
    import uvicorn

    from ..serving.app import Settings, build_app
    from ..serving.engine import Engine
    from ..serving.runs import load_served

    served = load_served(run_dirs, cache_dir, max_model_len)
    engine = Engine(served.model, served.tokenizer, max_batch=max_batch, max_queue=max_queue)
    app = build_app(served, engine, Settings(api_key=api_key, **settings_args))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    engine.start()
    logger.info(
        "serving %s on http://%s:%d/v1 (context %d tokens, batches of up to %d)",
        ", ".join(served.ids), host, port, served.context_limit, max_batch,
    )  # fmt: skip
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it found: ours marks a
    # SIGTERM as handled (the server has stopped), so the command ends normally instead of being killed.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()


def _stopped(signum: int, frame: Any) -> None:
    """SIGTERM once uvicorn has shut down (see `serve`): nothing left to do."""


def run(args: argparse.Namespace) -> int:
    from ..serving.protocol import Limits

    limits = Limits(args.max_body_bytes, args.max_prompt_chars, args.max_messages)
    serve(
        args.run_dirs,
        host=args.host,
        port=args.port,
        cache_dir=args.cache_dir,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        settings_args={"limits": limits, "request_timeout": args.request_timeout},
    )
    return 0
