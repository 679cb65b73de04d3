"""STOW-RS in: `POST /dicomweb/studies` (multipart/related; type="application/dicom") onto the DICOM node.

For senders that push DICOMweb instead of C-STORE. The body is read under the same byte, memory and time
limits as uploads (`service.uploads`); each part goes to the node exactly as a C-STORE instance would
(`DicomNode.receive`: same checks, same grouping, same results, same outbox). The answer is the DICOM JSON
store response: 200 when every instance was taken, 202 when some were not (their Failure Reasons in the
FailedSOPSequence, the reasons in words in a `Warning` header), 409 when none was, 503 with Retry-After
when none was for lack of room now. 503 as well when the node is off (no BFD_DICOM_DESTINATION).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from dicom_node.scope import OUT_OF_RESOURCES
from dicom_node.stow import FailedInstance, StoredInstance, StowRequestError, dicom_parts, store_response, warning_text
from service.errors import ServiceError
from service.security import ApiKeyDep
from service.settings import Settings
from service.uploads import BodyReader, UploadLimits

if TYPE_CHECKING:
    from dicom_node.node import DicomNode

router = APIRouter()
DICOM_JSON = "application/dicom+json"


def _node(request: Request) -> DicomNode:
    node: DicomNode | None = getattr(request.app.state, "dicom_node", None)
    if node is None:
        raise ServiceError(
            503, "dicom_node_off", "the DICOM node is off: set BFD_DICOM_DESTINATION to take STOW-RS requests"
        )
    return node


@router.post(
    "/dicomweb/studies",
    dependencies=[ApiKeyDep],
    summary="STOW-RS: store instances for analysis; results go to the node's destination (research use only)",
    response_class=JSONResponse,
    responses={
        200: {"content": {DICOM_JSON: {}}, "description": "every instance taken"},
        202: {"content": {DICOM_JSON: {}}, "description": "some instances taken; see FailedSOPSequence"},
        409: {"content": {DICOM_JSON: {}}, "description": "no instance taken"},
        503: {"description": "busy (Retry-After), or the DICOM node is off"},
    },
)
async def stow(request: Request) -> Response:
    node = _node(request)
    settings: Settings = request.app.state.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/related"):
        raise ServiceError(415, "unsupported_media_type", 'STOW-RS takes multipart/related; type="application/dicom"')
    limits = UploadLimits(settings.max_upload_bytes, settings.upload_timeout_s, settings.upload_min_bytes_per_s)
    reader = BodyReader(node.predictor.request_memory, limits)
    try:
        declared = request.headers.get("content-length", "")
        reader.reserve_declared(int(declared) if declared.isdigit() else None)
        body = await reader.read(request.receive)
        try:  # in a decode slot: parsing is proportional to the body, and the event loop must stay free
            parts = await node.predictor.decoder.in_pool(partial(dicom_parts, content_type, body))
        except StowRequestError as error:
            raise ServiceError(400, "malformed_stow_request", str(error)) from error
        del body
        peer = request.client.host if request.client else None
        stored: list[StoredInstance] = []
        failed: list[FailedInstance] = []
        for part in parts:
            receipt = await node.receive(part, "stow-rs", peer=peer)
            if receipt.stored:
                stored.append(StoredInstance(receipt.sop_class_uid, receipt.sop_instance_uid))
            else:
                failed.append(
                    FailedInstance(
                        receipt.sop_class_uid, receipt.sop_instance_uid, receipt.status, receipt.reason or ""
                    )
                )
    finally:
        reader.release()
    headers: dict[str, Any] = {}
    if failed:
        headers["Warning"] = f'299 bfd "{warning_text(failed)}"'
    if not stored and all(f.failure_reason == OUT_OF_RESOURCES for f in failed):
        headers["Retry-After"] = "2"
        status = 503
    else:
        status = 200 if not failed else 202 if stored else 409
    return JSONResponse(store_response(stored, failed), status_code=status, media_type=DICOM_JSON, headers=headers)
