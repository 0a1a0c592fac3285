"""Output names: sanitized, collision-free stems for every input's outputs; DICOM as bytes."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePath

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# Output names (README "Outputs"). A relative input path keeps its name when every component is
# already [A-Za-z0-9._-], not hidden and at most MAX_COMPONENT long. When sanitizing changes or
# cuts any component, the last one gets MARKER + the first HASH_HEX hex digits of the sha256 of
# the original relative path (POSIX, UTF-8, undecodable bytes as themselves) before its suffix:
# `a b.dcm` -> `a_b~<hash>.dcm`. MARKER is outside the allowed set, so a name left unchanged
# never contains it: unchanged and marked names cannot meet, and marked names differ by hash.
MARKER = "~"
HASH_HEX = 10
MAX_COMPONENT = 200  # characters = bytes (ASCII): + ".sr.dcm" stays far below NAME_MAX (255)
OUTPUT_SUFFIXES = (".json", ".sr.dcm")  # what the pipeline appends to a stem, besides heatmaps:
HEATMAP_NAME = re.compile(r"\.heatmap\.[a-z0-9_-]+\.(png|dcm)$")  # <stem>.heatmap.<finding>.png|dcm
RUN_FILES = ("summary.jsonl",)  # infer's own files at the top of --out
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}$")


def sanitize_component(name: str) -> str:
    """One path component made of [A-Za-z0-9._-] only, never hidden, never '.' or '..'."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".") or "_"
    return cleaned[:MAX_COMPONENT]


def name_hash(text: str) -> str:
    """First HASH_HEX hex digits of the sha256 of `text` as UTF-8; the surrogates Python uses for
    undecodable bytes in file names are hashed as those bytes."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name produces: still hashed, stably
        data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:HASH_HEX]


def with_hash(name: str, digest: str, marker: str = MARKER, limit: int = MAX_COMPONENT) -> str:
    """`name` with `marker + digest` before its suffix (`.dcm`, `.png`...), cut to `limit`
    characters with the tag and the suffix kept: `a_b.dcm` -> `a_b~3f2a9c01de.dcm`."""
    match = _SUFFIX.search(name)
    base, suffix = (name[: match.start()], match.group()) if match and match.start() > 0 else (name, "")
    tag = marker + digest
    return base[: limit - len(tag) - len(suffix)] + tag + suffix


def output_stem(relative: PurePath) -> PurePath:
    """Relative input path -> sanitized relative output stem (keeps the folder structure).

    A pure function of `relative` (the daemon finds an input's outputs again after a crash by
    it), and one-to-one: two different relative paths never get the same stem (up to a 40-bit
    hash collision between two names that also sanitize alike). See the note above MARKER.
    A folder whose name would end like an output file (`.json`, `.sr.dcm`, `.heatmap.<x>.png`) or be a run file
    (`summary.jsonl` at the top) gets a `_` appended, so no folder meets a file."""
    parts = relative.parts or ("",)
    last = len(parts) - 1
    cleaned, changed = [], False
    for i, part in enumerate(parts):
        clean = _UNSAFE.sub("_", part).lstrip(".") or "_"
        changed |= clean != part or len(clean) > MAX_COMPONENT
        if i < last:
            clean = clean[:MAX_COMPONENT]
            if clean.endswith(OUTPUT_SUFFIXES) or HEATMAP_NAME.search(clean) or (i == 0 and clean in RUN_FILES):
                clean, changed = clean[: MAX_COMPONENT - 1] + "_", True
        cleaned.append(clean)
    if changed:  # the last one is cut by with_hash, which keeps its suffix
        cleaned[-1] = with_hash(cleaned[-1], name_hash(relative.as_posix()))
    return PurePath(*cleaned)


def dicom_bytes(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
