"""Heatmaps: where the model found each flagged finding, drawn on the image.

The maps are class activation maps that come out of the same inference pass as the logits
(engines/class_maps.py): the model's head applied to every patch token, whose mean over the
patches *is* the image's logit. A map is drawn for a flagged finding only, on a small copy of
the image (prepare.display_image), through the model's window on the image (letterbox, crop or
stretch: preprocess.model_window), with the finding, its probability and "not for diagnosis"
burned in. Only the label, numbers and the model's name are written on it, never a header value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

from .labels import NO_FINDING
from .preprocess import model_window

DISPLAY_SIDE = 384  # the longer side of a heatmap picture, pixels: the map is 8x8 patches (README, heatmap cost)
WARNING = "NOT FOR DIAGNOSIS"
ALPHA = 0.55  # the colour's weight where the map is hottest


@dataclass(frozen=True)
class Peak:
    """The hottest patch's centre in the source image's pixels (x: column, y: row)."""

    x: float
    y: float

    def to_json(self) -> list[float]:
        return [round(self.x, 1), round(self.y, 1)]


def mapped_labels(findings) -> list[str]:
    """The findings that get a map: the positive ones, not 'No Finding' (it has no place)."""
    return [f.label for f in findings if f.positive and f.label != NO_FINDING]


def label_slug(label: str) -> str:
    """A label as a file-name part: `Pleural_Thickening` -> `pleural_thickening`."""
    # short: a stem of MAX_COMPONENT characters + this + the temp file's affixes stays within NAME_MAX
    return re.sub(r"[^a-z0-9_-]+", "_", label.lower()).strip("_")[:24] or "finding"


def relative_heat(class_map: np.ndarray) -> np.ndarray:
    """[0, 1] per patch: 0 at or below the map's mean, 1 at its maximum. The map's mean is the
    image's logit, so the picture shows where the evidence is above the image's average."""
    class_map = np.asarray(class_map, dtype=np.float64)
    above = class_map - class_map.mean()
    top = above.max()
    if not np.isfinite(top) or top <= 0:
        return np.zeros_like(class_map)
    return np.clip(above / top, 0.0, 1.0)


def peak(class_map: np.ndarray, source_shape: tuple[int, int], resize: str) -> Peak:
    """Where the map is hottest, in source pixels: the centre of its top patch, kept inside the
    image (a letterbox's padding is not the image)."""
    h, w = source_shape
    top, left, height, width = model_window(h, w, resize)
    rows, columns = class_map.shape
    row, column = np.unravel_index(int(np.argmax(class_map)), class_map.shape)
    y = top + (row + 0.5) * height / rows
    x = left + (column + 0.5) * width / columns
    return Peak(float(np.clip(x, 0, w - 1)), float(np.clip(y, 0, h - 1)))


def heat_on_display(class_map: np.ndarray, source_shape: tuple[int, int], display_shape: tuple[int, int],
                    resize: str) -> np.ndarray:
    """The map's relative heat ([0, 1]) over the display image's pixels; 0 outside the model's window."""
    h, w = source_shape
    dh, dw = display_shape
    sy, sx = dh / h, dw / w
    top, left, height, width = model_window(h, w, resize)
    # the window in display pixels (it may reach past the display: a letterbox)
    y0, x0 = round(top * sy), round(left * sx)
    wh, ww = max(1, round(height * sy)), max(1, round(width * sx))
    # bilinear: smooth enough for 8x8 patches, and it cannot overshoot [0, 1] as cubic does
    window = cv2.resize(relative_heat(class_map).astype(np.float32), (ww, wh), interpolation=cv2.INTER_LINEAR)
    heat = np.zeros((dh, dw), np.float32)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(dh, y0 + wh), min(dw, x0 + ww)
    if ye > ys and xe > xs:
        heat[ys:ye, xs:xe] = window[ys - y0 : ye - y0, xs - x0 : xe - x0]
    return heat


def overlay(display: np.ndarray, heat: np.ndarray, caption: list[str]) -> np.ndarray:
    """BGR uint8 (OpenCV's order: PNG encodes it as it is; DICOM wants rgb()): the grayscale
    image with the heat in colour (transparent where it is 0), under a band with the caption."""
    gray = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    alpha = (ALPHA * heat).astype(np.float32)
    picture = cv2.blendLinear(gray, colour, 1.0 - alpha, alpha)  # one pass in C: the heatmap's budget is small
    return _caption(picture, caption)


MIN_CAPTION_WIDTH = 256  # pixels: a sliver of an image still gets a readable warning


def _caption(picture: np.ndarray, lines: list[str]) -> np.ndarray:
    """The picture under a black band holding `lines`, never over the image: the warning is
    always there to read, whatever the image's shape (a picture narrower than the text is padded)."""
    h, w = picture.shape[:2]
    width = max(w, MIN_CAPTION_WIDTH)
    widest = max(cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)[0][0] for line in lines)
    scale = max(0.3, min(0.5, (width - 8) / widest))
    (_, line_h), baseline = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    step = line_h + baseline + 4
    band = step * len(lines) + 4
    canvas = np.zeros((band + h, width, 3), np.uint8)
    canvas[band:, :w] = picture
    for i, line in enumerate(lines):
        cv2.putText(canvas, line, (4, 2 + step * i + line_h), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return canvas


def caption_for(finding, model_name: str, model_version: str) -> list[str]:
    """What a heatmap says of itself: the finding and its numbers, the model, the warning.
    ASCII only (Hershey fonts), nothing from the image's header."""
    text = f"{finding.label}: p={finding.probability:.2f} (threshold {finding.threshold:.2f})"
    model = re.sub(r"[^\x20-\x7e]", "?", f"{model_name} {model_version}")[:60]
    return [text, f"{model} - AI heatmap, {WARNING}"]


# Deflate would be most of a heatmap's cost (512x512 RGB: ~13 ms at zlib's defaults, ~6 ms with
# Huffman coding only) against < 1 ms stored: stored, ~0.8 MB a map (README, heatmap cost).
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]


def rgb(picture: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)


def png_bytes(picture: np.ndarray) -> bytes:
    """BGR uint8 -> PNG, encoded for speed (PNG_PARAMS)."""
    ok, data = cv2.imencode(".png", picture, PNG_PARAMS)
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()
