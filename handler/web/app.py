"""The routes: `GET /ping`, `POST /predict`, and the page at `GET /`."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from engine.settings import ENVELOPE_HEADROOM_BYTES, Settings
from engine.viewer import page_html

from ..inputs import InputError
from ..worker import Delivery, SharpWorker
from .admission import Admission
from .requests import UnsupportedBody, error_status, is_json, predict_request, result_headers

logger = logging.getLogger(__name__)

LOADING_RETRY_S = 10
DRAIN_FACTOR = 4


@dataclass
class ServerState:
    worker: SharpWorker | None = None  # None while the model loads
    broken: str | None = None  # why this worker no longer serves: its GPU failed
    exit_code: int = 0


class BodyTooLarge(ValueError):
    pass


def create_app(settings: Settings, state: ServerState) -> FastAPI:
    limits = settings.worker.http
    admission = Admission(limits.max_queued)
    app = FastAPI(title="sharp-runpod", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(error).__name__})")

    @app.get("/ping", response_model=None)
    def ping() -> Response:
        if state.broken is not None:
            return _error(503, state.broken)
        if state.worker is None:
            return Response(status_code=204)  # no body: uvicorn logs an error for one on a 204
        return JSONResponse({"status": "ready"})

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> Response:
        if state.broken is not None:
            return _error(503, state.broken)
        if state.worker is None:
            return _error(503, "the model is still loading; retry shortly", LOADING_RETRY_S)
        if not admission.try_enter():
            wait = admission.retry_after_s()
            return _error(
                429,
                f"busy: {admission.admitted} requests are running or waiting, the most this "
                f"worker takes (SHARP_MAX_QUEUED); retry in about {wait} s",
                wait,
            )
        try:
            return await _predict(request, state.worker)
        finally:
            admission.leave()

    async def _predict(request: Request, worker: SharpWorker) -> Response:
        content_type = request.headers.get("content-type", "")
        try:
            body = await _read_body(request, _body_limit(content_type))
            job = predict_request(
                content_type,
                request.headers.get("accept", ""),
                list(request.query_params.multi_items()),
                body,
            )
        except BodyTooLarge as error:
            return _error(413, str(error))
        except UnsupportedBody as error:
            return _error(415, str(error))
        except InputError as error:
            return _error(422, str(error))
        delivery = (
            Delivery(limits.max_body_bytes - ENVELOPE_HEADROOM_BYTES)
            if job.wants_json
            else Delivery(limits.max_body_bytes, as_body=True)
        )
        job_id = f"http-{uuid.uuid4().hex}"
        outcome = await admission.run(
            worker.process, job_id, job.job_input, delivery, job.image_data
        )
        if "error" in outcome.result:
            if outcome.result.get("refresh_worker"):
                state.broken = (
                    f"this worker's GPU failed and it no longer serves: {outcome.result['error']}"
                )
            return _error(error_status(outcome), outcome.result["error"])
        if outcome.output is None:  # the JSON result, or a presigned URL
            return JSONResponse(outcome.result)
        return Response(
            outcome.output.data,
            media_type=outcome.output.media_type,
            headers=result_headers(outcome.result, outcome.output),
        )

    def _body_limit(content_type: str) -> int:
        if is_json(content_type):
            return limits.max_body_bytes
        return min(limits.max_body_bytes, settings.worker.max_image_bytes)

    modules = "/modules/" if limits.viewer_modules is not None else None
    if limits.viewer_modules is not None:
        app.mount("/modules", StaticFiles(directory=limits.viewer_modules), name="modules")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html(modules_base=modules))

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused when over `limit`: counted as it comes, Content-Length may lie.

    A body up to DRAIN_FACTOR times the limit is read to its end before the refusal: a client
    still sending would otherwise meet a closed connection instead of the 413 and its message.
    """
    what = (
        "the request body"
        if is_json(request.headers.get("content-type", ""))
        else "the image (the request body)"
    )
    too_large = BodyTooLarge(
        f"{what} is larger than {limit:,} bytes: send a smaller image "
        "(SHARP_MAX_IMAGE_BYTES and SHARP_MAX_BODY_BYTES set the limits), or pass it by image_url"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit * DRAIN_FACTOR:
            raise too_large
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)
