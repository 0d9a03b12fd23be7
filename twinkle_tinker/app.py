"""The Tinker HTTP API (`/api/v1/...`, as SDK 0.38.0 calls it) over a twinkle_tinker.gateway.Gateway.

Each route checks the caller's API key (X-API-Key), decodes its body, and queues one gateway
operation (answering an UntypedAPIFuture) or answers at once. Used by twinkle_tinker.cli.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from twinkle_protocol.errors import InvalidArgument, NotFound, ResourceExhausted, TwinkleError
from twinkle_tinker import wire
from twinkle_tinker.auth import KeyRing
from twinkle_tinker.gateway import Gateway

log = logging.getLogger(__name__)
PROTOBUF = "application/x-protobuf"
POLL_SECONDS = 30.0  # the SDK waits 45 s per retrieve_future call


def create_app(gateway: Gateway, keys: KeyRing, poll_seconds: float = POLL_SECONDS) -> FastAPI:
    app = FastAPI(title="twinkle-tinker", docs_url=None, redoc_url=None)

    def tenant_of(request: Request) -> str:
        tenant = keys.tenant(request.headers.get("x-api-key"))
        if tenant is None:
            raise HTTPException(401, "missing or unknown API key (X-API-Key)")
        return tenant

    async def body(request: Request) -> dict[str, Any]:
        try:
            value = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(value, dict):
            raise HTTPException(400, "the body is not a JSON object")
        return value

    def answer(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        except (InvalidArgument, KeyError, TypeError, ValueError) as error:
            raise HTTPException(400, f"{type(error).__name__}: {error}") from None

    def future(tenant: str, operation: Callable[[], Any], dedupe: tuple[str, int] | None = None, **extra: Any) -> dict:
        return {"request_id": gateway.submit(tenant, operation, dedupe), **extra}

    def seq(request: dict[str, Any]) -> tuple[str, int] | None:
        return (str(request["model_id"]), int(request["seq_id"])) if request.get("seq_id") is not None else None

    # ------------------------------------------------------ bootstrap

    @app.post("/api/v1/client/config")
    async def client_config(request: Request) -> dict:
        tenant_of(request)
        # Chunks one at a time: the mesh runs them in arrival order.
        return {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": False, "use_pyqwest_transport": False}

    @app.get("/api/v1/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request) -> dict:
        tenant_of(request)
        return {"supported_models": [{"model_name": gateway.options.base_model}]}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request) -> dict:
        tenant = tenant_of(request)
        return {"type": "create_session", "session_id": gateway.create_session(tenant)}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        answer(lambda: gateway.session(tenant, values["session_id"]))
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request) -> dict:
        tenant = tenant_of(request)
        answer(lambda: gateway.finish_session(tenant, session_id))
        return {}

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request) -> dict:
        tenant_of(request)
        return {"status": "accepted"}

    # ------------------------------------------------------ training

    @app.post("/api/v1/create_model")
    async def create_model(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        answer(lambda: gateway.session(tenant, values["session_id"]))
        model_id = f"{values['session_id']}:train:{int(values['model_seq_id'])}"
        return future(tenant, lambda: gateway.create_model(tenant, values), (model_id, 0), model_id=model_id)

    @app.post("/api/v1/get_info")
    async def get_info(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        return answer(lambda: gateway.info(tenant, values["model_id"]))

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request) -> dict:
        tenant = tenant_of(request)
        raw = await request.body()
        if request.headers.get("content-encoding") == "zstd":
            import zstandard

            raw = zstandard.ZstdDecompressor().decompress(raw)
        call = answer(lambda: wire.decode_forward_backward(raw))
        answer(lambda: gateway.model(tenant, call.model_id))
        operation = lambda: gateway.forward_backward(tenant, call)  # noqa: E731
        return future(tenant, operation, (call.model_id, call.seq_id), model_id=call.model_id)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        answer(lambda: gateway.model(tenant, values["model_id"]))
        return future(tenant, lambda: gateway.optim_step(tenant, values), seq(values), model_id=values["model_id"])

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        answer(lambda: gateway.model(tenant, values["model_id"]))
        operation = lambda: gateway.save_weights(tenant, values, "weights")  # noqa: E731
        return future(tenant, operation, seq(values), model_id=values["model_id"])

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_for_sampler(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        answer(lambda: gateway.model(tenant, values["model_id"]))
        operation = lambda: gateway.save_for_sampler(tenant, values)  # noqa: E731
        return future(tenant, operation, seq(values), model_id=values["model_id"])

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        if values.get("session_id") is not None:
            model_id = f"{values['session_id']}:train:{int(values['model_seq_id'])}"
            answer(lambda: gateway.session(tenant, values["session_id"]))
            dedupe: tuple[str, int] | None = (model_id, 0)
        else:
            model_id = values["model_id"]
            answer(lambda: gateway.model(tenant, model_id))
            dedupe = seq(values)
        answer(lambda: gateway.checkpoint_dir(tenant, values["path"]))
        return future(tenant, lambda: gateway.load_weights(tenant, values), dedupe, model_id=model_id)

    # ------------------------------------------------------ sampling

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        sampler_id = answer(lambda: gateway.create_sampler(tenant, values))
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request) -> dict:
        tenant = tenant_of(request)
        sampler = answer(lambda: gateway.sampler(tenant, sampler_id))
        return {"sampler_id": sampler_id, "base_model": gateway.options.base_model, "model_path": sampler.model_path}

    @app.post("/api/v1/asample")
    async def asample(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        answer(lambda: gateway.sampler(tenant, values["sampling_session_id"]))
        dedupe = (values["sampling_session_id"], int(values["seq_id"])) if values.get("seq_id") is not None else None
        request_id = gateway.submit(tenant, lambda: gateway.sample(tenant, values), dedupe)
        count = int(values.get("num_samples", 1))
        return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(count)]}

    # ------------------------------------------------------ futures

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        tenant = tenant_of(request)
        values = await body(request)
        pending = answer(lambda: gateway.future(tenant, values["request_id"]))
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), poll_seconds)
        except asyncio.TimeoutError:
            return JSONResponse({"type": "try_again", "request_id": values["request_id"], "queue_state": "active"})
        except TwinkleError as error:
            user = isinstance(error, (InvalidArgument, NotFound, ResourceExhausted))
            return JSONResponse({"error": str(error), "category": "user" if user else "server"})
        except Exception as error:  # a bug: the gateway logged it on the mesh thread
            return JSONResponse({"error": f"{type(error).__name__}: {error}", "category": "server"})
        if isinstance(result, bytes):
            return Response(result, media_type=PROTOBUF)
        return JSONResponse(result)

    # ------------------------------------------------------ runs and checkpoints

    @app.get("/api/v1/training_runs")
    async def training_runs(request: Request, limit: int = 20, offset: int = 0) -> dict:
        tenant = tenant_of(request)
        runs = gateway.training_runs(tenant)
        cursor = {"offset": offset, "limit": limit, "total_count": len(runs)}
        return {"training_runs": runs[offset : offset + limit], "cursor": cursor}

    @app.get("/api/v1/training_runs/{run_id}")
    async def training_run(run_id: str, request: Request) -> dict:
        tenant = tenant_of(request)
        return answer(lambda: gateway.training_run(tenant, run_id))

    @app.get("/api/v1/training_runs/{run_id}/checkpoints")
    async def checkpoints(run_id: str, request: Request) -> dict:
        tenant = tenant_of(request)
        return {"checkpoints": answer(lambda: gateway.checkpoints(tenant, run_id))}

    @app.delete("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request) -> Response:
        tenant = tenant_of(request)
        answer(lambda: gateway.delete_checkpoint(tenant, run_id, checkpoint_id))
        return Response(status_code=204)

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request) -> dict:
        tenant = tenant_of(request)
        values = await body(request)
        return answer(lambda: gateway.weights_info(tenant, values["tinker_path"]))

    return app
