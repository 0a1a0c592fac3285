"""Pointing game: does a finding's heatmap peak inside the radiologist's box?

NIH's BBox_List_2017.csv (984 boxes on 880 ChestX-ray14 images, 1024x1024 coordinates) ships in
the torchxrayvision wheel on PyPI. For every box whose image is among the given folders, the
model's class map of the boxed finding (asked for whether or not the finding is flagged) is
mapped back to the image with the runtime's own code (`heatmaps.peak`), and a hit is the peak
inside the box. Two baselines from the same boxes: the image's centre, and the fraction of the
image the box covers (a uniformly random point's chance). Softer than a hit: the share of the
map's drawn heat that lies in the box, against the share of the image the box covers.

    pip download torchxrayvision==1.5.7 --no-deps -d /tmp/txv
    python benchmarks/pointing_game.py --boxes /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl \
        ../shared/data/nih/images ../shared/data/nih_tiny64/images
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np

WHEEL_MEMBER = "torchxrayvision/data/BBox_List_2017.csv.gz"
NIH_SIDE = 1024  # the boxes' coordinate space
# the box file's spelling -> the label set's
LABEL_OF = {"Infiltrate": "Infiltration"}


def read_boxes(path: Path) -> list[dict]:
    """Rows of BBox_List_2017.csv from the CSV, its .gz, or the torchxrayvision wheel. The
    header has 9 names (`Bbox [x`, `y`, `w`, `h]` and 3 empty) for 6 columns: read by position."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            data = gzip.decompress(wheel.read(WHEEL_MEMBER))
    elif path.suffix == ".gz":
        data = gzip.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    boxes = []
    for row in rows[1:]:
        if len(row) >= 6 and row[0]:
            x, y, w, h = map(float, row[2:6])
            boxes.append({"image": row[0], "label": LABEL_OF.get(row[1], row[1]), "box": (x, y, w, h)})
    return boxes


def _panel(pixels, class_map, label, probability, threshold, package, box):
    """The heatmap PNG cxr-edge writes for this finding, with the radiologist's box in white."""
    import cv2

    from cxr_edge.findings import Finding
    from cxr_edge.heatmaps import DISPLAY_SIDE, caption_for, heat_on_display, overlay
    from cxr_edge.prepare import display_image

    display = display_image(pixels, DISPLAY_SIDE)
    heat = heat_on_display(class_map, pixels.shape, display.shape, package.preprocess_params.resize)
    picture = overlay(display, heat, caption_for(Finding(label, probability, threshold), package.name, package.version))
    s = display.shape[1] / pixels.shape[1]
    x, y, w, h = (round(v * s) for v in box)
    y += picture.shape[0] - display.shape[0]  # below the caption's band
    cv2.rectangle(picture, (x, y), (x + w, y + h), (255, 255, 255), 1)
    return picture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Folders of NIH PNGs (any size: boxes are scaled).")
    parser.add_argument("--boxes", required=True, type=Path, help="BBox_List_2017.csv[.gz] or the torchxrayvision wheel.")
    parser.add_argument("--model", default=None, help="Model package (default: the bundled one).")
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None,
                        help="Save the flagged full-size images' heatmaps (as cxr-edge draws them) with the box, side by side.")
    args = parser.parse_args()

    from cxr_edge.backends import create_backend
    from cxr_edge.decode import decode_file
    from cxr_edge.findings import calibrated_probabilities
    from cxr_edge.heatmaps import heat_on_display, peak
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.preprocess import preprocess

    package = ModelPackage.load(args.model)
    spec = package.heatmap_spec
    if spec is None:
        raise SystemExit(f"{package.root}: no class maps (cxr-edge add-class-maps)")
    params, labels = package.preprocess_params, list(package.labels)
    files = {p.name: p for folder in args.folders for p in folder.glob("*.png")}
    boxes = [b for b in read_boxes(args.boxes) if b["image"] in files and b["label"] in labels]
    if not boxes:
        raise SystemExit("no boxed image in these folders")
    rows, panels = [], []
    with create_backend(package, "onnxruntime", "fp32", "fp32") as runner:
        runner.maps_output = spec.output
        for item in boxes:
            pixels = decode_file(files[item["image"]], min_side=1).pixels
            h, w = pixels.shape
            logits = runner.infer(preprocess(pixels, params)[None])
            index = labels.index(item["label"])
            found = peak(runner.last_maps[0, index], (h, w), params.resize)
            sx, sy = w / NIH_SIDE, h / NIH_SIDE
            x, y, bw, bh = item["box"]
            x, y, bw, bh = x * sx, y * sy, bw * sx, bh * sy

            def inside(px: float, py: float) -> bool:
                return x <= px <= x + bw and y <= py <= y + bh

            # the share of the map's heat (as drawn) that falls in the box, on a 256-pixel copy
            scale = 256 / max(h, w)
            heat = heat_on_display(runner.last_maps[0, index], (h, w), (round(h * scale), round(w * scale)), params.resize)
            x0, y0 = int(x * scale), int(y * scale)
            x1, y1 = max(x0 + 1, int(np.ceil((x + bw) * scale))), max(y0 + 1, int(np.ceil((y + bh) * scale)))
            share = float(heat[y0:y1, x0:x1].sum() / heat.sum()) if heat.sum() > 0 else 0.0
            probability = calibrated_probabilities(logits, package.temperatures)[0, index]
            if args.figure and probability >= package.thresholds[index] and min(h, w) >= 512:
                panels.append(_panel(pixels, runner.last_maps[0, index], item["label"], float(probability),
                                     float(package.thresholds[index]), package, (x, y, bw, bh)))
            rows.append({"image": item["image"], "label": item["label"], "size": [w, h],
                         "peak": [round(found.x, 1), round(found.y, 1)], "hit": inside(found.x, found.y),
                         "centre_hit": inside(w / 2, h / 2), "box_fraction": round(bw * bh / (w * h), 4),
                         "heat_in_box": round(share, 4),
                         "flagged": bool(probability >= package.thresholds[index])})
    n = len(rows)
    report = {"model": f"{package.name} {package.version}", "boxes": n,
              "hits": sum(r["hit"] for r in rows), "pointing_game": round(sum(r["hit"] for r in rows) / n, 3),
              "centre_baseline": round(sum(r["centre_hit"] for r in rows) / n, 3),
              "random_point_baseline": round(float(np.mean([r["box_fraction"] for r in rows])), 3),
              # heat as drawn: the share inside the box, against the box's share of the image
              "mean_heat_in_box": round(float(np.mean([r["heat_in_box"] for r in rows])), 3),
              "boxes_with_more_heat_than_area": sum(r["heat_in_box"] > r["box_fraction"] for r in rows),
              "flagged": sum(r["flagged"] for r in rows), "rows": rows}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    for r in rows:
        print(f"  {r['image']} {r['label']:<13} {r['size'][0]}x{r['size'][1]} peak {r['peak']} "
              f"{'HIT ' if r['hit'] else 'miss'} (centre {'hit' if r['centre_hit'] else 'miss'}, "
              f"box {r['box_fraction']:.0%} of the image holds {r['heat_in_box']:.0%} of the heat, "
              f"{'flagged' if r['flagged'] else 'not flagged'})")
    if args.figure and panels:
        import cv2

        cv2.imwrite(str(args.figure), np.hstack(panels))
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
