"""What the core answers about an image and a study: the answer's shape, shared by every door.

The HTTP API returns these as JSON, the desktop client and `bfd predict` print them, the DICOM outputs are
written from them. Pydantic models only: no web framework here (`service/schemas.py` adds the HTTP-only
request and response envelopes).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DISCLAIMER = "Research use only. Not a medical device and not a diagnosis: a qualified clinician must read the image."
UNTRAINED_WARNING = (
    "UNTRAINED MODEL: this bundle's heads were not trained on real data; its answers are meaningless "
    "and must not be used as a result."
)


class BodyPartAnswer(BaseModel):
    label: str
    probability: float | None = Field(description="router probability of the label; null when not computed")
    probabilities: dict[str, float] | None
    source: Literal["router", "client", "dicom"] = Field(
        description="who named the part: the router, the client's body_part, or the DICOM BodyPartExamined"
    )
    router_label: str | None = Field(
        None, description="the router's own label when the part came from the client or DICOM and it also ran"
    )


class FractureAnswer(BaseModel):
    label: Literal["fractured", "normal"]
    probability: float = Field(description="P(fractured) from the body part's specialist")
    threshold: float = Field(description="fractured when probability >= threshold")
    suspicious: bool | None = Field(None, description="at the high-sensitivity operating point, when known")
    definite: bool | None = Field(None, description="at the high-specificity operating point, when known")


class ModelAnswer(BaseModel):
    name: str
    version: str
    trained: bool
    precision: str
    graph: str


class HeatmapAnswer(BaseModel):
    method: str = Field(
        "Grad-CAM: gradient of the specialist's pre-softmax 'fractured' score, on the last conv block",
        description="how the map was computed",
    )
    body_part: str = Field(description="whose specialist the map explains")
    grid: list[list[float]] = Field(description="the coarse map, rows top to bottom, values 0..1")
    overlay_png_base64: str | None = Field(
        description="PNG: the map over the radiograph, aspect kept (null in stored results: it is derived)"
    )
    width: int
    height: int


class DicomAnswer(BaseModel):
    """Rendering facts of a DICOM input; never a patient identifier."""

    body_part_examined: str | None
    photometric_interpretation: str
    bits_stored: int
    transfer_syntax: str


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int


class Summary(BaseModel):
    """The answer in words: the same sentences on every door (web page, desktop, DICOM outputs), in ASCII."""

    untrained: str | None = Field(description="set when the model is untrained: its answers are meaningless")
    abstention: str
    body_part: str
    fracture: str
    probabilities: str
    flags: str
    model: str
    lines: list[str] = Field(description="the sentences above in reading order (untrained and abstention first)")


class ImagePrediction(BaseModel):
    image_name: str
    body_part: BodyPartAnswer
    fracture: FractureAnswer
    model: ModelAnswer
    abstained: bool = Field(False, description="true: the model is out of its depth here; do not use the label")
    abstention_reason: str | None = None
    heatmap: HeatmapAnswer | None = None
    dicom: DicomAnswer | None = None
    warnings: list[str]
    timings_ms: Timings
    summary: Summary | None = Field(None, description="the answer in words (absent from results stored before it)")
    disclaimer: str = DISCLAIMER


class StudyAnswer(BaseModel):
    images: int
    body_part: BodyPartAnswer
    fracture: FractureAnswer
    abstained: bool = False
    abstention_reason: str | None = None
    rule: str = (
        "body part: argmax of the images' summed router probabilities; P(fractured): mean of the images' "
        "P(fractured) from that part's specialist (MURA's study rule); label by that part's threshold"
    )


class StudyResponse(BaseModel):
    study: StudyAnswer
    predictions: list[ImagePrediction]
    model: ModelAnswer
    warnings: list[str]
    disclaimer: str = DISCLAIMER
