"""Images for torch: preprocessed in memory, from the on-disk tensor cache, or decoded on the fly.

Decoding and preprocessing are the runtime's own (`cxr_edge.workers` / `cxr_edge.prepare`), so
the model trains on exactly what it will be served.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cxr_edge.limits import DEFAULT_MAX_PIXELS
from cxr_edge.prepare import prepare
from cxr_edge.preprocess import PreprocessParams

from .data import Record, labels_of
from .tensors import LeftOut, cached_tensors, input_items, load_tensors

log = logging.getLogger(__name__)


class XrayDataset(torch.utils.data.Dataset):
    """(image float32 [C, H, W], multi-hot labels, index). `images` None: decode per item.

    `records` are the images it serves; `left_out` the ones that failed to decode (cached sets only).
    """

    def __init__(self, records: list[Record], params: PreprocessParams, images: np.ndarray | None = None,
                 left_out: list[LeftOut] | None = None):
        self.records, self.params, self.images = records, params, images
        self.left_out = left_out or []
        self.labels = labels_of(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        if self.images is not None:
            image = np.asarray(self.images[index], dtype=np.float32)
        else:
            image = self._decode(self.records[index])
        return torch.from_numpy(image), torch.from_numpy(self.labels[index]), index

    def _decode(self, record: Record) -> np.ndarray:
        # the decode workers' own function; mid-epoch there is no leaving an image out
        prepared = prepare(input_items([record])[0], self.params, DEFAULT_MAX_PIXELS)
        if prepared.error:
            raise ValueError(f"{record.path}: {prepared.error['stage']}: {prepared.error['reason']} (decoding on the fly "
                             "stops at an image that fails; --cache memory|DIR leaves it out and reports it)")
        return prepared.tensor


def make_dataset(records: list[Record], params: PreprocessParams, cache: str | None, workers: int) -> XrayDataset:
    """cache: None (decode in the DataLoader's workers every epoch), "memory", or a folder.

    With a cache, images that fail to decode are logged by name and reason and left out with their
    labels (`dataset.left_out`)."""
    if cache is None or not records:
        return XrayDataset(records, params)
    if cache == "memory":
        decoded = load_tensors(records, params, workers=max(1, workers))
    else:
        decoded = cached_tensors(records, params, cache, workers=max(1, workers))
    for path, reason in decoded.left_out:
        log.error("%s: left out: %s", path, reason)
    return XrayDataset(decoded.records, params, decoded.images, decoded.left_out)


def loader(dataset: XrayDataset, indices: list[int] | None, batch_size: int, workers: int, pin: bool):
    """Batches in the given order (the training loop owns all randomness, for exact resume)."""
    order = list(range(len(dataset))) if indices is None else indices
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Worker processes only pay off when they decode; cached tensors are a memory copy.
    workers = workers if dataset.images is None else 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin,
                                       persistent_workers=False)
