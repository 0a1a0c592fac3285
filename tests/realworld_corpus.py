"""DICOM files as hospitals, old archives and foreign sites really write them, derived from the
real chest images in samples/ (RSNA CR, canine DX) with pydicom and dcmtk.

Each entry says what cxr-edge must do with it: findings and an SR ("ok"), findings without an SR
("no_sr", with a phrase of the reason), or a refusal ("error", stage, phrase). The classes follow
the real-world DICOM issue: character sets, malformed patient/study values, invalid UIDs, raw
datasets, big endian / deflated / 12-bit JPEG, Presentation LUT, non-finite LUT / window / rescale
values, blank and constant images, tiny images, other modalities, objects without pixels, and a
JPEG frame larger than its header says.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from . import corpus
from .conftest import SAMPLES

RSNA = SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm"  # CR, JPEG baseline, 1024x1024
CANINE = SAMPLES / "dicom" / "canine_thorax_dx_mono1_small.dcm"  # DX, explicit LE, 169x211

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"  # PS3.5 H.3.1
KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"  # PS3.5 I.2


def _new_uids(ds) -> None:
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _edited(src: Path, path: Path, **values) -> Path:
    """A copy of `src` with new UIDs and `values` set (pydicom encodes text in the dataset's
    Specific Character Set on write); invalid values are written as they are."""
    import pydicom.config

    ds = corpus.read(src)
    _new_uids(ds)
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for keyword, value in values.items():
            if value is None:
                del ds[keyword]
            else:
                setattr(ds, keyword, value)
        return corpus.save(ds, path)
    finally:
        pydicom.config.settings.writing_validation_mode = old


def _small_canine(path: Path, pixels: np.ndarray, **elements) -> Path:
    from pydicom.uid import generate_uid

    ds = corpus.dx_dataset(CANINE, pixels, **elements)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return corpus.save(ds, path)


def _raw_implicit(path: Path) -> Path:
    """No preamble, no file meta, implicit VR little endian: how old systems write datasets."""
    import pydicom

    ds = corpus.read(CANINE)
    _new_uids(ds)
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def _acr_nema_ct(path: Path) -> Path:
    """A CT slice as an ACR-NEMA-style raw dataset: no preamble, no meta, no SOP Class UID."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPClassUID
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def _dcmconv(option: str, path: Path) -> Path:
    subprocess.run(["dcmconv", option, str(CANINE), str(path)], check=True, capture_output=True)
    return path


def _jpeg_12bit(path: Path, work: Path) -> Path:
    """The RSNA CR at 12 bits, 256x192, compressed by dcmtk as JPEG Extended (Process 2/4)."""
    source = _small_canine(work / "u12.dcm", corpus.real_12bit(RSNA, (256, 192)), bits_stored=12,
                           Modality="CR")
    subprocess.run(["dcmcjpeg", "+ee", str(source), str(path)], check=True, capture_output=True)
    return path


def _pydicom_jpeg_lossy(path: Path) -> Path:
    """pydicom's JPEG-lossy.dcm (a real 12-bit JPEG Extended stream that libjpeg refuses and
    GDCM / dcmtk decode), relabelled CR so that it reaches the decoder."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    ds.Modality = "CR"
    ds.WindowCenter, ds.WindowWidth = 132, 264  # its values span 0-264 of 12 bits
    ds.save_as(path, enforce_file_format=True)
    return path


def _frames_not_a_number(path: Path) -> Path:
    """Number of Frames "ab" (IS must be digits): pydicom will not write that, so patch the bytes."""
    _edited(CANINE, path, NumberOfFrames="9")
    at = corpus.element_offset(path, "NumberOfFrames") + 8  # tag, VR, length: explicit VR little endian
    data = bytearray(path.read_bytes())
    assert data[at: at + 2] == b"9 "
    data[at: at + 2] = b"ab"
    path.write_bytes(bytes(data))
    return path


def _pdf(path: Path) -> Path:
    return corpus.minimal_dicom(path, "1.2.840.10008.5.1.4.1.1.104.1", "DOC",  # Encapsulated PDF
                                MIMETypeOfEncapsulatedDocument="application/pdf",
                                EncapsulatedDocument=b"%PDF-1.4\n%%EOF\n")


def _lying_jpeg(path: Path) -> Path:
    """The RSNA JPEG whose SOF marker claims 40000x40000 while Rows/Columns stay 1024."""
    data = bytearray(RSNA.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = (40000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))
    return path


def _reencapsulated(path: Path, edit) -> Path:
    """The RSNA CR with its one JPEG frame replaced by edit(frame)."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = corpus.read(RSNA)
    _new_uids(ds)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([edit(bytes(frame))])
    return corpus.save(ds, path)


def _sof_precision(frame: bytes, bits: int) -> bytes:
    at = frame.find(b"\xff\xc0") + 4  # marker, length, then P
    return frame[:at] + bytes([bits]) + frame[at + 1:]


def _modality_lut_short(path: Path) -> Path:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(10))
    item["LUTData"].VR = "US"
    return _edited(CANINE, path, ModalityLUTSequence=[item], RescaleSlope=None, RescaleIntercept=None)


def _fifo(path: Path) -> Path:
    import os

    os.mkfifo(path)
    return path


def _dev_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def _voi_lut_empty(path: Path) -> Path:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = b""
    item["LUTData"].VR = "OW"
    return _edited(CANINE, path, VOILUTSequence=[item], WindowCenter=None, WindowWidth=None)


def build(folder: Path) -> dict[str, tuple]:
    """Write every case into `folder`; returns file name -> expectation."""
    folder.mkdir(parents=True, exist_ok=True)
    work = folder.parent / (folder.name + "-work")
    work.mkdir(exist_ok=True)
    f = folder.joinpath
    canine = corpus.read(CANINE).pixel_array
    cases = {
        # character sets: findings and an SR whose names read back unchanged
        "charset_ir87.dcm": (lambda p: _edited(RSNA, p, SpecificCharacterSet=["", "ISO 2022 IR 87"],
                                                PatientName=JAPANESE), ("ok",)),
        "charset_ir149.dcm": (lambda p: _edited(RSNA, p, SpecificCharacterSet=["", "ISO 2022 IR 149"],
                                                 PatientName=KOREAN), ("ok",)),
        "charset_2022_ir100_single.dcm": (lambda p: _edited(RSNA, p, SpecificCharacterSet="ISO 2022 IR 100",
                                                             PatientName="Müller^Jürgen"), ("ok",)),
        "charset_gb18030.dcm": (lambda p: _edited(RSNA, p, SpecificCharacterSet="GB18030",
                                                   PatientName="Wang^XiaoDong=王^小東"), ("ok",)),
        "charset_utf8.dcm": (lambda p: _edited(RSNA, p, SpecificCharacterSet="ISO_IR 192",
                                                PatientName="Gómez^José=ゴメス"), ("ok",)),
        # malformed patient / study values, as old archives write them: findings and an SR
        "birthdate_dashes.dcm": (lambda p: _edited(RSNA, p, PatientBirthDate="1965-03-02"), ("ok",)),
        "malformed_values.dcm": (lambda p: _edited(RSNA, p, PatientSex="male", StudyDate="03/02/2024",
                                                    StudyTime="12:30", PatientAge="62",
                                                    PatientName="X" * 100), ("ok",)),
        # a source whose own UID is invalid: findings, no SR (it could not reference its source)
        "invalid_sop_uid.dcm": (lambda p: _edited(RSNA, p, SOPInstanceUID="1.2.03.abc"),
                                ("no_sr", "SOP Instance UID")),
        # encodings old and rare
        "raw_implicit_no_meta": (_raw_implicit, ("ok",)),
        "big_endian.dcm": (lambda p: _dcmconv("+tb", p), ("ok",)),
        "deflated.dcm": (lambda p: _dcmconv("+td", p), ("ok",)),
        "jpeg_extended_12bit.dcm": (lambda p: _jpeg_12bit(p, work), ("ok",)),
        "jpeg_lossy_12bit_gdcm.dcm": (_pydicom_jpeg_lossy, ("ok",)),
        "mono2_presentation_inverse.dcm": (lambda p: _edited(CANINE, p, PhotometricInterpretation="MONOCHROME2",
                                                              PresentationLUTShape="INVERSE"), ("ok",)),
        # values that would make NaN / inf / no image: refused, naming the attribute
        "voi_lut_empty.dcm": (_voi_lut_empty, ("error", "decode", "has no LUT Data")),
        "window_width_zero.dcm": (lambda p: _edited(CANINE, p, WindowWidth="0"),
                                  ("error", "decode", "Window Width (0028,1051) must be")),
        "window_width_negative.dcm": (lambda p: _edited(CANINE, p, WindowWidth="-400"),
                                      ("error", "decode", "Window Width (0028,1051) must be")),
        "window_center_nan.dcm": (lambda p: _edited(CANINE, p, WindowCenter="NaN"),
                                  ("error", "decode", "Window Center (0028,1050) is not a finite number")),
        "window_width_inf.dcm": (lambda p: _edited(CANINE, p, WindowWidth="inf"),
                                 ("error", "decode", "Window Width (0028,1051) is not a finite number")),
        "rescale_slope_nan.dcm": (lambda p: _edited(CANINE, p, RescaleSlope="NaN", RescaleIntercept="0"),
                                  ("error", "decode", "Rescale Slope (0028,1053) is not a finite number")),
        "rescale_slope_zero.dcm": (lambda p: _edited(CANINE, p, RescaleSlope="0", RescaleIntercept="0"),
                                   ("error", "decode", "Rescale Slope (0028,1053) is zero")),
        "blank_1bit.dcm": (lambda p: _small_canine(p, np.zeros((212, 256), np.uint8), bits_stored=1,
                                                   BitsAllocated=1, HighBit=0,
                                                   PixelData=np.packbits(np.zeros(212 * 256, np.uint8)).tobytes()),
                           ("error", "decode", "no image content")),
        "constant_16bit.dcm": (lambda p: _small_canine(p, np.full(canine.shape, 1000, np.uint16), bits_stored=12),
                               ("error", "decode", "no image content")),
        "tiny_16x16.dcm": (lambda p: _small_canine(p, canine[:16, :16].copy()),
                           ("error", "decode", "below the minimum of 128 pixels a side")),
        "frames_not_a_number.dcm": (_frames_not_a_number,
                                    ("error", "decode", "Number of Frames (0028,0008) is not a valid integer")),
        # not chest radiographs, named as what they are
        "xa.dcm": (lambda p: _edited(CANINE, p, Modality="XA"),
                   ("error", "decode", "modality XA is not accepted for chest analysis (accepted: CR, DX, RG)")),
        "rf.dcm": (lambda p: _edited(CANINE, p, Modality="RF"), ("error", "decode", "modality RF is not accepted")),
        "acr_nema_ct": (_acr_nema_ct, ("error", "decode", "modality CT is not accepted")),
        "report.pdf.dcm": (_pdf, ("error", "decode", "no pixel data: the object is Encapsulated PDF Storage")),
        # a header that under-states the JPEG frame: refused before any decoder allocates it
        "lying_jpeg_frame.dcm": (_lying_jpeg, ("error", "decode", "40000x40000")),
        # found by the adversarial pass: each refused by name, none analysed as garbage
        "jpeg_frame_cut_short.dcm": (lambda p: _reencapsulated(p, lambda f: f[: len(f) // 2]),
                                     ("error", "decode", "does not end with its end-of-image marker")),
        "jpeg_precision_lie.dcm": (lambda p: _reencapsulated(p, lambda f: _sof_precision(f, 16)),
                                   ("error", "decode", "has 16-bit samples (SOF marker) but Bits Allocated is 8")),
        "bits_stored_above_allocated.dcm": (lambda p: _edited(CANINE, p, BitsStored=16),
                                            ("error", "decode", "Bits Stored (0028,0101) must be between 1 and")),
        "pixel_representation_2.dcm": (lambda p: _edited(CANINE, p, PixelRepresentation=2),
                                       ("error", "decode", "Pixel Representation (0028,0103) must be 0")),
        "photometric_lowercase.dcm": (lambda p: _edited(CANINE, p, PhotometricInterpretation="monochrome2"),
                                      ("error", "decode", "Photometric Interpretation (0028,0004) is not a defined term")),
        "modality_lut_short.dcm": (_modality_lut_short, ("error", "decode", "has fewer entries than its LUT Descriptor")),
        "rescale_intercept_huge.dcm": (lambda p: _edited(CANINE, p, RescaleSlope="1", RescaleIntercept="-1e300"),
                                       ("error", "decode", "Rescale Intercept (0028,1052) is out of range")),
        "fifo.dcm": (_fifo, ("error", "decode", "not a regular file")),
        "dev_zero.dcm": (_dev_zero, ("error", "decode", "not a regular file")),
    }
    expected = {}
    for name, (make, expectation) in cases.items():
        make(f(name))
        expected[name] = expectation
    shutil.rmtree(work)
    return expected
