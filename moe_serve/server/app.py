"""The FastAPI app: routes, auth, and wiring of engine, runner, handlers and metrics.

`create_app(engine, server_config, model_dir)` builds one independent app (its own metrics
registry), so tests can build several in one process. The engine is owned by whoever built it;
`own_engine=True` makes the app shut it down with the server.
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moe_serve.config import ServerConfig
from moe_serve.server import protocol as P
from moe_serve.server.bridge import EngineBridge
from moe_serve.server.chat import load_chat_template
from moe_serve.server.errors import APIError, install_error_handlers
from moe_serve.server.lifecycle import RequestRunner
from moe_serve.server.metrics import ServerMetrics
from moe_serve.server.serving import Handlers, ModelInfo
from moe_serve.server.traces import TraceControl, download_while_connected, dump_while_connected, stream_file

ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 409, 429, 501, 503, 504)}


def create_app(engine, cfg: ServerConfig, model_dir: str | None = None, own_engine: bool = False) -> FastAPI:
    bridge = EngineBridge(engine)
    name = cfg.served_model_name or (Path(model_dir).name if model_dir else "moe-serve")
    template, template_vars = load_chat_template(model_dir, bridge.tokenizer)
    info = ModelInfo(name=name, tokenizer=bridge.tokenizer, max_model_len=bridge.max_model_len,
                     vocab_size=bridge.vocab_size, chat_template=template, template_vars=template_vars,
                     sampling_defaults=bridge.generation_defaults)
    runner_box: list[RequestRunner] = []
    metrics = ServerMetrics(name, bridge.stats, lambda: runner_box[0].in_flight if runner_box else 0)
    runner = RequestRunner(engine, metrics, cfg.max_pending_requests, cfg.request_timeout_s,
                           bridge.queue_full_errors, bridge.dead_errors)
    runner_box.append(runner)
    handlers = Handlers(runner, info)
    traces = TraceControl(bridge, cfg.trace_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if own_engine:
            await bridge.shutdown()

    app = FastAPI(title="moe-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for Mixture-of-Experts models")
    app.state.metrics, app.state.runner, app.state.info = metrics, runner, info
    install_error_handlers(app, metrics.observe_error)

    async def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        # the header's raw bytes (Starlette decodes them as latin-1): a non-ASCII key arrives UTF-8 encoded
        auth = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(auth, f"Bearer {cfg.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    v1 = {"dependencies": [Depends(check_key)], "responses": ERRORS}

    # HEAD as well: load balancers and uptime checkers probe with it (the body is dropped, as for any HEAD)
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        reason = bridge.dead_reason()
        if reason is not None:  # which rank died and how; a rank's traceback is capped: its head names the rank
            if len(reason) > 4000:
                reason = reason[:1000] + " ... " + reason[-2995:]
            return JSONResponse({"status": "engine dead", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=P.ModelList, **v1)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=name, max_model_len=info.max_model_len)])

    # the openai client's models.retrieve(id); `path`: a served name may hold slashes ("org/model")
    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, **v1)
    async def model(model_id: str):
        check_model(model_id)
        return P.ModelCard(id=name, max_model_len=info.max_model_len)

    @app.post("/v1/completions", response_model=P.CompletionResponse, **v1)
    async def completions(req: P.CompletionRequest, request: Request):
        check_model(req.model)
        return await handlers.completions(req, request)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, **v1)
    async def chat(req: P.ChatCompletionRequest, request: Request):
        check_model(req.model)
        return await handlers.chat(req, request)

    @app.get("/v1/traces", **v1)
    async def trace_status():
        return traces.status()

    @app.post("/v1/traces/start", **v1)
    async def trace_start(body: P.TraceStartRequest | None = None):
        return traces.start(body.record_hidden if body else False)

    @app.post("/v1/traces/stop", **v1)
    async def trace_stop():
        return traces.stop()

    @app.post("/v1/traces/dump", **v1)
    async def trace_dump(request: Request, body: P.TraceRequest | None = None):
        # in a worker thread (the event loop goes on serving), stopped if the client disconnects (traces.py)
        return await dump_while_connected(traces, request, body.path if body else None)

    @app.get("/v1/traces/dump", **v1)
    async def trace_download(request: Request):
        f, size = await download_while_connected(traces, request)  # a temporary file: the body streams from it
        return StreamingResponse(stream_file(f, size), media_type="application/octet-stream",
                                 headers={"Content-Disposition": 'attachment; filename="trace.npz"',
                                          "Content-Length": str(size)})

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise APIError(404, f"model: {requested!r} is not served here; this server serves {name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    return app
