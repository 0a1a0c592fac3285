"""Options shared by several commands, and the usage error every command raises."""

from __future__ import annotations

import click

from .limits import MIN_SIDE

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
# what a command runs in (bf16: the torch backend on CUDA), and what an artifact is built in
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ARTIFACT_PRECISIONS = ("fp32", "fp16", "int8")


def one_line(message) -> str:
    """A message as one line (exactly one `Error:` line, whatever a library said)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip()) or type(message).__name__


class UsageFailure(click.ClickException):
    """A usage or configuration error: `Error: <one line>` on stderr, exit status 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message):
        super().__init__(one_line(message))


def compose(*decorators):
    """Several click options as one decorator, in the order given (as --help lists them)."""
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


model = click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
                     help="Model package folder (default: the bundled demo model).")
backend = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]), default="auto",
                       show_default=True,
                       help="auto: a matching TensorRT engine on a GPU, else torch on a CUDA GPU (the gpu-torch "
                            "extra), else ONNX Runtime on CPU. torch without CUDA runs FP32 on CPU, saying why.")
precision = click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                         help="onnxruntime/tensorrt: which built artifact to run (fp16/int8 come from `cxr-edge "
                              "build-engine`); torch: what it computes in on CUDA (fp32, fp16, bf16).")
batch_size = click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
                          help="Max batch size.")
max_delay = click.option("--max-delay-ms", default=20.0, show_default=True, type=click.FloatRange(0),
                         help="Longest an input waits for its batch to fill.")
workers = click.option("--workers", type=click.IntRange(1), default=None, help="Decode processes (default: CPU cores).")
threads = click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads (default: CPU cores).")
no_sr = click.option("--no-sr", is_flag=True, help="Do not write DICOM SR for DICOM inputs.")
heatmaps = click.option("--heatmaps/--no-heatmaps", default=None,
                        help="A heatmap per flagged finding: PNG overlay, and a DICOM Secondary Capture for DICOM "
                             "inputs [default: on when the model has class maps]. --heatmaps fails if it has not.")
# infer and watch refuse the same inputs
min_side = click.option("--min-side", default=MIN_SIDE, show_default=True, type=click.IntRange(1),
                        help="Refuse images with fewer pixels than this on a side (thumbnails, icons).")

# what `infer` and `watch` share: the model, how it runs, and what is written
pipeline = compose(model, backend, precision, batch_size, max_delay, workers, threads, no_sr, min_side, heatmaps)
