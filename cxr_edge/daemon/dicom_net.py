"""DICOM networking with pynetdicom: a C-STORE SCP that drops received instances into the inbox
atomically, and a C-STORE SCU that sends SRs back to the PACS (queued and retried via the journal).

The SCP checks, before anything reaches the disk:

- at association: the called AE title is ours, and the caller is on the allow-list (`--allow`:
  calling AE title, optionally from an IP address or network); others get an A-ASSOCIATE-RJ;
- per C-STORE: the Affected SOP Instance UID is a valid DICOM UID (so `<uid>.dcm` is a safe name
  without any rewriting), and the data set's own SOP Class / SOP Instance UIDs are the request's.

Log lines about refused callers and instances name the check, the calling AE title and the peer
address, never a header value or UID the sender supplied (patient data rule).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (JPEG2000, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom.status import GENERAL_STATUS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, Status

from ..atomic import atomic_write

log = logging.getLogger(__name__)

# Each received instance is written to INBOX/.cxr-edge-receiving.<uid>.<random>.part, fsynced, then
# renamed to INBOX/<uid>.dcm. The leading dot and the .part suffix keep the watcher off it; the
# distinctive prefix lets start-up clean-up remove our leftovers and nothing else.
RECEIVING_PREFIX = ".cxr-edge-receiving."
RECEIVING_SUFFIX = ".part"

# C-STORE response statuses (PS3.4 B.2.3 Table B.2-1 and PS3.7 Annex C). pynetdicom names only
# Success (Status.SUCCESS); the failure codes below are in its STORAGE_SERVICE_CLASS_STATUS table
# by description only, so they are spelled here (tests/test_listener.py checks each against that
# table). The choice follows dcmtk's storescp where it has one.
STATUS_SUCCESS = Status.SUCCESS
# PS3.7 C.5.12 "Invalid SOP Instance": the Affected SOP Instance UID violates the UID construction
# rules. A failure the sender must not retry (the same bad UID would be refused again).
STATUS_INVALID_SOP_INSTANCE = 0x0117
# PS3.4 "Refused: Out of Resources" (A7xx): a full disk or an I/O error here. Senders treat it as
# transient and retry later, which is what we want: nothing was stored.
STATUS_OUT_OF_RESOURCES = 0xA700
# PS3.4 "Error: Data Set does not match SOP Class" (A9xx): the data set's SOP Class UID or SOP
# Instance UID is not the one in the request's command. dcmtk's storescp answers both mismatches
# with A900 too. Storing such an instance under the request's UID could overwrite another
# instance (another patient's) in the inbox, so it is refused.
STATUS_DATASET_MISMATCH = 0xA900
# PS3.4 "Error: Cannot understand" (Cxxx): the data set cannot be parsed up to its SOP UIDs, or has
# none (dcmtk's storescp: "bad DICOM file" -> C000). pynetdicom uses C2xx for its own faults.
STATUS_CANNOT_UNDERSTAND = 0xC000

# PS3.5 9.1: components of digits without leading zeros (a lone 0 is fine), separated by single
# dots, at most 64 characters. Checked on the value exactly as decoded: pydicom's UID.is_valid
# strips surrounding whitespace first and its `$` also accepts a trailing newline, and
# cxr_edge.dicom_header.valid_uid strips NULs and spaces; this one takes nothing off.
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(value) -> bool:
    """True if VALUE is a str that is a valid DICOM UID as it stands (and so a safe file name)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Peer":
        """AE@host:port, e.g. ORTHANC@127.0.0.1:4242 (an IPv6 address in brackets: AE@[::1]:4242)."""
        match = re.fullmatch(r"([^@]{1,16})@(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})", text.strip())
        if not match:
            raise ValueError(f"{text!r}: expected AE_TITLE@host:port (AE title at most 16 characters)")
        return cls(match.group(1), match.group(2) or match.group(3), int(match.group(4)))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


# AE VR (PS3.5 6.2): at most 16 characters of the default repertoire, no backslash, no control
# characters; leading and trailing spaces are not significant. '@' separates the address here.
_AE_RE = re.compile(r"[\x20-\x3f\x41-\x5b\x5d-\x7e]{1,16}")


@dataclass(frozen=True)
class AllowedCaller:
    """One `--allow` rule: a calling AE title, from any address (network None) or from an IP
    address / network. The address is the TCP peer's (from the socket), not the calling
    presentation address in the A-ASSOCIATE-RQ, which the caller writes itself."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    @classmethod
    def parse(cls, text: str) -> "AllowedCaller":
        """AE, AE@IP (e.g. PACS@10.1.2.3, PACS@::1) or AE@network (MODALITY@10.1.0.0/16, X@fd00::/8)."""
        title, at, where = text.partition("@")
        title = title.strip()
        if not (_AE_RE.fullmatch(title) and title.strip()):
            raise ValueError(f"{text!r}: expected AE, AE@IP-address or AE@network/prefix; the AE title must be "
                             "1-16 characters without '@', backslash or control characters")
        if not at:
            return cls(title)
        where = where.strip()
        if where.startswith("[") and where.endswith("]"):  # [::1] as in host:port notation
            where = where[1:-1]
        try:
            return cls(title, ipaddress.ip_network(where, strict=True))
        except ValueError:
            pass
        try:
            suggestion = ipaddress.ip_network(where, strict=False)
        except ValueError:
            raise ValueError(f"{text!r}: {where!r} is not an IP address or network (e.g. 10.1.2.3, 10.1.0.0/16, "
                             "fd00::/8); host names are not resolved") from None
        raise ValueError(f"{text!r}: {where!r} has host bits set; did you mean {title}@{suggestion}?")

    def permits(self, ae_title: str, address: str) -> bool:
        """True if a caller with this calling AE title connecting from ADDRESS is let in."""
        if str(ae_title).strip() != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            ip = ipaddress.ip_address(str(address))
        except ValueError:
            return False
        if ip in self.network:
            return True
        # an IPv4 caller seen through a dual-stack socket as ::ffff:a.b.c.d
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped is not None and mapped in self.network

    def __str__(self) -> str:
        if self.network is None:
            return self.ae_title
        if self.network.num_addresses == 1:
            return f"{self.ae_title}@{self.network.network_address}"
        return f"{self.ae_title}@{self.network}"


def remove_receiving_temp_files(inbox: Path) -> int:
    """Remove the SCP's own half-written instances (RECEIVING_PREFIX...RECEIVING_SUFFIX, regular
    files at the top level of INBOX, symlinks never followed nor removed); return how many.
    Run at start-up before the listener starts. Any other file, another writer's `.part`
    included, is left alone."""
    removed = 0
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(RECEIVING_PREFIX) and entry.name.endswith(RECEIVING_SUFFIX)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d half-received DICOM file(s) from %s", removed, inbox)
    return removed


def _store_instance(inbox: Path, uid: str, parts: Sequence[bytes | memoryview]) -> Path:
    """Write PARTS to INBOX/<uid>.dcm atomically, under a temp name the intake ignores and the
    next start removes. UID must be valid (is_valid_uid), which makes it a safe file name."""
    final = inbox / f"{uid}.dcm"

    def write(f) -> None:
        for part in parts:
            f.write(part)

    atomic_write(final, write, temp_prefix=f"{RECEIVING_PREFIX}{uid}.", temp_suffix=RECEIVING_SUFFIX)
    return final


def _raw_uid(ds, tag: int) -> str | None:
    """An element's UI value from the raw bytes, without pydicom's value conversion (which would
    warn, quoting the value, on a malformed one). None when absent or not text."""
    if tag not in ds:
        return None
    value = ds.get_item(tag).value  # the RawDataElement as read: bytes
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value.rstrip("\0 ") if isinstance(value, str) else None


def _dataset_sop_uids(event) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) of the C-STORE's data set, reading it only up to
    (0008,0018): pixel data and everything else after it are not parsed."""
    from pydicom.filereader import read_dataset

    syntax = event.context.transfer_syntax
    stream = event.request.DataSet
    position = stream.tell()
    try:
        source = stream
        if syntax.is_deflated:  # never accepted by our contexts; bounded in case that changes
            source = io.BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream.getvalue(), 1 << 20))
        source.seek(0)
        ds = read_dataset(source, syntax.is_implicit_VR, syntax.is_little_endian,
                          stop_when=lambda tag, vr, length: tag > 0x00080018)
    finally:
        stream.seek(position)
    return _raw_uid(ds, 0x00080016), _raw_uid(ds, 0x00080018)


# Accepted for every storage SOP class: native (explicit VR first, the preferred one) and the
# compressed syntaxes the decoders read. Deflated is left out (see _dataset_sop_uids).
STORE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1,
                  JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless)


def _caller(assoc) -> str:
    """'AE@address' of the requestor, for log lines (the calling AE title and the peer address
    are not patient data)."""
    try:
        title = str(assoc.requestor.primitive.calling_ae_title).strip()
    except AttributeError:
        title = "?"
    try:
        address = assoc.requestor.address
    except (AttributeError, ValueError):
        address = "?"
    return f"{title!r}@{address}"


_REJECT_REASONS = {(1, 3): "calling AE title not allowed", (1, 7): "called AE title is not ours",
                   (1, 1): "source address not allowed for this calling AE title"}


def _coerce_rules(allowed_callers) -> list[AllowedCaller]:
    rules = []
    for rule in allowed_callers or []:
        rules.append(rule if isinstance(rule, AllowedCaller) else AllowedCaller.parse(str(rule)))
    return rules


def start_scp(listen: Peer, inbox: Path, allowed_callers: Sequence[AllowedCaller | str] | None, on_received=None):
    """A Storage SCP writing each instance to INBOX/<SOPInstanceUID>.dcm via a temp name + rename.

    ALLOWED_CALLERS: AllowedCaller rules (strings are parsed, for callers that pass `--allow`
    texts); empty or None lets any caller in. The called AE title must be LISTEN's. Returns the
    pynetdicom server (running in its own threads): call .shutdown() to stop it."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    rules = _coerce_rules(allowed_callers)
    inbox.mkdir(parents=True, exist_ok=True)

    def handle_store(event):
        caller = _caller(event.assoc)
        request = event.request
        uid = request.AffectedSOPInstanceUID
        if not is_valid_uid(uid):
            log.warning("refused a C-STORE from %s: the Affected SOP Instance UID is not a valid DICOM UID "
                        "(status 0x%04X)", caller, STATUS_INVALID_SOP_INSTANCE)
            return STATUS_INVALID_SOP_INSTANCE
        uid = str(uid)
        try:
            sop_class, sop_instance = _dataset_sop_uids(event)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the sender's data, not ours
            log.warning("refused a C-STORE from %s: the data set cannot be read up to its SOP Instance UID (%s; "
                        "status 0x%04X)", caller, type(exc).__name__, STATUS_CANNOT_UNDERSTAND)
            return STATUS_CANNOT_UNDERSTAND
        if sop_class is None or sop_instance is None:
            log.warning("refused a C-STORE from %s: the data set has no SOP Class UID or SOP Instance UID "
                        "(status 0x%04X)", caller, STATUS_CANNOT_UNDERSTAND)
            return STATUS_CANNOT_UNDERSTAND
        if sop_class != str(request.AffectedSOPClassUID):
            log.warning("refused a C-STORE from %s: the data set's SOP Class UID differs from the Affected SOP "
                        "Class UID (status 0x%04X)", caller, STATUS_DATASET_MISMATCH)
            return STATUS_DATASET_MISMATCH
        if sop_instance != uid:
            log.warning("refused a C-STORE from %s: the data set's SOP Instance UID differs from the Affected "
                        "SOP Instance UID (status 0x%04X)", caller, STATUS_DATASET_MISMATCH)
            return STATUS_DATASET_MISMATCH
        try:
            from pynetdicom.dsutils import encode_file_meta

            header = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
            with request.DataSet.getbuffer() as body:  # the data set as received, not re-encoded
                _store_instance(inbox, uid, [header, body])
        except OSError as exc:  # a full disk, EIO, EACCES: tell the sender, who will retry
            log.error("cannot store an instance from %s: %s (status 0x%04X)", caller,
                      os.strerror(exc.errno) if exc.errno else type(exc).__name__, STATUS_OUT_OF_RESOURCES)
            return STATUS_OUT_OF_RESOURCES
        log.info("received %s.dcm from %s", uid, caller)
        if on_received:
            try:
                on_received()
            except Exception:  # noqa: BLE001 - the instance is stored; the sender need not know
                log.exception("on_received callback failed")
        return STATUS_SUCCESS

    def handle_requested(event):
        """The address part of `--allow`: pynetdicom's require_calling_aet checks titles only, so
        this EVT_REQUESTED handler rejects the A-ASSOCIATE-RQ the way pynetdicom's own ACSE does
        (send_reject + kill). pynetdicom's acceptor loop documents this use: after EVT_REQUESTED
        it negotiates only `if not self.is_aborted and not self.is_rejected`. Fails closed: a
        notification handler's exception would be logged and the association accepted."""
        assoc = event.assoc
        try:
            title = str(assoc.requestor.primitive.calling_ae_title).strip()
            if any(rule.permits(title, assoc.requestor.address) for rule in rules):
                return
            # a known title from the wrong address: no reason given; an unknown title: calling AE not recognised
            diagnostic = 0x01 if title in titles else 0x03
        except Exception:  # noqa: BLE001
            diagnostic = 0x01
        assoc.acse.send_reject(0x01, 0x01, diagnostic)  # rejected-permanent, by the service user
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def handle_rejected(event):
        primitive = event.assoc.acceptor.primitive
        key = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
        reason = _REJECT_REASONS.get(key, "association refused")
        log.warning("rejected an association from %s: %s", _caller(event.assoc), reason)

    ae = AE(ae_title=listen.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, STORE_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True  # an A-ASSOCIATE-RQ for another called AE title is rejected
    handlers = [(evt.EVT_C_STORE, handle_store), (evt.EVT_REJECTED, handle_rejected)]
    titles = sorted({rule.ae_title for rule in rules})
    if rules:
        ae.require_calling_aet = titles  # pynetdicom's own check: other calling AE titles are rejected
        if any(rule.network is not None for rule in rules):
            handlers.append((evt.EVT_REQUESTED, handle_requested))
    from pynetdicom.transport import ThreadedAssociationServer

    # pynetdicom's start_server(block=False) keeps its thread to itself: run it in a thread of our
    # own, so the daemon's watchdog can tell whether the listener is still accepting.
    server = ae.make_server((listen.host, listen.port), evt_handlers=handlers, server_class=ThreadedAssociationServer)
    ae._servers.append(server)  # as start_server does: the server's shutdown() removes itself from it
    thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
    thread.start()
    server.alive = thread.is_alive
    if rules:
        log.info("DICOM SCP %s listening; callers allowed: %s", listen, ", ".join(str(rule) for rule in rules))
    else:
        log.warning("DICOM SCP %s listening and accepting any calling AE title from any address "
                    "(no --allow given)", listen)
    return server


# What a PACS may answer when it stored the SR: Success, or one of the Storage Service's own
# warnings (B000 coercion, B006 elements discarded, B007 data set does not match the SOP class).
STORE_ACCEPTED = frozenset({Status.SUCCESS} | {
    code for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
    if category == STATUS_WARNING and code not in GENERAL_STATUS})


def send_sr(path: Path, peer: Peer, calling_ae: str) -> str | None:
    """C-STORE one SR; None when the PACS accepted it, else why not."""
    problem, _ = send_objects([path], peer, calling_ae)
    return problem


def send_objects(paths: Sequence[Path], peer: Peer, calling_ae: str) -> tuple[str | None, list[str]]:
    """C-STORE an input's DICOM objects (its SR, its heatmaps) in one association. Returns (why
    not all were stored, or None; the SOP classes the PACS does not take at all). An object whose
    SOP class the PACS refuses in the association (a PACS without Secondary Capture) is left out,
    not retried for ever: the caller says so; anything else is worth another try as a whole set
    (their UIDs make a repeat the same instances)."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    # Bounded, so one send can never outlast the daemon's watchdog (a PACS that accepts the TCP
    # connection and then says nothing): at most ~50 s, then retried with backoff.
    ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 15, 25, 25
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return f"association with {peer} rejected or failed", []
    try:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        refused = sorted({sop_class for sop_class, syntax in contexts if (sop_class, syntax) not in accepted})
        for number, dataset in enumerate(datasets, start=1):
            if str(dataset.SOPClassUID) in refused:
                continue
            status = assoc.send_c_store(dataset)
            if not (status and int(status.Status) in STORE_ACCEPTED):
                what = f"C-STORE status 0x{int(status.Status):04X}" if status else "no C-STORE response"
                return (what if len(datasets) == 1 else f"object {number} of {len(datasets)}: {what}"), refused
    finally:
        assoc.release()
    if refused and len(refused) == len(contexts):
        return f"the PACS accepts none of the objects' SOP classes ({', '.join(refused)})", refused
    return None, refused
