"""The Grayscale Softcopy Presentation State: the result drawn over the untouched source image.

The source's pixels stay as they are in the PACS; the presentation state references it and adds one graphic
layer: the heatmap's hottest region as a closed rectangle (PIXEL units, omitted when there is no heatmap or
it shows nothing) and a few lines of text (DISPLAY units, top left): the UNTRAINED warning when the bundle
is, the finding and P(fractured) (or the abstention), and 'RESEARCH USE ONLY - not a diagnosis'.

The grey display chain is the source's own when it has one: its Modality LUT (rescale) is copied, and of its
VOI the one the core rendered with (`inference.dicom`: the first VOI LUT, else the first window): the Softcopy
VOI LUT module holds one window or LUT per image (PS3.3 C.11.8; DCMTK refuses a state with two). A source
without VOI gets a window over the range of its values, the min-max display the core renders such an image
with, so the radiograph does not come out as a flat grey full-bit-range ramp. MONOCHROME1 sources get an
INVERSE presentation LUT (in a presentation state the output is P-values, bright = white, whatever the
source's photometric interpretation).

The window is always given to highdicom as one-element lists: highdicom 0.28's SoftcopyVOILUTTransformation
stores a single explanation string as `list(explanation)`, one value per character ('DEFAULT' as 7 values), and
its own copy of a source's window does just that (a highdicom bug; issue 24's note has the upstream report).

For an untrained bundle the text says the finding is undecided, never present or absent.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
from highdicom import VOILUT, PresentationLUTShapeValues, PresentationLUTTransformation, VOILUTFunctionValues
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

from inference.dicom_objects.findings import Algorithm, ImageFinding
from inference.dicom_objects.patient_study import CONSTRUCTION_CHARSET, restore_identity, stand_in
from inference.dicom_objects.region import region_of
from inference.dicom_objects.series import RESEARCH_USE, Series, equipment, stamp
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, new_uid
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
    finding: ImageFinding,
    algorithm: Algorithm,
    series: Series,
    *,
    instance_number: int = 1,
    uid_root: str = DEFAULT_UID_ROOT,
) -> Dataset:
    """A GSPS over `finding.source` (grey, with SOP, series and study UIDs) drawing its result; its SOP
    Instance UID under `uid_root`."""
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
        sop_instance_uid=new_uid(uid_root),
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
    if source.get("VOILUTSequence"):  # the source's own table (highdicom's rebuilt one loses its bit depth)
        state.SoftcopyVOILUTSequence[0].VOILUTSequence = [softcopy_voi_lut(source.VOILUTSequence[0])]
    return state


def softcopy_voi_lut(item: Dataset) -> Dataset:
    """A copy of a source's VOI LUT Sequence item as a presentation state may hold it: entries of 8 or 16 bits.

    An image's VOI LUT may have entries of 8 to 16 bits (PS3.3 C.11.2.1.1), a presentation state's only 8 or
    16 (dciodvfy refuses 12): other depths are scaled to 16 bits, which displays the same (the output range is
    2**bits - 1 either way, as the core renders it: `inference.dicom`)."""
    out = copy.deepcopy(item)
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    if bits in (8, 16):
        return out
    scaled = np.rint(_lut_table(item, bits).astype(np.float64) * (65535.0 / float(2**bits - 1)))
    table = np.clip(scaled, 0, 65535).astype(np.uint16)
    out.LUTDescriptor = [entries, first_mapped, 16]  # the element keeps its VR (US, or SS for signed input)
    if out["LUTData"].VR == "OW":
        out.LUTData = table.astype("<u2").tobytes()
    else:
        out.LUTData = [int(v) for v in table]
    return out


def annotation_lines(answer: ImagePrediction) -> list[str]:
    """The few words drawn on the image (ASCII, one short line each)."""
    fracture = answer.fracture
    p = f"P(fractured) = {fracture.probability:.3f}"
    if answer.abstained:
        finding = f"ABSTAINED - do not use the label ({p})"
    elif not answer.model.trained:
        finding = f"Fracture undecided (untrained model): {p} ({answer.body_part.label})"
    else:
        label = "PRESENT" if fracture.label == "fractured" else "absent"
        finding = f"Fracture {label}: {p}, threshold {fracture.threshold:.3f} ({answer.body_part.label})"
    head = [] if answer.model.trained else ["UNTRAINED MODEL - meaningless, do not use"]
    return [*head, finding, RESEARCH_USE]


def _window_for(source: Dataset, value_range: tuple[float, float] | None = None) -> list[SoftcopyVOILUTTransformation]:
    """The one VOI the core rendered `source` with: its first VOI LUT, else its first window, else a LINEAR
    window over its value range (`value_range`, the core's, when given: no second decode; else found from the
    source). Always one item of one window: one pair per image, and one-element lists (module docstring)."""
    if source.get("VOILUTSequence"):
        return [SoftcopyVOILUTTransformation(voi_luts=[_first_lut(source.VOILUTSequence[0])])]
    if "WindowCenter" in source and "WindowWidth" in source:
        centre, width = _first(source.WindowCenter), _first(source.WindowWidth)
        explanation = _first(source.get("WindowCenterWidthExplanation"))
        function = str(source.get("VOILUTFunction") or "").strip().upper()
        return [
            SoftcopyVOILUTTransformation(
                window_center=[float(centre)],
                window_width=[max(float(width), 1.0)],  # as the core renders a width under 1
                window_explanation=[str(explanation)] if explanation else None,
                voi_lut_function=function if function in _VOI_FUNCTIONS else None,
            )
        ]
    low, high = value_range if value_range is not None else _modality_range(source)
    # PS3.3 C.11.2.1.2.1 LINEAR: c - 0.5 - (w - 1) / 2 -> darkest and c - 0.5 + (w - 1) / 2 -> brightest
    return [
        SoftcopyVOILUTTransformation(
            window_center=[(low + high) / 2.0 + 0.5],
            window_width=[max(high - low + 1.0, 1.0)],
            window_explanation=["min-max of the image"],
        )
    ]


_VOI_FUNCTIONS = {value.value for value in VOILUTFunctionValues}


def _first(value: Any) -> Any:
    """The first value of a multi-valued attribute (None for an absent or empty one)."""
    if value is None or isinstance(value, str | bytes | int | float):
        return value
    values = list(value)
    return values[0] if values else None


def _first_lut(item: Dataset) -> VOILUT:
    """highdicom's VOILUT of a VOI LUT Sequence item, for its constructor: `softcopy_voi_lut` replaces it."""
    _, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    table = _lut_table(item, bits).astype(np.uint16)
    return VOILUT(first_mapped_value=first_mapped & 0xFFFF, lut_data=table, lut_explanation=None)


def _lut_table(item: Dataset, bits: int) -> np.ndarray:
    """(N,) the entries of a LUT Data element: OW bytes (8-bit entries packed in bytes) or US values."""
    data = item.LUTData
    if isinstance(data, bytes):
        return np.frombuffer(data, dtype=np.uint8 if bits <= 8 else "<u2")
    return np.asarray([data] if isinstance(data, int) else list(data))


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
