"""`moe-serve serve`: the OpenAI-compatible HTTP server on one engine.

Flags come from every section of `EngineConfig` (model, KV cache, scheduler, trace, server, and any
section added later, such as the expert cache or parallelism), so new engine options reach the
server without touching this file.
"""
from __future__ import annotations

import socket

from moe_serve.cli.flags import add_config_flags, config_kwargs
from moe_serve.config import EngineConfig


def section_classes() -> list[type]:
    return list(EngineConfig.sections().values())


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a Mixture-of-Experts model over HTTP (/v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health, /metrics, /v1/traces/*).")
    for cls in section_classes():
        group = p.add_argument_group(cls.__name__)
        add_config_flags(group, cls)
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: warning)")
    p.set_defaults(func=run)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound as uvicorn's Config.bind_socket binds it. uvicorn logs a failure as the
    bare OSError ('[Errno 98] Address already in use') and exits with code 3, after the model has loaded;
    here it is a ValueError naming the flags (exit code 2), before."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # in use, not an address of this machine, a name that does not resolve
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    import uvicorn

    from moe_serve.engine.async_engine import AsyncEngine
    from moe_serve.server.app import create_app

    cfg = EngineConfig.from_flat(**config_kwargs(args, *section_classes()))
    sc = cfg.server
    sock = bind_socket(sc.host, sc.port)  # before the model loads; and --port 0 can print the port the OS chose
    engine = None
    try:
        engine = AsyncEngine.from_config(cfg)
        app = create_app(engine, sc, cfg.model.model, own_engine=True)
        config = uvicorn.Config(app, host=sc.host, port=sc.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    except BaseException:
        sock.close()
        if engine is not None:
            engine.shutdown()
        raise
    host, port = sock.getsockname()[:2]
    print(f"moe-serve: serving {app.state.info.name} (max_model_len {app.state.info.max_model_len}) "
          f"on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    return 0
