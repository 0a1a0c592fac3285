"""`cxr-edge bench`: latency percentiles, throughput and a per-stage split, like trtexec, for the
model stage alone and for the whole pipeline over real files (the same Pipeline `infer` runs)."""

SCHEMA = "cxr-edge-bench/1"
STAGES = ("decode", "preprocess", "queue", "h2d", "compute", "d2h", "postprocess", "write")
