"""timm models by name, with initial weights from a local file (no hub at run time)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch checkpoint loaded with weights_only=True (never unpickle code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def adapt_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fit a backbone checkpoint to this model: input channels, position embeddings, head."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    target = model.state_dict()
    out = {}
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key]
        if value.ndim == 4 and value.shape[1] != want.shape[1] and value.shape[0] == want.shape[0]:
            value = adapt_input_conv(want.shape[1], value)  # e.g. RGB -> 1-channel: sum the kernel
        if key == "pos_embed" and value.shape != want.shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            value = resample_abs_pos_embed(value, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)
        if value.shape != want.shape:
            log.info("initial weights: skipping %s (shape %s, model wants %s)", key, tuple(value.shape), tuple(want.shape))
            continue
        out[key] = value
    return out


def create_model(arch: str, num_classes: int, in_chans: int, img_size: int, init: str | Path | None = None,
                 **model_kwargs):
    """model_kwargs: more timm arguments (e.g. global_pool), as a run's config.json records them."""
    import timm

    kwargs = {"img_size": img_size} if "vit" in arch or "deit" in arch else {}
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs, **model_kwargs)
    if init:
        state = adapt_to_model(load_state_dict_file(init), model)
        result = model.load_state_dict(state, strict=False)
        log.info("initial weights from %s: %d tensors loaded, missing %s", init, len(state), result.missing_keys)
        head_only = all(k.startswith(("head", "fc", "classifier")) for k in result.missing_keys)
        if not head_only:
            raise ValueError(f"{init}: does not fit {arch}; missing {result.missing_keys[:8]}")
    return model


def read_run_config(run_dir: str | Path):
    """A run folder's config.json and its preprocessing, without building the model (decode first:
    the decode workers are forked before torch starts its threads)."""
    import json

    from cxr_edge.preprocess import PreprocessParams

    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    return cfg, PreprocessParams.from_manifest(cfg["preprocessing"])


def load_run_model(run_dir: str | Path):
    """A run folder's model (config.json + model.safetensors), in eval mode, with its preprocessing.

    A calibrated run (calibration.json with `logit_shifts`) comes with the shifts added to its
    classifier's bias, so its logits are the ones its temperatures and thresholds were fitted for
    (and the exported ONNX model, which the runtime only divides by T, is that model)."""
    from safetensors.torch import load_file

    from cxr_edge.labels import LABELS

    run_dir = Path(run_dir)
    cfg, params = read_run_config(run_dir)
    model = create_model(cfg["arch"], len(LABELS), params.channels, params.size, **cfg.get("model_kwargs", {}))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    calibration = run_dir / "calibration.json"
    if calibration.is_file():
        import json

        shifts = json.loads(calibration.read_text()).get("logit_shifts")
        if shifts and any(shifts):
            add_logit_shifts(model, shifts)
    return model.eval(), cfg, params


def add_logit_shifts(model, shifts) -> None:
    """Add per-class shifts to every classifier's bias (DeiT's two heads each: it averages them)."""
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if not isinstance(head, torch.nn.Linear) or head.bias is None:
            raise ValueError(f"cannot fold logit shifts into a {type(head).__name__} classifier")
        with torch.no_grad():
            head.bias += torch.as_tensor(shifts, dtype=head.bias.dtype)
