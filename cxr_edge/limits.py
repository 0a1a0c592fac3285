"""What the runtime accepts for analysis, and the CPUs it may use, in one place (importable
without numpy, for the CLI)."""

import os

# Above this many pixels a file is refused before its pixels are decoded (decompression bombs);
# for compressed DICOM the frame's own size in its codestream is checked too.
DEFAULT_MAX_PIXELS = 50_000_000
# Below this many pixels a side an input is a thumbnail or an icon, not a radiograph to analyse
# (applied by the inference pipeline; training may use smaller images on purpose).
MIN_SIDE = 128
# An image whose 1st-99th percentile range spans less than this share of the display range
# has no content to analyse (blank, constant, or a window that clips everything to one value).
MIN_CONTRAST = 0.02


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count: a container or
    systemd's CPUAffinity= gives fewer): the default for decode workers and inference threads."""
    return max(1, len(os.sched_getaffinity(0)))
