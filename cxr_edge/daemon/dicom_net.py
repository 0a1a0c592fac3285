"""DICOM networking with pynetdicom: a C-STORE SCP that drops received instances into the inbox
atomically, and a C-STORE SCU that sends SRs back to the PACS (queued and retried via the journal)."""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..outputs import sanitize_component

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Peer":
        """AE@host:port, e.g. ORTHANC@127.0.0.1:4242."""
        match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text.strip())
        if not match:
            raise ValueError(f"{text!r}: expected AE_TITLE@host:port (AE title at most 16 characters)")
        return cls(match.group(1), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def start_scp(listen: Peer, inbox: Path, allowed_callers: list[str] | None, on_received=None):
    """A Storage SCP writing each instance to INBOX/<SOPInstanceUID>.dcm via a temp name + rename."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    inbox.mkdir(parents=True, exist_ok=True)

    def handle_store(event):
        try:
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            name = sanitize_component(sop_uid) + ".dcm"
            tmp = inbox / f".{name}.{threading.get_ident()}.part"
            with open(tmp, "wb") as f:
                f.write(event.encoded_dataset())  # preamble + file meta + the dataset as received
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, inbox / name)
            log.info("received %s from %s", sop_uid, event.assoc.requestor.ae_title)
            if on_received:
                on_received()
            return 0x0000
        except OSError as exc:  # a full disk: tell the sender, who will retry
            log.error("cannot store a received instance: %s", exc.strerror or exc)
            return 0xA700

    ae = AE(ae_title=listen.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2",
                                                          *_compressed_syntaxes()])
    ae.add_supported_context(Verification)
    if allowed_callers:
        ae.require_calling_aet = allowed_callers  # others are rejected at association
    server = ae.start_server((listen.host, listen.port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    log.info("DICOM SCP %s listening (calling AEs allowed: %s)", listen, ", ".join(allowed_callers or ["any"]))
    return server


def _compressed_syntaxes() -> list[str]:
    return ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"]


def send_sr(path: Path, peer: Peer, calling_ae: str) -> str | None:
    """C-STORE one SR; None when the PACS accepted it, else why not."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import ComprehensiveSRStorage

    dataset = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ComprehensiveSRStorage, [str(dataset.file_meta.TransferSyntaxUID)])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return f"association with {peer} rejected or failed"
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    if status and int(status.Status) in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or success with warnings
        return None
    return f"C-STORE status 0x{int(status.Status):04X}" if status else "no C-STORE response"
