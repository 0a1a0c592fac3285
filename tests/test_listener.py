"""The DICOM C-STORE listener (cxr_edge.daemon.dicom_net.start_scp) on loopback, in-process, with
real senders: pynetdicom SCUs and dcmtk's storescu / echoscu. What reaches the inbox, what is
refused at association (called AE title, --allow by title and address) and per instance (invalid
or inconsistent UIDs), a full disk, and the clean-up of the listener's own temp files."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from click.testing import CliRunner
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification
from pynetdicom.status import STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS

from cxr_edge.daemon import dicom_net
from cxr_edge.daemon.dicom_net import (RECEIVING_PREFIX, AllowedCaller, Peer, is_valid_uid, remove_receiving_temp_files,
                                       start_scp)

from .conftest import SAMPLES

pytestmark = pytest.mark.slow

SCP_AE = "CXREDGE"
SAMPLE_FILES = sorted((SAMPLES / "dicom").glob("*.dcm"))
SMALL = SAMPLES / "dicom" / "canine_thorax_dx_mono1_small.dcm"  # explicit VR little endian, 37 kB
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def inbox(tmp_path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def scp():
    """start(inbox, allowed=None, host=...) -> port; every server is shut down after the test."""
    servers = []

    def start(inbox: Path, allowed=None, host: str = "127.0.0.1") -> int:
        port = free_port(host)
        servers.append(start_scp(Peer(SCP_AE, host, port), inbox, allowed))
        return port

    yield start
    for server in servers:
        server.shutdown()


def associate(port: int, calling: str = "MODALITY", called: str = SCP_AE, host: str = "127.0.0.1",
              contexts=((SMALL,))):
    """A pynetdicom association proposing the SOP class and transfer syntax of each file."""
    ae = AE(ae_title=calling)
    for path in contexts:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    return ae.associate(host, port, ae_title=called)


def store(port: int, path: Path, **kwargs) -> int | None:
    """C-STORE the file at PATH as it is on disk: the Affected SOP Class / Instance UIDs come from
    its file meta (Media Storage SOP ...), the data set is sent byte for byte. None: no response."""
    assoc = associate(port, contexts=(path,), **kwargs)
    assert assoc.is_established, "association refused"
    try:
        status = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch):
    # pynetdicom sends a file path chunk by chunk, taking the Affected UIDs from the file meta; so a
    # crafted file meta gives a request whose UIDs differ from its data set's. (Sender side only:
    # the SCP's receiving is governed by STORE_RECV_CHUNKED_DATASET, left alone.)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def craft(tmp_path: Path, source: Path, name: str, *, affected_uid: str | None = None,
          affected_class: str | None = None, **dataset_changes) -> Path:
    """A copy of SOURCE whose file meta (the request's Affected UIDs) and data set are edited."""
    ds = pydicom.dcmread(source)
    for keyword, value in dataset_changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if affected_uid is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = affected_uid
    if affected_class is not None:
        ds.file_meta.MediaStorageSOPClassUID = affected_class
    path = tmp_path / name
    ds.save_as(path)  # as given: the file meta is not rewritten from the data set
    check = pydicom.dcmread(path, stop_before_pixels=True)
    assert (affected_uid is None or check.file_meta.MediaStorageSOPInstanceUID == affected_uid)
    return path


def listing(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def data_set_bytes(path: Path) -> bytes:
    """A DICOM file's bytes after its file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def dcmtk(tool: str) -> str:
    """dcmtk's TOOL: pynetdicom installs Python apps of the same names, which may come first on PATH."""
    candidates = [os.path.join(d, tool) for d in os.environ.get("PATH", "").split(os.pathsep)] + [f"/usr/bin/{tool}"]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" in version.stdout + version.stderr:
                return candidate
    pytest.skip(f"needs dcmtk's `{tool}` (Debian: dcmtk)")


# ---- a valid instance --------------------------------------------------------------------------------------


def test_storescu_instances_land_as_uid_dcm_with_identical_data_sets(scp, inbox):
    port = scp(inbox, [AllowedCaller.parse("MODALITY")])
    storescu = dcmtk("storescu")
    for path in SAMPLE_FILES:  # storescu proposes a compressed transfer syntax only when told which
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        propose = {"1.2.840.10008.1.2.4.91": ["-xw"], "1.2.840.10008.1.2.4.50": ["-xy"]}.get(syntax, [])
        sent = subprocess.run([storescu, "--required", *propose, "-aet", "MODALITY", "-aec", SCP_AE, "127.0.0.1",
                               str(port), str(path)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
    originals = {str(pydicom.dcmread(path).SOPInstanceUID): path for path in SAMPLE_FILES}
    assert sorted(p.name for p in inbox.iterdir()) == sorted(f"{uid}.dcm" for uid in originals)
    for uid, path in originals.items():
        received, original = pydicom.dcmread(inbox / f"{uid}.dcm"), pydicom.dcmread(path)
        assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert received.file_meta.MediaStorageSOPInstanceUID == uid
        # every element; storescu pads an odd-length Pixel Data (the canine sample's) to even length
        pad = len(original.PixelData) % 2
        assert received.PixelData == original.PixelData + b"\x00" * pad
        del received.PixelData, original.PixelData
        assert received == original


def test_the_instance_goes_through_a_temp_name_that_start_up_clean_up_removes(scp, inbox, monkeypatch):
    renames = []
    real_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):
        renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(dicom_net.os, "replace", recording_replace)
    port = scp(inbox)
    assert store(port, SMALL) == 0x0000
    uid = str(pydicom.dcmread(SMALL, stop_before_pixels=True).SOPInstanceUID)
    [(src, dst)] = renames
    assert dst == inbox / f"{uid}.dcm" and src.parent == inbox
    # the random part is tempfile.mkstemp's (cxr_edge.atomic): letters, digits, underscores
    assert re.fullmatch(re.escape(f"{RECEIVING_PREFIX}{uid}.") + r"[a-z0-9_]+\.part", src.name)
    assert listing(inbox).keys() == {f"{uid}.dcm"}
    assert data_set_bytes(dst) == data_set_bytes(SMALL)  # written as received, byte for byte
    src.write_bytes(b"half an instance")  # what a crash between write and rename leaves
    assert remove_receiving_temp_files(inbox) == 1
    assert listing(inbox).keys() == {f"{uid}.dcm"}


def test_an_implicit_vr_data_set_is_read_and_stored_too(scp, inbox):
    original = pydicom.dcmread(SMALL)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(original.SOPClassUID, ImplicitVRLittleEndian)
    port = scp(inbox)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(original)  # a Dataset: pynetdicom encodes it as implicit VR
    finally:
        assoc.release()
    assert int(status.Status) == 0x0000
    received = pydicom.dcmread(inbox / f"{original.SOPInstanceUID}.dcm")
    assert received.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert received.SOPInstanceUID == original.SOPInstanceUID and received.PatientName == original.PatientName


def test_peer_parses_hosts_and_bracketed_ipv6():
    assert Peer.parse("ORTHANC@127.0.0.1:4242") == Peer("ORTHANC", "127.0.0.1", 4242)
    assert Peer.parse("PACS@pacs.example.org:104") == Peer("PACS", "pacs.example.org", 104)
    v6 = Peer.parse("CXREDGE@[::1]:11112")
    assert v6 == Peer("CXREDGE", "::1", 11112) and Peer.parse(str(v6)) == v6
    for bad in ("PACS@::1:104", "PACS@host", "SEVENTEEN_CHARS_X@h:1"):
        with pytest.raises(ValueError):
            Peer.parse(bad)


# ---- UID checks per C-STORE --------------------------------------------------------------------------------


def test_a_data_set_whose_sop_instance_uid_is_not_the_affected_one_is_refused(scp, inbox, tmp_path):
    victim = pydicom.dcmread(SAMPLE_FILES[1], stop_before_pixels=True)
    victim_uid = str(victim.SOPInstanceUID)
    shutil.copyfile(SAMPLE_FILES[1], inbox / f"{victim_uid}.dcm")  # another patient's instance, already here
    before = listing(inbox)
    # the request claims the victim's UID, the data set is another instance (its own UID inside)
    forged = craft(tmp_path, SMALL, "forged.dcm", affected_uid=victim_uid)
    port = scp(inbox)
    assert store(port, forged) == dicom_net.STATUS_DATASET_MISMATCH == 0xA900
    assert listing(inbox) == before
    # the same data set under its own UID is stored: the refusal was about the mismatch alone
    assert store(port, SMALL) == 0x0000
    assert len(listing(inbox)) == 2 and listing(inbox)[f"{victim_uid}.dcm"] == before[f"{victim_uid}.dcm"]


def test_a_data_set_whose_sop_class_is_not_the_affected_one_is_refused(scp, inbox, tmp_path):
    original = pydicom.dcmread(SMALL, stop_before_pixels=True)
    # the request (and the presentation context) say DX, the data set says CT
    forged = craft(tmp_path, SMALL, "ct_inside.dcm", affected_class=str(original.SOPClassUID),
                   SOPClassUID=CT_IMAGE_STORAGE)
    port = scp(inbox)
    assert store(port, forged) == 0xA900
    assert listing(inbox) == {}


def test_a_data_set_without_sop_instance_uid_cannot_be_understood(scp, inbox, tmp_path):
    uid = str(pydicom.dcmread(SMALL, stop_before_pixels=True).SOPInstanceUID)
    forged = craft(tmp_path, SMALL, "no_uid.dcm", affected_uid=uid, SOPInstanceUID=None)
    port = scp(inbox)
    assert store(port, forged) == 0xC000
    assert listing(inbox) == {}


@pytest.mark.parametrize("bad_uid", ["1.2.3/4", "1.2.03", "../x", "1..2", "1.2.3.x"])
def test_an_invalid_affected_sop_instance_uid_is_refused_and_nothing_is_written(scp, inbox, tmp_path, bad_uid):
    # consistent (the data set carries the same bad UID), so the only fault is the UID itself
    forged = craft(tmp_path, SMALL, "bad.dcm", affected_uid=bad_uid, SOPInstanceUID=bad_uid)
    port = scp(inbox)
    assert store(port, forged) == dicom_net.STATUS_INVALID_SOP_INSTANCE == 0x0117
    assert listing(inbox) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dcm", "inbox"]  # ../x.dcm did not land beside


def test_an_affected_sop_instance_uid_longer_than_64_characters_never_lands(scp, inbox, tmp_path, monkeypatch):
    long_uid = "1." + "2" * 64
    forged = craft(tmp_path, SMALL, "long.dcm", affected_uid=long_uid, SOPInstanceUID=long_uid)
    # pynetdicom's SCU refuses to build such a request; let it, on this (the sender's) thread only
    validate_ui, sender = _config.VALIDATORS["UI"], threading.current_thread()
    monkeypatch.setitem(_config.VALIDATORS, "UI",
                        lambda value: (True, "") if threading.current_thread() is sender else validate_ui(value))
    port = scp(inbox)
    status = store(port, forged)
    # pynetdicom's SCP cannot even decode the command (it aborts the association); were it to let
    # the request through, the listener would answer 0x0117
    assert status in (None, 0x0117)
    assert listing(inbox) == {}


def test_uid_validity_is_strict():
    for good in ["1.2.3", "0.1", "1.0.2", "1." + "2" * 62, "2.25.329800735698586629295641978511506172918"]:
        assert is_valid_uid(good), good
    for bad in ["", "1.2.3/4", "1.2.03", "../x", "1." + "2" * 63, " 1.2", "1.2 ", "1.2\n", "1.2\0", ".1", "1.", "1..2",
                "1.2.x", None, 1.2]:
        assert not is_valid_uid(bad), bad


# ---- association: called AE title, --allow -----------------------------------------------------------------


def test_a_caller_using_another_called_ae_title_is_rejected(scp, inbox):
    port = scp(inbox)
    echoscu = dcmtk("echoscu")
    right = subprocess.run([echoscu, "-aet", "MODALITY", "-aec", SCP_AE, "127.0.0.1", str(port)],
                           capture_output=True, text=True, timeout=60)
    wrong = subprocess.run([echoscu, "-aet", "MODALITY", "-aec", "SOMEONE_ELSE", "127.0.0.1", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert right.returncode == 0, right.stderr
    assert wrong.returncode != 0
    assoc = associate(port, called="SOMEONE_ELSE")
    assert assoc.is_rejected and not assoc.is_established
    assert assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised


@pytest.mark.parametrize("text, title, network", [
    ("PACS", "PACS", None),
    ("  PACS  ", "PACS", None),
    ("PACS@10.1.2.3", "PACS", "10.1.2.3/32"),
    ("MODALITY@10.1.0.0/16", "MODALITY", "10.1.0.0/16"),
    ("X@::1", "X", "::1/128"),
    ("X@[::1]", "X", "::1/128"),
    ("X@fd00::/8", "X", "fd00::/8"),
    ("AE WITH SPACE@0.0.0.0/0", "AE WITH SPACE", "0.0.0.0/0"),
])
def test_allow_parses_title_address_and_network(text, title, network):
    rule = AllowedCaller.parse(text)
    assert rule.ae_title == title
    assert rule.network == (ipaddress.ip_network(network) if network else None)
    assert AllowedCaller.parse(str(rule)) == rule


@pytest.mark.parametrize("text, complaint", [
    ("", "AE title"),
    ("@10.0.0.1", "AE title"),
    ("SEVENTEEN_CHARS_X", "AE title"),
    ("A\\B", "AE title"),
    ("A\tB", "AE title"),
    ("PACS@", "not an IP address"),
    ("PACS@pacs.example.org", "host names are not resolved"),
    ("PACS@10.1.2.3/16", "did you mean PACS@10.1.0.0/16"),
    ("PACS@10.0.0.0/33", "not an IP address"),
    ("PACS@10.0.0.1@x", "not an IP address"),
])
def test_allow_refuses_malformed_forms_with_a_clear_message(text, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        AllowedCaller.parse(text)


def test_allow_permits_by_title_and_address():
    texts = ("PACS", "PACS@10.1.2.3", "MOD@10.1.0.0/16", "X@fd00::/8")
    anywhere, one, net, v6 = (AllowedCaller.parse(text) for text in texts)
    assert anywhere.permits("PACS", "192.0.2.7") and anywhere.permits("PACS", "::1")
    assert not anywhere.permits("PACS2", "192.0.2.7") and not anywhere.permits("pacs", "192.0.2.7")
    assert one.permits("PACS", "10.1.2.3") and not one.permits("PACS", "10.1.2.4")
    assert net.permits("MOD", "10.1.255.1") and not net.permits("MOD", "10.2.0.1")
    assert not net.permits("PACS", "10.1.0.1")
    assert net.permits("MOD", "::ffff:10.1.0.9")  # an IPv4 caller on a dual-stack socket
    assert v6.permits("X", "fd12::1") and not v6.permits("X", "fe80::1") and not v6.permits("X", "10.0.0.1")
    assert not one.permits("PACS", "not-an-address")


def test_allow_by_address_is_enforced_at_association(scp, inbox):
    port = scp(inbox, [AllowedCaller.parse("MODALITY@127.0.0.1"), AllowedCaller.parse("PACS"),
                       AllowedCaller.parse("REMOTE@10.0.0.0/8")])
    assert store(port, SMALL) == 0x0000  # MODALITY from loopback
    assert store(port, SMALL, calling="PACS") == 0x0000  # a bare title: from anywhere
    remote = associate(port, calling="REMOTE")  # its title is listed, but not from 127.0.0.1
    assert remote.is_rejected and not remote.is_established
    assert (remote.acceptor.primitive.result, remote.acceptor.primitive.diagnostic) == (0x01, 0x01)
    stranger = associate(port, calling="STRANGER")
    assert stranger.is_rejected and stranger.acceptor.primitive.diagnostic == 0x03  # calling AE not recognised
    assert len(listing(inbox)) == 1


def test_allow_with_only_a_network_rejects_a_caller_from_elsewhere(scp, inbox):
    port = scp(inbox, [AllowedCaller.parse("MODALITY@10.0.0.0/8")])
    assoc = associate(port)
    assert assoc.is_rejected and not assoc.is_established
    sent = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", SCP_AE, "127.0.0.1", str(port), str(SMALL)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode != 0
    assert listing(inbox) == {}


def test_allow_with_bare_titles_keeps_the_title_check(scp, inbox):
    port = scp(inbox, ["MODALITY"])  # strings are parsed too (a caller passing --allow texts)
    assert store(port, SMALL) == 0x0000
    other = associate(port, calling="OTHER")
    assert other.is_rejected and other.acceptor.primitive.diagnostic == 0x03
    assert len(listing(inbox)) == 1


def test_no_allow_lets_any_caller_in_and_says_so(scp, inbox, caplog):
    caplog.set_level(logging.WARNING, logger="cxr_edge.daemon.dicom_net")
    port = scp(inbox, [])
    assert store(port, SMALL, calling="ANYONE") == 0x0000
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("accepting any calling AE title" in message for message in warnings)


def test_allow_by_ipv6_address_and_network(scp, inbox):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    port = scp(inbox, [AllowedCaller.parse("MODALITY@::1"), AllowedCaller.parse("OTHER@fd00::/8")], host="::1")
    assert store(port, SMALL, host="::1") == 0x0000
    assoc = associate(port, calling="OTHER", host="::1")
    assert assoc.is_rejected and not assoc.is_established
    assert len(listing(inbox)) == 1


def test_cli_reports_a_bad_allow_as_a_usage_error(tmp_path, monkeypatch):
    from cxr_edge import cli
    from cxr_edge.daemon import service

    captured = {}

    class FakeDaemon:
        def __init__(self, cfg):
            captured["cfg"] = cfg

        def run(self):
            return 0

    monkeypatch.setattr(service, "Daemon", FakeDaemon)
    base = ["watch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--listen", f"{SCP_AE}@127.0.0.1:11112"]
    bad = CliRunner().invoke(cli.main, [*base, "--allow", "PACS", "--allow", "MOD@pacs.example.org"])
    assert bad.exit_code == 2 and "cfg" not in captured
    assert "Error: --allow" in bad.output and "host names are not resolved" in bad.output
    good = CliRunner().invoke(cli.main, [*base, "--allow", "PACS", "--allow", "MOD@10.1.0.0/16"])
    assert good.exit_code == 0, good.output
    assert captured["cfg"].allowed_callers == [AllowedCaller("PACS"),
                                               AllowedCaller("MOD", ipaddress.ip_network("10.1.0.0/16"))]


# ---- status codes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, code, description", [
    ("STATUS_INVALID_SOP_INSTANCE", 0x0117, "Invalid Object Instance"),
    ("STATUS_OUT_OF_RESOURCES", 0xA700, "Refused: Out of Resources"),
    ("STATUS_DATASET_MISMATCH", 0xA900, "Data Set Does Not Match SOP Class"),
    ("STATUS_CANNOT_UNDERSTAND", 0xC000, "Cannot Understand"),
])
def test_the_failure_codes_pynetdicom_does_not_name_are_the_ones_its_storage_table_lists(name, code, description):
    assert getattr(dicom_net, name) == code
    assert STORAGE_SERVICE_CLASS_STATUS[code] == (STATUS_FAILURE, description)


@pytest.fixture
def sr_file(tmp_path) -> Path:
    """A minimal Comprehensive SR instance, enough for a C-STORE."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import ComprehensiveSRStorage

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = ComprehensiveSRStorage, generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_send_sr_takes_success_and_the_storage_warnings_as_stored(sr_file):
    """The PACS's answer decides: Success and the Storage Service's warnings (B000, B006, B007)
    mean stored; any failure, or a general warning, is retried with its code in the reason."""
    from pynetdicom import evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    answers = []  # the status the PACS gives to the next C-STORE
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: answers.pop())])
    try:
        peer = Peer("PACS", "127.0.0.1", server.server_address[1])
        outcomes = {}
        for code in (0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0xA700, 0xA900, 0xC000, 0x0117):
            answers.append(code)
            outcomes[code] = dicom_net.send_sr(sr_file, peer, "CXREDGE")
        assert answers == []  # each send reached the PACS
    finally:
        server.shutdown()
    assert {code for code, problem in outcomes.items() if problem is None} == {0x0000, 0xB000, 0xB006, 0xB007}
    assert outcomes[0xA700] == "C-STORE status 0xA700" and outcomes[0x0107] == "C-STORE status 0x0107"


def test_a_pacs_without_secondary_capture_gets_the_sr_and_says_what_it_refused(sr_file, tmp_path):
    """The SR and a heatmap go in one association; a PACS that takes SRs only gets the SR once,
    and the send names the SOP class it refused instead of retrying the set for ever."""
    import numpy as np
    from pynetdicom import evt
    from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    from cxr_edge.heatmap_dicom import SCSource, build_heatmap_sc
    from cxr_edge.sr import ModelIdentity

    source = pydicom.dcmread(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", stop_before_pixels=True)
    capture = tmp_path / "x.heatmap.mass.dcm"
    build_heatmap_sc(SCSource.of(source), np.zeros((8, 8, 3), np.uint8), "Mass", 0.5, ModelIdentity("m", "1", "0" * 64),
                     "1.2.3.4", "1.2.3.5", 1).save_as(capture, enforce_file_format=True)
    stored = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: stored.append(e.request.AffectedSOPClassUID) or 0)])
    try:
        peer = Peer("PACS", "127.0.0.1", server.server_address[1])
        problem, refused = dicom_net.send_objects([sr_file, capture], peer, "CXREDGE")
        only_capture = dicom_net.send_objects([capture], peer, "CXREDGE")
    finally:
        server.shutdown()
    assert problem is None and refused == [SecondaryCaptureImageStorage] and stored == [ComprehensiveSRStorage]
    assert only_capture[0] is not None  # nothing it takes: not sent (pynetdicom rejects such an association)


# ---- resources, clean-up, logs -----------------------------------------------------------------------------


def test_a_full_disk_answers_out_of_resources_and_leaves_no_temp_file(scp, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs as the inbox")
    inbox = tmp_path / "tiny"
    inbox.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(inbox)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        assert SMALL.stat().st_size > 32 * 1024  # does not fit
        port = scp(inbox)
        assert store(port, SMALL) == dicom_net.STATUS_OUT_OF_RESOURCES == 0xA700
        assert os.listdir(inbox) == []
    finally:
        subprocess.run(["umount", str(inbox)], check=True, timeout=30)


def test_remove_receiving_temp_files_removes_only_its_own(tmp_path, inbox):
    ours = [inbox / f"{RECEIVING_PREFIX}1.2.3.0123456789abcdef.part",
            inbox / f"{RECEIVING_PREFIX}1.2.4.fedcba9876543210.part"]
    for path in ours:
        path.write_bytes(b"partial")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"not in the inbox")
    survivors = {
        "1.2.3.dcm": b"a received instance",
        ".other-writer.part": b"someone else's temp file",
        "upload.dcm.part": b"a drop-folder writer",
        f"{RECEIVING_PREFIX}1.2.5.tmp": b"our prefix, not our suffix",
        f"x{RECEIVING_PREFIX}1.2.6.part": b"our name inside another",
    }
    for name, data in survivors.items():
        (inbox / name).write_bytes(data)
    link = inbox / f"{RECEIVING_PREFIX}link.0000000000000000.part"
    link.symlink_to(outside)
    folder = inbox / f"{RECEIVING_PREFIX}folder.0000000000000000.part"
    folder.mkdir()
    nested = inbox / "sub"
    nested.mkdir()
    (nested / ours[0].name).write_bytes(b"below the top level")

    assert remove_receiving_temp_files(inbox) == 2
    assert not any(path.exists() for path in ours)
    for name, data in survivors.items():
        assert (inbox / name).read_bytes() == data
    assert link.is_symlink() and outside.read_bytes() == b"not in the inbox"
    assert folder.is_dir() and (nested / ours[0].name).exists()
    assert remove_receiving_temp_files(inbox) == 0
    assert remove_receiving_temp_files(tmp_path / "no-such-inbox") == 0


def test_no_patient_attribute_reaches_any_log_even_at_debug(scp, inbox, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # everything: cxr-edge, pynetdicom, pydicom
    # an invalid UI value: pydicom quotes it in a warning if anything converts it on reading
    canary = craft(tmp_path, SMALL, "canary.dcm", PatientName="Canary^Leaky", PatientID="CANARY-4711",
                   PatientBirthDate="19010101", SeriesInstanceUID="1.2.CANARY")
    uid = str(pydicom.dcmread(canary, stop_before_pixels=True).SOPInstanceUID)
    mismatched = craft(tmp_path, canary, "canary_forged.dcm", affected_uid="1.2.3.4")
    caplog.clear()  # crafting them warned here, in the test; from now on only the sends count
    port = scp(inbox)
    assert store(port, canary) == 0x0000
    assert store(port, mismatched) == 0xA900
    assert listing(inbox).keys() == {f"{uid}.dcm"}
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "Received Store Request" in messages  # pynetdicom's own records were captured
    assert "canary" not in messages.lower() and "19010101" not in messages
    refusals = [r.getMessage() for r in caplog.records if r.name == dicom_net.log.name and "refused" in r.getMessage()]
    assert refusals and all("1.2.3.4" not in m and uid not in m for m in refusals)
