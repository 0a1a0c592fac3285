"""`python -m train <command>`: finetune, calibrate, distill, evaluate, export."""

from __future__ import annotations

import json
import logging
import sys

import click

from .losses import LOSSES


def loop_options(f):
    """Options every training command shares (the LoopConfig fields)."""
    options = [
        click.option("--epochs", default=8, show_default=True, type=click.IntRange(1)),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Per GPU / process."),
        click.option("--accum-steps", default=1, show_default=True, type=click.IntRange(1), help="Gradient accumulation."),
        click.option("--lr", default=1e-4, show_default=True, help="Peak learning rate (AdamW)."),
        click.option("--layer-decay", type=float, default=None, help="Layer-wise LR decay (e.g. 0.65); off by default."),
        click.option("--weight-decay", default=0.05, show_default=True),
        click.option("--warmup-epochs", default=1.0, show_default=True, help="Linear warmup, then cosine."),
        click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True,
                     help="Mixed precision (CUDA only; ignored with a warning on CPU)."),
        click.option("--sampler", type=click.Choice(["shuffle", "weighted"]), default="shuffle", show_default=True,
                     help="weighted: draw images with rare findings more often."),
        click.option("--loss", type=click.Choice(LOSSES), default="bce", show_default=True),
        click.option("--pos-weight/--no-pos-weight", default=True, show_default=True,
                     help="BCE/focal pos_weight = negatives/positives per class (capped at 20)."),
        click.option("--patience", default=3, show_default=True, help="Early stop after N epochs without val AUROC gain."),
        click.option("--seed", default=0, show_default=True),
        click.option("--workers", default=2, show_default=True, help="Data loader / decode processes."),
        click.option("--threads", default=2, show_default=True, help="torch CPU threads."),
        click.option("--cache", default=None, metavar="memory|DIR",
                     help="Cache preprocessed tensors in memory or as float16 .npy in DIR (reused across runs)."),
        click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt (same settings required)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train, calibrate, distill, evaluate and export cxr-edge models (needs the `train` extra)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--data", "data", multiple=True, required=True, metavar="CSV[:IMAGE_DIR]",
              help="NIH Data_Entry_2017-format CSV (Image Index, Finding Labels, Patient ID); images in IMAGE_DIR "
                   "or CSV's folder/images. Repeat to combine sets.")
@click.option("--train-val-list", type=click.Path(exists=True, dir_okay=False), help="NIH train_val_list.txt.")
@click.option("--test-list", type=click.Path(exists=True, dir_okay=False),
              help="NIH test_list.txt (official test set); without it: seeded patient-wise 70/15/15.")
@click.option("--val-fraction", default=0.1, show_default=True, help="With the official lists: val share of train_val patients.")
@click.option("--split-seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--arch", default="vit_base_patch16_224", show_default=True, help="Any timm model name.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False),
              help="Local initial weights (.safetensors or torch checkpoint; no hub at run time).")
@click.option("--img-size", default=224, show_default=True)
@click.option("--resize", type=click.Choice(["pad", "crop", "stretch"]), default="pad", show_default=True)
@loop_options
def finetune(resume: bool, **kwargs) -> None:
    """Fine-tune a timm model; keep the weights of the best validation mean AUROC.

    Multi-GPU: torchrun --nproc_per_node N -m train finetune ...
    """
    from .finetune import FinetuneConfig, finetune as run

    kwargs["data"] = tuple(kwargs["data"])
    run(FinetuneConfig(**kwargs), resume=resume)


@main.command()
@click.option("--data", "data", multiple=True, required=True, metavar="CSV[:IMAGE_DIR]",
              help="NIH-format CSV (as for finetune). Repeat to combine sets.")
@click.option("--test-data", required=True, metavar="CSV[:IMAGE_DIR]",
              help="One of --data: the held-out test patients and the out-of-fold set come from it (the images "
                   "users send, e.g. full-resolution ones).")
@click.option("--test-fraction", default=0.3, show_default=True, type=click.FloatRange(0.05, 0.9))
@click.option("--split-seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--arch", default="vit_small_patch14_dinov2", show_default=True, help="A timm ViT.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), help="Local pretrained weights (.safetensors).")
@click.option("--teacher", type=click.Path(exists=True, file_okay=False),
              help="A staged run to distil (the student takes its data, split and views).")
@click.option("--alpha", default=0.7, show_default=True, help="With --teacher: weight of the teacher term.")
@click.option("--img-size", default=224, show_default=True)
@click.option("--frozen-blocks", default=10, show_default=True, help="Blocks that never train (computed once per view).")
@click.option("--views", default=4, show_default=True, help="Views per --test-data training image (1 + augmented).")
@click.option("--other-views", default=2, show_default=True, help="Views per image of the other sets.")
@click.option("--strength", default=2.0, show_default=True, help="Augmentation strength (1 = the finetune default).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2), help="Cross-validation folds.")
@click.option("--probe-epochs", default=40, show_default=True)
@click.option("--epochs", default=6, show_default=True, type=click.IntRange(1), help="Stage 2 epochs.")
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--layer-decay", default=0.75, show_default=True)
@click.option("--ema-decay", default=0.99, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default="bce", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--cache", default=None, metavar="DIR", help="Reuse decoded tensors and trunk outputs across runs.")
def staged(**kwargs) -> None:
    """Frozen trunk, linear probe, then the top blocks (LLRD, EMA, strong augmentation) with K-fold
    out-of-fold predictions; --teacher distils a staged run into a student on the same views."""
    from .staged import StagedConfig, staged as run

    kwargs["data"] = tuple(kwargs["data"])
    try:
        run(StagedConfig(**kwargs))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--policy", default="specificity:0.90", show_default=True,
              help="Operating point per finding: specificity:T | sensitivity:T | f1 | youden | prevalence "
                   "(a class with too few positives or negatives for it gets the prevalence-matched point).")
def calibrate(run_dir: str, policy: str) -> None:
    """Per-class temperatures (NLL on validation logits) and thresholds; RUN/calibration.json."""
    from .calibrate import calibrate_run

    try:
        result = calibrate_run(run_dir, policy)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    v, t = result["validation"]["report"]["mean"], result["test"]
    click.echo(f"validation ({result['validation']['n']} images): mean NLL {v['nll_before']:.4f} -> {v['nll_after']:.4f}, "
               f"ECE {v['ece_before']:.4f} -> {v['ece_after']:.4f}, Brier {v['brier_before']:.4f} -> {v['brier_after']:.4f}")
    click.echo(f"test ({t['n']} images): mean AUROC {t['mean_auroc']} (95% CI {t['mean_auroc_ci95'][0]}-"
               f"{t['mean_auroc_ci95'][1]}), ECE {t['calibration']['ece_before']:.4f} -> {t['calibration']['ece_after']:.4f}")
    for name, part in (("validation", result["validation"]), ("test", t)):
        click.echo(f"{name} at the {result['threshold_policy']} operating points: mean sensitivity "
                   f"{part['mean_sensitivity']:.3f}, mean specificity {part['mean_specificity']:.3f}, findings flagged "
                   f"per image {part['flagged_per_image']:.2f} (true {part['true_per_image']:.2f})")


@main.command()
@click.option("--teacher", required=True, type=click.Path(exists=True, file_okay=False), help="A finetune run folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student run folder to write.")
@click.option("--arch", default="vit_tiny_patch16_224", show_default=True,
              help="Student timm model (e.g. vit_tiny_patch16_224, deit_tiny_distilled_patch16_224).")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), help="Local initial weights for the student.")
@click.option("--temperature", default=2.0, show_default=True, help="Distillation temperature.")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of the teacher term (1 - alpha: hard labels).")
@loop_options
def distill(resume: bool, **kwargs) -> None:
    """Distil a teacher run into a smaller student on the teacher's split; report the agreement."""
    from .distill import DistillConfig, distill as run

    report = run(DistillConfig(**kwargs), resume=resume)
    if report:
        click.echo(json.dumps({k: report[k] for k in ("student_mean_auroc", "teacher_mean_auroc", "decision_agreement")}))


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", multiple=True, metavar="CSV[:IMAGE_DIR]",
              help="Labeled images (NIH CSV). Default for a run: its own data and split.")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default=None,
              help="Which part of the (patient-wise) split to use [default: test for a run's own data, else all].")
@click.option("--split-seed", default=0, show_default=True)
@click.option("--precision", default="fp32", show_default=True, help="Package artifact to evaluate (fp32, int8, ...).")
@click.option("--bootstrap", "resamples", default=1000, show_default=True, help="Bootstrap resamples for the AUROC CI.")
@click.option("--workers", default=2, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
def evaluate(model_path, data, split, split_seed, precision, resamples, workers, out) -> None:
    """Evaluate MODEL_PATH (a run folder or a model package) on labeled images: JSON, Markdown, PNG plots."""
    from .evaluate import evaluate as run

    split = split or ("all" if data else "test")
    try:
        report = run(model_path, list(data), split, out, precision, split_seed, resamples, workers=workers)
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"mean AUROC {report['metrics']['mean_auroc']} on {report['metrics']['images']} images; "
               f"report: {out}/report.md")
    sys.exit(1 if report["failed"] else 0)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model package folder to write.")
@click.option("--name", default="cxr-edge-model", show_default=True)
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option("--description", default="", help="Free text stored in the manifest.")
@click.option("--candidate", "candidates", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Another calibrated run this one was chosen over (e.g. the teacher): the manifest names "
                   "both, how each was made and what each scored. Repeatable.")
def export(run_dir: str, out: str, name: str, version: str, description: str, candidates: tuple[str, ...]) -> None:
    """Export ONNX (dynamic batch) + manifest; fails if ONNX Runtime drifts from torch."""
    from .export import export_package, run_summary

    extra = {"candidates": [run_summary(r) for r in (run_dir, *candidates)]} if candidates else None
    package = export_package(run_dir, out, name, version, description, extra=extra)
    click.echo(f"wrote {package.root} (parity {package.section('export')['parity_vs_torch']})")
