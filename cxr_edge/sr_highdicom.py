"""The SR document as highdicom's generic constructors build it: the reference.

highdicom validates every content item as it builds the tree (~0.5 s for 15 findings), which
is why the runtime fills in a template instead (cxr_edge.sr_template). This module stays the
definition of what an SR contains: the template is this document, and the tests compare the
two item by item.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cxr_edge.findings import Finding, display_probability, summary_text
from cxr_edge.sr_codes import (
    ABSENT, FINDING_CODES, MANUFACTURER, PRESENT, PROCEDURE_REPORTED, QUALITATIVE_EVALUATIONS,
    SERIES_DESCRIPTION, SERIES_NUMBER,
)  # fmt: skip


def device_uid(model) -> str:
    # The device observer is the algorithm; its UID is derived from the model's identity (name,
    # version, weights' digest) so that every report made by the same model names the same device.
    return generate_uid(entropy_srcs=[model.name, model.version, model.sha256])


def highdicom_sr(
    header: pydicom.Dataset,
    findings: Sequence[Finding],
    model,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    tracking_uids: Sequence[str],
    summary: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """Comprehensive SR for `header` (a validated source header, cxr_edge.sr_source) in a new
    series, UNVERIFIED. Raises whatever highdicom raises for content it refuses.

    `summary`: the text of the Summary item (default: findings.summary_text of `findings`)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(model),
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
    groups = [_measurement_group(header, f, model, uid)
              for f, uid in zip(findings, tracking_uids, strict=True)]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_summary(summary if summary is not None else summary_text(findings)))
    return hd.sr.ComprehensiveSR(
        # Only the validated header: highdicom copies the Patient / Study attributes it
        # finds in the first evidence dataset, and its Specific Character Set (UTF-8 when
        # any copied value is not ASCII, else none: the default repertoire).
        evidence=[header],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
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
    header: pydicom.Dataset, finding: Finding, model, tracking_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = FINDING_CODES[finding.label]
    # Algorithm parameters are free text (DCM 111002), the one place TID 4019
    # offers for the weights' digest and the operating threshold.
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=MANUFACTURER,
        parameters=[f"sha256={model.sha256}", threshold_text(finding)],
    )
    probability = hd.sr.Measurement(
        name=codes.DCM.Probability,
        value=display_probability(finding.probability),
        unit=codes.UCUM.NoUnits,
        algorithm_id=algorithm,
        referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(header)],
    )
    presence = hd.sr.QualitativeEvaluation(
        name=code, value=PRESENT if finding.positive else ABSENT
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=finding.label),
        finding_type=code,
        algorithm_id=algorithm,  # at group level it also covers Present/Absent
        measurements=[probability],
        qualitative_evaluations=[presence],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )


def _summary(text: str) -> hd.sr.ContainerContentItem:
    # TID 1500 rows 12 and 14: the Qualitative Evaluations container, a TEXT in it. highdicom's
    # MeasurementReport has no argument for them (0.28), so the item is added to its root.
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=codes.DCM.Summary, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    return container


def threshold_text(finding: Finding) -> str:
    """The operating point in words: threshold, policy and what to expect of it."""
    text = f"threshold={finding.threshold:.3f}"
    point = finding.operating_point
    if point:
        expected = [f"expected {name} {point[f'expected_{name}']:.2f}" for name in ("sensitivity", "specificity")
                    if point.get(f"expected_{name}") is not None]
        text += f" ({'; '.join([str(point['policy']), *expected])})"
    return text
