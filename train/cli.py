"""`python -m train <command>`: finetune, calibrate, export."""

from __future__ import annotations

import json
import logging

import click


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train, calibrate and export cxr-edge models (needs the `train` extra: torch + timm)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--data", "data", multiple=True, required=True, metavar="CSV[:IMAGE_DIR]",
              help="NIH Data_Entry_2017-format CSV (Image Index, Finding Labels, Patient ID); images in IMAGE_DIR "
                   "or CSV's folder/images. Repeat to combine sets; the patient-wise split covers them all.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--arch", default="vit_small_patch14_dinov2", show_default=True, help="Any timm model name.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), help="Local initial weights (.safetensors or torch checkpoint).")
@click.option("--img-size", default=112, show_default=True)
@click.option("--epochs", default=8, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--layer-decay", type=float, default=None, help="Layer-wise LR decay (e.g. 0.65); off by default.")
@click.option("--seed", default=0, show_default=True)
@click.option("--split-seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True)
def finetune(**kwargs) -> None:
    """Fine-tune a timm model; keep the weights of the best validation mean AUROC."""
    from .finetune import FinetuneConfig, finetune as run

    kwargs["data"] = list(kwargs["data"])
    run(FinetuneConfig(**kwargs))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def calibrate(run_dir: str) -> None:
    """Fit per-class temperatures and Youden thresholds on the run's validation logits."""
    from .calibrate import calibrate_run

    result = calibrate_run(run_dir)
    click.echo(json.dumps({"test": result["test"], "temperatures": result["temperatures"]}, indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model package folder to write.")
@click.option("--name", default="cxr-edge-model", show_default=True)
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option("--description", default="", help="Free text stored in the manifest.")
def export(run_dir: str, out: str, name: str, version: str, description: str) -> None:
    """Export ONNX (dynamic batch) + manifest; fails if ONNX Runtime drifts from torch."""
    from .export import export_package

    package = export_package(run_dir, out, name, version, description)
    click.echo(f"wrote {package.root} (parity {package.manifest['export']['parity_vs_torch']})")
