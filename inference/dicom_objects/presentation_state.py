"""The Grayscale Softcopy Presentation State: the result drawn over the untouched source image.

The source's pixels stay as they are in the PACS; the presentation state references it and adds one graphic
layer: the heatmap's hottest region as a closed rectangle (PIXEL units, omitted when there is no heatmap or
it shows nothing) and a few lines of text (DISPLAY units, top left): the UNTRAINED warning when the bundle
is, the finding and P(fractured) (or the abstention), and 'RESEARCH USE ONLY - not a diagnosis'.

The grey display chain is the source's own when it has one: its Modality LUT (rescale) and VOI LUT or window
are copied. A source without VOI gets a window over the range of its values, the min-max display the core
itself renders such an image with (`inference.dicom`), so the radiograph does not come out as a flat grey
full-bit-range ramp. MONOCHROME1 sources get an INVERSE presentation LUT (in a presentation state the output
is P-values, bright = white, whatever the source's photometric interpretation).
"""

from __future__ import annotations

import logging

import numpy as np
from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import generate_uid

from inference.dicom_objects.findings import Algorithm, ImageFinding
from inference.dicom_objects.patient_study import CONSTRUCTION_CHARSET, restore_identity, stand_in
from inference.dicom_objects.region import region_of
from inference.dicom_objects.series import RESEARCH_USE, Series, equipment, stamp
from inference.results import ImagePrediction

log = logging.getLogger(__name__)

GREY = ("MONOCHROME1", "MONOCHROME2")
LAYER = "BFD_RESULT"
CONTENT_LABEL = "BFD_RESULT"
TEXT_LINE_HEIGHT = 0.04  # DISPLAY units: a fraction of the displayed area's height
YELLOW = (255, 255, 0)


def is_grey(source: Dataset) -> bool:
    """Whether a grayscale presentation state can present `source` (one sample, MONOCHROME1/2)."""
    return int(source.get("SamplesPerPixel", 1)) == 1 and str(source.get("PhotometricInterpretation", "")) in GREY


def presentation_state(
    finding: ImageFinding, algorithm: Algorithm, series: Series, *, instance_number: int = 1
) -> Dataset:
    """A GSPS over `finding.source` (grey, with SOP, series and study UIDs) drawing its result."""
    source = finding.source
    if not is_grey(source):
        raise ValueError(
            "a grayscale presentation state needs a MONOCHROME1/2 source with one sample per pixel, got "
            f"{source.get('PhotometricInterpretation')!r} with {source.get('SamplesPerPixel')} samples"
        )
    reference = stand_in(source)
    layer = GraphicLayer(
        layer_name=LAYER, order=1, description=RESEARCH_USE, display_color=CIELabColor.from_rgb(*YELLOW)
    )
    region = region_of(finding.cam, int(source.Rows), int(source.Columns))
    graphics = (
        []
        if region is None
        else [GraphicObject(GraphicTypeValues.POLYLINE, region.corners(), AnnotationUnitsValues.PIXEL)]
    )
    texts = [
        TextObject(
            line,
            AnnotationUnitsValues.DISPLAY,
            bounding_box=(0.01, 0.01 + i * TEXT_LINE_HEIGHT, 0.99, 0.01 + (i + 1) * TEXT_LINE_HEIGHT),
            text_justification="LEFT",
        )
        for i, line in enumerate(annotation_lines(finding.answer))
    ]
    monochrome1 = str(source.PhotometricInterpretation) == "MONOCHROME1"
    state = GrayscaleSoftcopyPresentationState(
        referenced_images=[reference],
        series_instance_uid=series.uid,
        series_number=series.number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        content_label=CONTENT_LABEL,
        content_description=RESEARCH_USE,
        graphic_layers=[layer],
        graphic_annotations=[
            GraphicAnnotation(
                referenced_images=[reference], graphic_layer=layer, graphic_objects=graphics, text_objects=texts
            )
        ],
        voi_lut_transformations=_window_for(source, finding.value_range),
        presentation_lut_transformation=PresentationLUTTransformation(
            presentation_lut_shape=PresentationLUTShapeValues.INVERSE
            if monochrome1
            else PresentationLUTShapeValues.IDENTITY
        ),
        specific_character_set=CONSTRUCTION_CHARSET,
        **equipment(algorithm),
    )
    restore_identity(state, source)
    stamp(state, series)
    return state


def annotation_lines(answer: ImagePrediction) -> list[str]:
    """The few words drawn on the image (ASCII, one short line each)."""
    fracture = answer.fracture
    p = f"P(fractured) = {fracture.probability:.3f}"
    if answer.abstained:
        finding = f"ABSTAINED - do not use the label ({p})"
    else:
        label = "PRESENT" if fracture.label == "fractured" else "absent"
        finding = f"Fracture {label}: {p}, threshold {fracture.threshold:.3f} ({answer.body_part.label})"
    head = [] if answer.model.trained else ["UNTRAINED MODEL - meaningless, do not use"]
    return [*head, finding, RESEARCH_USE]


def _window_for(
    source: Dataset, value_range: tuple[float, float] | None = None
) -> list[SoftcopyVOILUTTransformation] | None:
    """None when the source has its own VOI (highdicom copies it); else a LINEAR window over its value range:
    the one the core rendered the image with when given (no second decode), else found from the source."""
    if source.get("VOILUTSequence") or ("WindowCenter" in source and "WindowWidth" in source):
        return None
    low, high = value_range if value_range is not None else _modality_range(source)
    # PS3.3 C.11.2.1.2.1 LINEAR: c - 0.5 - (w - 1) / 2 -> darkest and c - 0.5 + (w - 1) / 2 -> brightest
    return [
        SoftcopyVOILUTTransformation(
            window_center=(low + high) / 2.0 + 0.5,
            window_width=max(high - low + 1.0, 1.0),
            window_explanation="min-max of the image",
        )
    ]


def _modality_range(source: Dataset) -> tuple[float, float]:
    """The lowest and highest value after the Modality LUT: of the pixels when they are at hand uncompressed,
    else of Smallest/Largest Image Pixel Value, else of the stored bit depth."""
    low, high = _stored_range(source)
    if source.get("ModalityLUTSequence"):
        table = np.asarray(source.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        return float(table.min()), float(table.max())
    slope = float(source.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def _stored_range(source: Dataset) -> tuple[float, float]:
    syntax = getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in source and syntax is not None and not syntax.is_compressed:
        try:  # the decoder itself: `source.pixel_array` would keep a copy of the frame on the source
            pixels, _ = get_decoder(syntax).as_array(source, index=0)
            return float(pixels.min()), float(pixels.max())
        except Exception:  # a frame pydicom cannot read: the header's values then
            log.debug("no pixel range from the source's pixel data", exc_info=True)
    if "SmallestImagePixelValue" in source and "LargestImagePixelValue" in source:
        return float(source.SmallestImagePixelValue), float(source.LargestImagePixelValue)
    bits = int(source.get("BitsStored", 16) or 16)
    if int(source.get("PixelRepresentation", 0) or 0) == 1:
        return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)
