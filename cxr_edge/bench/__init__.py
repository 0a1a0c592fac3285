"""`cxr-edge bench`: latency percentiles, throughput and a per-stage split, like trtexec, for the
model stage alone and for the whole pipeline over real files (the same Pipeline `infer` runs)."""

from dataclasses import dataclass

SCHEMA = "cxr-edge-bench/1"
STAGES = ("decode", "preprocess", "queue", "h2d", "compute", "d2h", "postprocess", "write")


@dataclass(frozen=True)
class Shape:
    """A production-size model for `cxr-edge bench --shape` (shapes.py builds it)."""

    timm_name: str
    size: int
    about: str


SHAPES = {
    "vit-b16-224": Shape("vit_base_patch16_224", 224, "ViT-B/16 at 224 px: 86 M parameters, about 35 GFLOP per image"),
    "vit-s16-224": Shape("vit_small_patch16_224", 224, "ViT-S/16 at 224 px: 22 M parameters, about 9 GFLOP per image"),
}
