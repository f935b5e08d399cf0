"""Start the server: check the port, load the model (the service's decision and reason), warm it up, then
serve with uvicorn until Ctrl-C or SIGTERM, which stop new connections and let the requests in flight
finish (up to the request timeout) before the process ends."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Sequence

from chatterbox_cli.errors import UsageError
from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.server.engine import Engine
from chatterbox_cli.server.limits import Limits
from chatterbox_cli.service import LoadRequest, ModelHolder

WARM_UP_TEXT = "Warming up the model for the first request."


def check_port(host: str, port: int) -> None:
    """UsageError when `host:port` cannot be bound, before minutes go into loading the model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise UsageError(f"{host}:{port} {why}; choose another --port or --host") from e


def serve(
    request: LoadRequest,
    limits: Limits,
    *,
    host: str,
    port: int,
    api_key: str | None,
    allow_origins: Sequence[str] = (),
    notify: Callable[[str], None],
) -> None:
    try:
        import uvicorn

        from chatterbox_cli.server.app import check_origins, create_app
    except ImportError as e:
        raise UsageError(
            f"chatterbox serve needs the server extra ({e.name or e} is missing): "
            "pip install 'chatterbox-cli[server]'"
        ) from e
    check_port(host, port)
    origins = check_origins(allow_origins)  # before minutes go into loading the model
    holder = ModelHolder(request, notify)
    engine = Engine(holder)
    if engine.builtin is not None:
        settings = SynthesisSettings(max_tokens=limits.max_tokens)
        notify(f"warmed up in {holder.warm_up(engine.builtin, WARM_UP_TEXT, settings):.1f} s")
    engine_log = logging.getLogger("chatterbox.server")  # one line per decoding round, beside uvicorn's
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    engine.start()
    app = create_app(engine, limits, api_key, origins)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=int(limits.timeout_s),
    )
    auth = "bearer key required" if api_key else "no key"
    notify(f"serving {holder.model.variant.name} at http://{host}:{port} ({auth}); Ctrl-C stops")
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop(timeout=limits.timeout_s)
