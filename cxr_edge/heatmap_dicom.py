"""A heatmap as DICOM a PACS shows in the source's study: a Secondary Capture (highdicom
`SCImage`), RGB, the map burned in with "NOT FOR DIAGNOSIS" (cxr_edge.heatmaps), in a new
series of the source's study, referencing the source image (Source Image Sequence).

Secondary Capture is what every viewer displays; IHE AI Results also allows a Parametric Map
or a presentation state, which many viewers do not show. Like the SR, the Patient and Study
attributes come from the validated header (cxr_edge.sr_source), never straight from the
source; the source's Patient Orientation is copied only when well formed (empty otherwise:
unknown, not guessed). Body Part Examined is CHEST, an unpaired part: no Laterality. Nothing here may quote a header value in an error.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .sr_codes import MANUFACTURER, SERIES_NUMBER
from .sr_source import SOURCE_IF_PRESENT, SRSourceError, validated_source_header

SERIES_DESCRIPTION = "cxr-edge AI heatmaps (not for diagnosis)"
HEATMAP_SERIES_NUMBER = SERIES_NUMBER + 1  # beside the SR's series, after the modality's own
_ORIENTATION = re.compile(r"[APLRHF]{1,3}")
# DCM 121322 "Source image for image processing operation" (CID 7202)
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def heatmap_uids(input_sha256: str, model, labels: list[str]) -> tuple[str, dict[str, str]]:
    """(series UID, {label: SOP Instance UID}), derived from the input's bytes and the model as
    the SR's are: a heatmap made again (a redo, a re-send) is the same instance to the PACS."""
    seed = [input_sha256, model.name, model.version, model.sha256]
    series = generate_uid(entropy_srcs=[*seed, "heatmap-series"])
    return series, {label: generate_uid(entropy_srcs=[*seed, label, "heatmap"]) for label in labels}


def _orientation(source: Dataset) -> tuple[str, str] | None:
    try:
        value = source.get("PatientOrientation")
        values = [str(v) for v in value] if value is not None and not isinstance(value, str) else None
    except Exception:  # noqa: BLE001 - bytes pydicom cannot convert: unknown
        return None
    if values and len(values) == 2 and all(_ORIENTATION.fullmatch(v) for v in values):
        return values[0], values[1]
    return None


@dataclass(frozen=True)
class SCSource:
    """What a Secondary Capture takes from its source, validated once for all of an input's maps."""

    header: Dataset  # sr_source.validated_source_header's
    orientation: tuple[str, str] | None

    @classmethod
    def of(cls, source: Dataset) -> "SCSource":
        """Raises SRSourceError (naming the attribute) when no valid instance can reference `source`."""
        return cls(validated_source_header(source)[0], _orientation(source))


def build_heatmap_sc(source: SCSource, picture: np.ndarray, label: str, probability: float, model,
                     series_instance_uid: str, sop_instance_uid: str, instance_number: int) -> Dataset:
    """The Secondary Capture of one finding's heatmap (`picture`: RGB uint8 with the caption
    burned in). Raises SRSourceError (naming attributes, never values) when highdicom refuses it."""
    import highdicom as hd

    header, orientation = source.header, source.orientation
    with warnings.catch_warnings():  # highdicom's warnings quote the values they check
        warnings.simplefilter("ignore")
        try:
            sc = hd.sc.SCImage.from_ref_dataset(
                header, np.ascontiguousarray(picture), "RGB", 8, "PATIENT", series_instance_uid,
                HEATMAP_SERIES_NUMBER, sop_instance_uid, instance_number, MANUFACTURER,
                patient_orientation=("L", "F"), transfer_syntax_uid=ExplicitVRLittleEndian)
        except Exception as exc:  # noqa: BLE001 - its message may quote a header value
            raise SRSourceError(f"highdicom refused the heatmap content: {type(exc).__name__}") from None
    # The placeholder only satisfied highdicom (which takes single letters, not DICOM's oblique
    # `FL`): the source's own when well formed, else empty (Type 2: unknown, not guessed).
    sc.PatientOrientation = list(orientation) if orientation else None
    if "Laterality" in sc:
        del sc.Laterality  # Type 2C, for paired body parts only
    for keyword in SOURCE_IF_PRESENT:  # an animal's species and breed (Patient module, 2C)
        if keyword in header:
            setattr(sc, keyword, header[keyword].value)
    if "SpecificCharacterSet" in header:
        sc.SpecificCharacterSet = header.SpecificCharacterSet
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.ManufacturerModelName = str(model.name)[:64]
    sc.SoftwareVersions = str(model.version)[:64]
    sc.ImageComments = (f"AI heatmap for {label} (probability {probability:.2f}) by {model.name} {model.version}. "
                        "NOT FOR DIAGNOSIS: where the model's evidence lies, not a finding.")[:10240]
    sc.DerivationDescription = "Class activation map of the model's finding over a reduced copy of the source image"
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    return sc
