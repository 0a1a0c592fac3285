"""The torch runner's network: the manifest's timm architecture with the FP32 ONNX's weights, and
a forward pass that returns the class maps with the logits (heatmaps) in the same pass.

Imported only by the torch runner (the `gpu-torch` extra); the rest of the runtime never
imports torch.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelPackageError
from .onnx_weights import timm_state_dict_from_onnx


def timm_model(architecture: dict, model_bytes: bytes, where: str):
    """The package's timm model in eval mode, every parameter loaded from its ONNX (strict: a
    parameter missing or left over is a refusal, not a silently random layer)."""
    import timm
    import torch

    name = architecture.get("timm_name")
    if not name:
        raise ModelPackageError(f"{where}: the manifest names no timm architecture (architecture.timm_name), "
                                "which the torch backend needs to rebuild the network")
    kwargs = {"img_size": architecture["img_size"]} if "img_size" in architecture else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=int(architecture["num_classes"]),
                                  in_chans=int(architecture["in_chans"]), **kwargs,
                                  **architecture.get("timm_kwargs", {}))
    except Exception as exc:  # an unknown name, arguments this timm does not take
        raise ModelPackageError(f"{where}: timm cannot build architecture {name!r}: {type(exc).__name__}: {exc}") from exc
    state = timm_state_dict_from_onnx(model_bytes)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    misshapen = sorted(k for k in set(wanted) & set(state) if tuple(wanted[k].shape) != tuple(state[k].shape))
    if missing or extra or misshapen:
        found = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                          for what, keys in (("missing", missing), ("not in the model", extra),
                                             ("other shapes", misshapen)) if keys)
        raise ModelPackageError(f"{where}: the ONNX artifact's weights do not fit timm {name!r} ({found})")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model.eval()


def maps_problem(model) -> str | None:
    """Why the class maps of this model would not be exact (engines/class_maps.py: a linear head on
    the mean of the patch tokens), or None."""
    import torch

    if getattr(model, "global_pool", None) != "avg" or getattr(model, "pool_include_prefix", False):
        return "its head does not average the patch tokens alone (timm global_pool='avg')"
    if not isinstance(getattr(model, "fc_norm", None), torch.nn.Identity):
        return "it normalises the pooled tokens (fc_norm)"
    if not isinstance(getattr(model, "head", None), torch.nn.Linear):
        return "its head is not one linear layer"
    return None


def logits_and_maps(model, grid: tuple[int, int] | None, dtype):
    """A module: float32 [B, C, H, W] -> (float32 logits [B, L], float32 maps [B, L, rows,
    columns] or an empty tensor when `grid` is None), computing in `dtype`."""
    import torch

    class LogitsAndMaps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.to(dtype)

        def forward(self, x):
            features = self.model.forward_features(x.to(dtype))
            logits = self.model.forward_head(features).float()
            if grid is None:
                return logits, logits.new_empty(0)
            # the head on every patch token (prefix tokens left out, as the pool does): the
            # logit is the mean of its map
            tokens = features[:, self.model.num_prefix_tokens:]
            maps = self.model.head(tokens).float().transpose(1, 2)
            return logits, maps.reshape(maps.shape[0], maps.shape[1], *grid)

    return LogitsAndMaps().eval()
