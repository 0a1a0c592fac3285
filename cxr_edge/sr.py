"""DICOM Structured Report (TID 1500 Measurement Report) for one chest radiograph.

One measurement group (TID 1501) per finding: the calibrated probability as a NUM
(DCM 122157 "Probability", UCUM "1") and Present/Absent as a qualitative evaluation.
highdicom builds the tree and refuses invalid content at construction time. Of the
source image only the identifiers and the Patient / General Study attributes that the
SR IOD requires are carried over, each value validated first (cxr_edge.sr_source). Only the
header is needed: read the source with ``stop_before_pixels=True``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cxr_edge.findings import Finding
from cxr_edge.labels import LABELS
from cxr_edge.sr_source import SRSourceError, describe, validated_source_header

log = logging.getLogger(__name__)
MANUFACTURER = "cxr-edge"
SERIES_DESCRIPTION = "cxr-edge AI findings"
SERIES_NUMBER = 9901  # high, so it sorts after the modality's own series

# Real codes only: DICOM (DCM) or SNOMED CT (SCT). Where pydicom's codedict (the
# concepts of DICOM PS3.16's context groups) has the concept we take it from there;
# the others are SNOMED CT concept ids checked against public terminology sources.
FINDING_CODES: dict[str, Code] = {
    # SNOMED CT 46621007 "Atelectasis (disorder)" (not in pydicom; pydicom only has
    # the narrower plate-like atelectasis 40779009).
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    # pydicom codes.SCT.Cardiomegaly (CID 12248 Cardiac Ultrasound Summary Code).
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    # SNOMED CT 95436008 "Lung consolidation (disorder)" (not in pydicom).
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    # NIH "Edema" is pulmonary edema: pydicom codes.SCT.PulmonaryEdema (CID 3700).
    "Edema": codes.SCT.PulmonaryEdema,
    # NIH "Effusion" is pleural effusion: pydicom codes.SCT.PleuralEffusion.
    "Effusion": codes.SCT.PleuralEffusion,
    # SNOMED CT 87433001 "Pulmonary emphysema (disorder)" (not in pydicom, which
    # only has mediastinal emphysema).
    "Emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    # pydicom codes.SCT.Fibrosis (CID 6335/6336).
    "Fibrosis": codes.SCT.Fibrosis,
    # NIH "Hernia" is almost always a hiatal hernia on a chest film:
    # SNOMED CT 84089009 "Hiatal hernia (disorder)" (not in pydicom).
    "Hernia": Code("84089009", "SCT", "Hiatal hernia"),
    # pydicom codes.DCM.Infiltrate (CID 6104 Abnormal Opacity Finding or Feature).
    "Infiltration": codes.DCM.Infiltrate,
    # pydicom codes.SCT.Mass (CID 6104).
    "Mass": codes.SCT.Mass,
    # pydicom codes.SCT.Nodule (CID 6104).
    "Nodule": codes.SCT.Nodule,
    # No SNOMED CT id for "pleural thickening" could be confirmed from a source we
    # trust, so we use its confirmed parent SNOMED CT 301256004 "Pleura finding
    # (finding)"; the tracking identifier still names the label exactly.
    "Pleural_Thickening": Code("301256004", "SCT", "Pleura finding"),
    # SNOMED CT 233604007 "Pneumonia (disorder)" (not in pydicom).
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    # pydicom codes.SCT.Pneumothorax (CID 6102/6105).
    "Pneumothorax": codes.SCT.Pneumothorax,
    # pydicom codes.DCM.NoAbnormality (DCM 111286 "No abnormality", CID 6030/6031).
    "No Finding": codes.DCM.NoAbnormality,
}
assert set(FINDING_CODES) == set(LABELS)

# SNOMED CT 399208008 "Plain chest X-ray (procedure)": pydicom has no chest-specific
# X-ray procedure (only LN 43468-8 "XR unspecified body region").
PROCEDURE_REPORTED = Code("399208008", "SCT", "Plain chest X-ray")

# CID 240 "Present-Absent" (pydicom codedict).
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent

# What the SR takes from the source: see cxr_edge.sr_source (identifiers, the Type 2 Patient /
# General Study attributes, the animal-patient 1C/2C ones), each value validated first.


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    sha256: str


def build_sr(
    source: pydicom.Dataset,
    findings: Sequence[Finding],
    model: ModelIdentity,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """Comprehensive SR in the source's study, in a new series, UNVERIFIED.

    Raises ValueError for findings without a code, SRSourceError for a source no SR can be
    built from (an invalid UID) or content highdicom refuses; no message quotes a header value.
    """
    labels = [f.label for f in findings]
    unknown = set(labels) - set(FINDING_CODES)
    if unknown:
        raise ValueError(f"no code for finding label(s) {sorted(unknown)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate finding labels in {labels}")

    header, changed = validated_source_header(source)
    if changed:
        log.info("SR for %s: source attribute(s) dropped or normalised: %s",
                 header.SOPInstanceUID, ", ".join(describe(kw) for kw in changed))
    # highdicom's exceptions and warnings quote the values they refuse (a Patient's Name, a
    # date): neither may escape. Warnings are recorded and logged by category only;
    # exceptions become an SRSourceError naming the type. Not chained (`from None`): a
    # process pool would format the cause's message into the traceback it sends back.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sr = _build(header, findings, model, series_instance_uid, sop_instance_uid)
        except Exception as exc:  # noqa: BLE001
            failure = type(exc).__name__
        else:
            failure = None
    if failure is not None:
        raise SRSourceError(f"highdicom refused the SR content: {failure}") from None
    for warning in caught:
        log.debug("SR for %s: highdicom %s (message withheld: may quote patient data)",
                  header.SOPInstanceUID, warning.category.__name__)
    return sr


def _build(header, findings, model, series_instance_uid, sop_instance_uid) -> pydicom.Dataset:
    # The device observer is the algorithm; its UID is derived from the model's
    # identity (name, version, weights' digest) so that every report made by the
    # same model names the same device.
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[model.name, model.version, model.sha256]),
        name=model.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} {model.version}",
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )
    groups = [_measurement_group(header, f, model) for f in findings]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    return hd.sr.ComprehensiveSR(
        # Only the validated header: highdicom copies the Patient / Study attributes it
        # finds in the first evidence dataset, and its Specific Character Set (UTF-8 when
        # any copied value is not ASCII, else none: the default repertoire).
        evidence=[header],
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,  # machine output: PRELIMINARY until a reader signs it
        is_verified=False,  # VerificationFlag UNVERIFIED
    )


def _measurement_group(
    header: pydicom.Dataset, finding: Finding, model: ModelIdentity
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = FINDING_CODES[finding.label]
    # Algorithm parameters are free text (DCM 111002), the one place TID 4019
    # offers for the weights' digest and the operating threshold.
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=MANUFACTURER,
        parameters=[f"sha256={model.sha256}", f"threshold={finding.threshold!r}"],
    )
    probability = hd.sr.Measurement(
        name=codes.DCM.Probability,
        value=finding.probability,
        unit=codes.UCUM.NoUnits,
        algorithm_id=algorithm,
        referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(header)],
    )
    presence = hd.sr.QualitativeEvaluation(
        name=code, value=PRESENT if finding.positive else ABSENT
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=finding.label
        ),
        finding_type=code,
        algorithm_id=algorithm,  # at group level it also covers Present/Absent
        measurements=[probability],
        qualitative_evaluations=[presence],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )


def read_sr_findings(ds: pydicom.Dataset) -> dict[str, tuple[float, bool]]:
    """label -> (probability, present) from an SR written by build_sr."""
    report = hd.sr.MeasurementReport.from_sequence([ds])
    out: dict[str, tuple[float, bool]] = {}
    for group in report.get_image_measurement_groups():
        label = group.tracking_identifier
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        (presence,) = group.get_qualitative_evaluations(name=group.finding_type)
        out[label] = (float(probability.value), presence.value == PRESENT)
    return out
