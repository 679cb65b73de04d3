"""HTTP routes: thin. Parse and validate the request, hand images to the predictor, map errors."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive

from inference.answers import bundle_warnings, model_answer
from inference.errors import shortened
from inference.predictor import AnswerTicket, Predictor, Upload, release_all
from inference.results import StudyResponse
from service.errors import ServiceError, validation_reasons
from service.metrics import Metrics
from service.schemas import ErrorResponse, ModelsResponse, PredictJSONRequest, PredictResponse
from service.security import ApiKeyDep
from service.settings import Settings
from service.uploads import BodyReader, UploadLimits

router = APIRouter()
T = TypeVar("T")

IMAGE_MEDIA_TYPES = {"image/png", "image/jpeg", "application/dicom"}
ACCEPTED_MEDIA_TYPES = {"multipart/form-data", "application/json", *IMAGE_MEDIA_TYPES}
MAX_NAME_CHARS = 512  # an image's name, as answers, errors and the results store carry it
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,")


def get_predictor(request: Request) -> Predictor:
    predictor: Predictor = request.app.state.predictor
    return predictor


PredictorDep = Annotated[Predictor, Depends(get_predictor)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        408: "the request body did not arrive in time (too slow); the connection is closed",
        413: "body over the byte limit, or an image over the pixel or decode-memory limit",
        415: "unsupported media type or image format",
        422: "not an image, truncated, empty, malformed JSON/base64/multipart/DICOM, unknown body part",
        500: "inference failed for the batch this request was in",
        503: "busy: the expected wait is over the deadline, the queue or memory is full (see Retry-After), or "
        "shutting down",
    }.items()
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "body_part": {"type": "string"},
                        "heatmap": {"type": "boolean"},
                    },
                }
            },
            "application/json": {"schema": PredictJSONRequest.model_json_schema()},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_DICOM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
        "description": "with output=dicom: a DICOM Secondary Capture of the overlay and result, in the source study",
    }
}
BodyPartQuery = Annotated[str | None, Query(description="skip the router for every image")]
HeatmapQuery = Annotated[bool, Query(description="also return a Grad-CAM overlay per image")]


@router.post(
    "/v1/predict",
    dependencies=[ApiKeyDep],
    response_model=PredictResponse,
    responses={**_ERRORS, **_DICOM_RESPONSE},
    openapi_extra=_PREDICT_BODY,
    summary="Body part and fracture answer for one or several radiographs (research use only)",
)
async def predict(
    request: Request,
    predictor: PredictorDep,
    body_part: BodyPartQuery = None,
    heatmap: HeatmapQuery = False,
    output: Annotated[
        Literal["json", "dicom"], Query(description="dicom: a Secondary Capture for one DICOM input")
    ] = "json",
) -> Any:
    async with admitted(request, predictor, body_part, heatmap or output == "dicom") as (tickets, uploads):
        if output == "dicom":
            return await unless_client_gone(request.receive, _dicom_answer(predictor, tickets, uploads))
        predictions = await unless_client_gone(request.receive, predictor.predict(tickets, uploads))
    return PredictResponse(predictions=predictions)


@router.post(
    "/v1/studies",
    dependencies=[ApiKeyDep],
    response_model=StudyResponse,
    responses=_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Several images of one study: per-image answers and the study's (research use only)",
)
async def studies(
    request: Request, predictor: PredictorDep, body_part: BodyPartQuery = None, heatmap: HeatmapQuery = False
) -> StudyResponse:
    async with admitted(request, predictor, body_part, heatmap) as (tickets, uploads):
        return await unless_client_gone(request.receive, predictor.predict_study(tickets, uploads))


async def _dicom_answer(predictor: Predictor, tickets: list[AnswerTicket], uploads: list[Upload]) -> Response:
    if len(uploads) != 1:
        release_all(tickets)
        raise ServiceError(422, "dicom_output_needs_one_image", f"output=dicom takes one image, got {len(uploads)}")
    [result] = await predictor.run_images(tickets, uploads)
    content = await predictor.dicom_report(result)
    return Response(
        content,
        media_type="application/dicom",
        headers={"Content-Disposition": 'attachment; filename="bfd-research-heatmap.dcm"'},
    )


@asynccontextmanager
async def admitted(
    request: Request, predictor: Predictor, body_part: str | None, heatmap: bool
) -> AsyncIterator[tuple[list[AnswerTicket], list[Upload]]]:
    """The request's images with their queue slots, held for the body of the `async with`.

    Refuses at once (503) when a new image could not start within the deadline, before a byte of the body is
    read; then reads it under the byte, memory and time limits (`service.uploads`), parses it, and reserves
    one slot per image. On exit, whatever happened, unsubmitted slots and the body's memory are given back.
    """
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"content-type {shortened(media_type) or '(none)'} not accepted; send {sorted(ACCEPTED_MEDIA_TYPES)}",
        )
    declared = request.headers.get("content-length", "")
    limits = UploadLimits(settings.max_upload_bytes, settings.upload_timeout_s, settings.upload_min_bytes_per_s)
    reader = BodyReader(predictor.request_memory, limits)
    tickets: list[AnswerTicket] = []
    try:
        predictor.check_capacity(1)  # a refused request costs neither bandwidth nor decoding
        reader.reserve_declared(int(declared) if declared.isdigit() else None)
        body = await reader.read(request.receive)
        uploads = await _parse(
            request, predictor, media_type, body, body_part, heatmap, settings.max_images_per_request
        )
        uploads = [_echo_safe(upload) for upload in uploads]
        del body  # the uploads hold what the answer needs
        tickets = predictor.admit(len(uploads))
        yield tickets, uploads
    except ServiceError as error:
        _count_upload_refusal(metrics, error)
        raise
    finally:
        release_all(tickets)  # a no-op for the slots whose images were submitted
        reader.release()


def _echo_safe(upload: Upload) -> Upload:
    """The upload with its name and body part short enough to echo in an answer or an error.

    A body part longer than `QUOTED_CHARS` is no body part of any bundle; shortened, it still is none (it ends
    in "characters)"), so the core refuses it as before, quoting it short. Names are cut at `MAX_NAME_CHARS`.
    """
    body_part = None if upload.body_part is None else shortened(upload.body_part)
    name = shortened(upload.name, MAX_NAME_CHARS)
    if body_part == upload.body_part and name == upload.name:
        return upload
    return dataclasses.replace(upload, name=name, body_part=body_part)


def _count_upload_refusal(metrics: Metrics, error: ServiceError) -> None:
    if error.status == 408:
        metrics.slow_uploads.inc()
    elif error.status == 503 and "memory" in error.reason:
        metrics.refused.labels("memory").inc()


async def _parse(
    request: Request,
    predictor: Predictor,
    media_type: str,
    body: bytes,
    body_part: str | None,
    heatmap: bool,
    max_images: int,
) -> list[Upload]:
    if media_type == "application/json":  # JSON and base64 of up to 30 MB: a decode slot, not the event loop
        return [await predictor.decoder.in_pool(partial(_parse_json, body, body_part, heatmap))]
    if media_type in IMAGE_MEDIA_TYPES:
        name = request.headers.get("x-image-name", "image")
        return [Upload(body, name, body_part, heatmap, dicom=media_type == "application/dicom")]
    return await _parse_multipart(request, body, body_part, heatmap, max_images)


def _parse_json(body: bytes, body_part: str | None, heatmap: bool) -> Upload:
    try:
        payload = PredictJSONRequest.model_validate_json(body)
    except ValidationError as error:
        reasons = validation_reasons(error.errors(), where="body")
        raise ServiceError(422, "invalid_json", f"invalid JSON request: {reasons}") from error
    # Whitespace is dropped first: the `base64` command (and many libraries) wrap lines at 76 characters.
    encoded = "".join(_DATA_URL.sub("", payload.image.strip()).split())
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ServiceError(422, "invalid_base64", f"field 'image' is not valid base64 ({error})") from error
    return Upload(data, payload.image_name or "image", payload.body_part or body_part, payload.heatmap or heatmap)


async def _parse_multipart(
    request: Request, body: bytes, body_part: str | None, heatmap: bool, max_images: int
) -> list[Upload]:
    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_images, max_fields=16)
    except StarletteHTTPException as error:
        raise ServiceError(422, "invalid_multipart", f"malformed multipart body: {error.detail}") from error
    try:
        # 'file' is this API's field; 'image' the original system's FormData field (/api/analysis)
        files = [f for key in ("file", "image") for f in form.getlist(key) if isinstance(f, UploadFile)]
        if not files:
            raise ServiceError(422, "missing_file", "multipart field 'file' (one or more images) is required")
        given_name = form.get("image_name")
        hint = form.get("body_part")
        hint = hint if isinstance(hint, str) and hint else body_part
        wanted = form.get("heatmap")
        heatmap = heatmap or (isinstance(wanted, str) and wanted.strip().lower() in {"1", "true", "yes", "on"})
        uploads = []
        for index, file in enumerate(files):
            name = file.filename or f"image-{index + 1}"
            if isinstance(given_name, str) and given_name.strip() and len(files) == 1:
                name = given_name.strip()[:MAX_NAME_CHARS]
            dicom = (file.content_type or "").lower() == "application/dicom" or name.lower().endswith(".dcm")
            uploads.append(Upload(await file.read(), name, hint, heatmap, dicom))
        return uploads
    finally:
        await form.close()


async def unless_client_gone(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it if the client disconnects: its queued images are then skipped."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client went away (or we are being cancelled): drop its queued images
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise ServiceError(499, "client_closed_request", "client went away before its answer was ready")
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@router.get("/v1/models", dependencies=[ApiKeyDep], response_model=ModelsResponse, summary="The bundle being served")
async def models(request: Request, predictor: PredictorDep) -> ModelsResponse:
    manifest = predictor.manifest
    settings: Settings = request.app.state.settings
    return ModelsResponse(
        **model_answer(manifest).model_dump(),
        body_parts=manifest.body_parts,
        fracture_labels=list(manifest.fracture_labels),
        thresholds={part: t.model_dump() for part, t in manifest.thresholds.items()},
        input=manifest.input.model_dump(),
        source=manifest.source.model_dump(mode="json"),
        quantization=None if manifest.quantization is None else manifest.quantization.model_dump(),
        metrics=manifest.metrics,
        providers=predictor.engine.active_providers,
        active_provider=predictor.engine.active_provider,
        batching={
            "max_batch_size": settings.max_batch_size,
            "max_queue_size": settings.max_queue_size,
            "max_wait_ms": settings.max_wait_ms,
            "intra_op_threads": predictor.engine.intra_op_threads,
            "decode_threads": settings.resolved_decode_threads(),
            "max_queue_wait_ms": settings.max_queue_wait_ms,
            "max_image_decode_bytes": settings.max_image_decode_bytes,
            "decode_memory_budget_bytes": settings.decode_memory_budget_bytes,
            "request_memory_budget_bytes": settings.request_memory_budget_bytes,
        },
        warnings=bundle_warnings(manifest),
    )


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Bundle loaded, warm-up done, not draining")
async def readyz(request: Request) -> JSONResponse:
    ready = bool(getattr(request.app.state, "ready", False))
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
