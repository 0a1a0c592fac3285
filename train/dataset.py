"""Images for torch: preprocessed in memory, from the on-disk tensor cache, or decoded on the fly.

Decoding and preprocessing are the runtime's own (`cxr_edge.decode` + the preprocessing
contract), so the model trains on exactly what it will be served.
"""

from __future__ import annotations

import numpy as np
import torch

from cxr_edge.decode import decode_file
from cxr_edge.preprocess import PreprocessParams, preprocess

from .data import Record, cached_tensors, labels_of, load_tensors


class XrayDataset(torch.utils.data.Dataset):
    """(image float32 [C, H, W], multi-hot labels, index). `images` None: decode per item."""

    def __init__(self, records: list[Record], params: PreprocessParams, images: np.ndarray | None = None):
        self.records, self.params, self.images = records, params, images
        self.labels = labels_of(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        if self.images is not None:
            image = np.asarray(self.images[index], dtype=np.float32)
        else:
            image = preprocess(decode_file(self.records[index].path).pixels, self.params)
        return torch.from_numpy(image), torch.from_numpy(self.labels[index]), index


def make_dataset(records: list[Record], params: PreprocessParams, cache: str | None, workers: int) -> XrayDataset:
    """cache: None (decode in the DataLoader's workers every epoch), "memory", or a folder."""
    if cache is None or not records:
        return XrayDataset(records, params)
    if cache == "memory":
        return XrayDataset(records, params, load_tensors(records, params, workers=max(1, workers))[0])
    return XrayDataset(records, params, cached_tensors(records, params, cache, workers=max(1, workers)))


def loader(dataset: XrayDataset, indices: list[int] | None, batch_size: int, workers: int, pin: bool):
    """Batches in the given order (the training loop owns all randomness, for exact resume)."""
    order = list(range(len(dataset))) if indices is None else indices
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Worker processes only pay off when they decode; cached tensors are a memory copy.
    workers = workers if dataset.images is None else 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin,
                                       persistent_workers=False)
