"""The HTTP API's own request and response envelopes ("models" here means ML models, so these are schemas).

The answers inside them (ImagePrediction, StudyResponse, ...) are the core's: `inference.results`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from inference.results import DISCLAIMER, ImagePrediction


class PredictJSONRequest(BaseModel):
    image: str = Field(description="the PNG, JPEG or DICOM file, base64-encoded")
    image_name: str | None = Field(None, max_length=512)
    body_part: str | None = Field(None, description="skip the router: the client knows the body part")
    heatmap: bool = Field(False, description="also return a Grad-CAM overlay of where the specialist looks")


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]
    disclaimer: str = DISCLAIMER


class ErrorResponse(BaseModel):
    detail: str
    code: str
    status: int


class ModelsResponse(BaseModel):
    name: str
    version: str
    trained: bool
    precision: str
    graph: str
    body_parts: list[str]
    fracture_labels: list[str]
    thresholds: dict[str, dict[str, float | None]]
    input: dict[str, object]
    source: dict[str, object]
    quantization: dict[str, object] | None
    metrics: dict[str, object] | None
    providers: list[str]
    active_provider: str
    batching: dict[str, float | int]
    warnings: list[str]
    disclaimer: str = DISCLAIMER
