"""DICOM Structured Report (TID 1500 Measurement Report) for one chest radiograph.

One measurement group (TID 1501) per finding: the calibrated probability as a NUM
(DCM 122157 "Probability", UCUM "1") and Present/Absent as a qualitative evaluation.
Of the source image only the identifiers and the Patient / General Study attributes that the
SR IOD requires are carried over, each value validated first (cxr_edge.sr_source). Only the
header is needed: read the source with ``stop_before_pixels=True``.

Two builders make the same document. :func:`build_sr_reference` builds it with highdicom's
generic constructors (cxr_edge.sr_highdicom), which refuse invalid content but take ~0.5 s.
:func:`build_sr`, the one the pipeline uses, fills in a template of that very document
(cxr_edge.sr_template) in a few milliseconds; where the template cannot stand for highdicom's
document (a model identity that is not ASCII, a probability that is not a float) it builds the
reference instead. tests/test_sr.py compares the two item by item.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cxr_edge.findings import Finding
from cxr_edge.sr_codes import (  # noqa: F401 - re-exported: the SR's vocabulary
    ABSENT, FINDING_CODES, MANUFACTURER, PRESENT, PROCEDURE_REPORTED, SERIES_DESCRIPTION,
    SERIES_NUMBER,
)  # fmt: skip
from cxr_edge.sr_source import SRSourceError, describe, validated_source_header

log = logging.getLogger(__name__)

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
    now: datetime.datetime | None = None,
) -> pydicom.Dataset:
    """Comprehensive SR in the source's study, in a new series, UNVERIFIED: the document
    :func:`build_sr_reference` builds, from a template (milliseconds instead of ~0.5 s).

    `now` (default: the current time) stamps the creation and content dates and times.
    Raises ValueError for findings without a code, SRSourceError for a source no SR can be
    built from (an invalid UID) or content highdicom refuses; no message quotes a header value.
    """
    return _build(source, findings, model, series_instance_uid, sop_instance_uid, now, fast=True)


def build_sr_reference(
    source: pydicom.Dataset,
    findings: Sequence[Finding],
    model: ModelIdentity,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """The same SR built by highdicom's generic constructors (its own clock stamps the dates
    and times). Same errors as :func:`build_sr`."""
    return _build(source, findings, model, series_instance_uid, sop_instance_uid, None, fast=False)


def tracking_uid(sop_instance_uid: str, label: str) -> str:
    """A finding's Tracking Unique Identifier, derived from the SR's SOP Instance UID: an SR
    made again (same instance UID) tracks its findings under the same UIDs."""
    return generate_uid(entropy_srcs=[sop_instance_uid, label, "tracking"])


def _build(source, findings, model, series_instance_uid, sop_instance_uid, now, *, fast):
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
    series_instance_uid = series_instance_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    uids = {"series_instance_uid": series_instance_uid, "sop_instance_uid": sop_instance_uid,
            "tracking_uids": [tracking_uid(sop_instance_uid, label) for label in labels]}
    # highdicom's exceptions and warnings quote the values they refuse (a Patient's Name, a
    # date): neither may escape. Warnings are recorded and logged by category only;
    # exceptions become an SRSourceError naming the type. Not chained (`from None`): a
    # process pool would format the cause's message into the traceback it sends back.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if fast and _template_applies(findings, model):
                sr = _from_template(header, findings, model, uids, now)
            else:
                from cxr_edge.sr_highdicom import highdicom_sr

                sr = highdicom_sr(header, findings, model, **uids)
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


def _template_applies(findings: Sequence[Finding], model: ModelIdentity) -> bool:
    # The template's text is encoded once, in the default repertoire, and its NUMs hold a float
    # (highdicom writes no Floating Point Value for an int, refuses other types): anything else
    # is left to highdicom.
    identity = (model.name, model.version, model.sha256)
    return (bool(findings) and all(isinstance(s, str) and s.isascii() for s in identity)
            and all(type(f.probability) is float for f in findings))


def _from_template(header, findings, model, uids, now) -> pydicom.Dataset:
    from highdicom.sr.content import _check_valid_source_image_dataset

    from cxr_edge.sr_template import fill, template_for

    # The refusal highdicom's SourceImageFor*.from_source_image makes (not an image: an SR, a
    # KO, ... as the source); the template itself was built from an image.
    _check_valid_source_image_dataset(header)
    return fill(template_for(model, [f.label for f in findings]), header, findings,
                now=now or datetime.datetime.now(), **uids)


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
