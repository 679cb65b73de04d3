"""`/api/analysis`: analyse an image and keep the result; look up past results (the original system's API).

Thin like the other routes: the predictor analyses, `service.store` keeps; this module maps between them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from inference.deidentify import DeidentificationError, deidentify_dicom
from inference.predictor import ImageResult
from inference.results import DISCLAIMER, ImagePrediction
from service.api import PredictorDep, admitted, unless_client_gone
from service.errors import ServiceError
from service.schemas import ErrorResponse
from service.settings import Settings
from service.store import MAX_ROW_NUMBER, Analysis, NewAnalysis, ResultsStore, StoreUnavailableError

log = logging.getLogger(__name__)
router = APIRouter()


class AnalysisRecord(BaseModel):
    id: int
    created_at: datetime
    image_name: str
    image_sha256: str
    model_name: str
    model_version: str
    trained: bool
    result: ImagePrediction = Field(description="the answer; stored results keep the heatmap grid, not its PNG")
    disclaimer: str = DISCLAIMER


class AnalysisPage(BaseModel):
    items: list[AnalysisRecord]
    total: int
    limit: int
    offset: int


def get_store(request: Request) -> ResultsStore:
    store: ResultsStore = request.app.state.store
    return store


StoreDep = Annotated[ResultsStore, Depends(get_store)]
_STORE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "no analysis with this id"},
    503: {
        "model": ErrorResponse,
        "description": "results store unavailable (down, backing off, or misconfigured); predictions still work; "
        "Retry-After says when to try again, absent when retrying cannot help",
    },
}


def _unavailable(error: StoreUnavailableError) -> ServiceError:
    """503 with the store's generic reason (no host, user or database: those are in the log only)."""
    retry = {} if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return ServiceError(503, "store_unavailable", str(error), headers=retry)


def _record(row: Analysis, result: dict[str, Any] | None = None) -> AnalysisRecord:
    return AnalysisRecord(
        id=row.id,
        created_at=row.created_at,
        image_name=row.image_name,
        image_sha256=row.image_sha256,
        model_name=row.model_name,
        model_version=row.model_version,
        trained=row.trained,
        result=ImagePrediction.model_validate(result or row.result),
    )


def _storable(answer: ImagePrediction) -> dict[str, Any]:
    """The answer as stored: JSON, without the overlay PNG (derived, and the bulk of the answer)."""
    stored = answer.model_dump(mode="json")
    if stored.get("heatmap"):
        stored["heatmap"]["overlay_png_base64"] = None
    return stored


@router.post(
    "/api/analysis",
    response_model=AnalysisRecord,
    status_code=201,
    responses=_STORE_ERRORS,
    summary="Analyse one image (FormData: image, image_name, body_part, heatmap) and store the result",
)
async def create_analysis(
    request: Request,
    predictor: PredictorDep,
    store: StoreDep,
    body_part: Annotated[str | None, Query()] = None,
    heatmap: Annotated[bool, Query()] = False,
) -> AnalysisRecord:
    async with admitted(request, predictor, body_part, heatmap) as (tickets, uploads):
        if len(uploads) != 1:
            raise ServiceError(422, "one_image_per_analysis", f"an analysis takes one image, got {len(uploads)}")
        [result] = await unless_client_gone(request.receive, predictor.run_images(tickets, uploads))
        answer = await predictor.answer(result)
        row = await _store(store, request.app.state.settings, result, answer)
    return _record(row, answer.model_dump(mode="json"))


async def _image_to_keep(settings: Settings, result: ImageResult) -> tuple[bytes | None, str | None]:
    """The bytes `store_images` keeps and their media type: DICOM de-identified unless
    `store_identifiable_images`; (None, None) when nothing is kept."""
    data = result.upload.data
    if not settings.store_images:
        return None, None
    if result.prepared.dicom is None:
        return data, "image"
    if settings.store_identifiable_images:
        return data, "application/dicom"
    try:
        return await asyncio.to_thread(deidentify_dicom, data, uid_root=settings.dicom_uid_root), "application/dicom"
    except DeidentificationError as error:  # never keep what could not be de-identified; the result still counts
        log.warning("analysis stored without its image: %s", error)
        return None, None


async def _store(store: ResultsStore, settings: Settings, result: ImageResult, answer: ImagePrediction) -> Analysis:
    upload = result.upload
    image_bytes, media_type = await _image_to_keep(settings, result)
    try:
        return await store.add(
            NewAnalysis(
                image_name=upload.name,
                image_sha256=hashlib.sha256(upload.data).hexdigest(),
                result=_storable(answer),
                image_bytes=image_bytes,
                image_media_type=media_type,
            )
        )
    except StoreUnavailableError as error:
        raise _unavailable(error) from error


@router.get(
    "/api/analysis",
    response_model=AnalysisPage,
    responses=_STORE_ERRORS,
    summary="Past analyses, newest first, optionally of one image name",
)
async def list_analyses(
    store: StoreDep,
    image_name: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_ROW_NUMBER)] = 0,
) -> AnalysisPage:
    try:
        rows, total = await store.list(image_name=image_name, limit=limit, offset=offset)
    except StoreUnavailableError as error:
        raise _unavailable(error) from error
    return AnalysisPage(items=[_record(row) for row in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/api/analysis/{analysis_id}",
    response_model=AnalysisRecord,
    responses=_STORE_ERRORS,
    summary="One past analysis",
)
async def get_analysis(
    store: StoreDep,
    analysis_id: Annotated[int, Path(ge=1, le=MAX_ROW_NUMBER, description="ids start at 1")],
) -> AnalysisRecord:
    try:
        row = await store.get(analysis_id)
    except StoreUnavailableError as error:
        raise _unavailable(error) from error
    if row is None:
        raise ServiceError(404, "not_found", f"no analysis with id {analysis_id}")
    return _record(row)
