"""Manifest rows → cached MONAI datasets and loaders, with patient-level splits.

Splits are assigned per patient from a keyed hash of the patient id, so a patient's images never
straddle train and test, and adding new patients to the manifest does not move existing ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset
from monai.data.utils import set_rnd
from monai.transforms import Compose
from torch.utils.data import DataLoader

UNLABELED = -1
SPLITS = ("train", "val", "test", "unlabeled")


def assign_splits(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int = 0) -> pd.DataFrame:
    """Set the ``split`` column: train / val / test for labeled rows (by patient), ``unlabeled`` otherwise.

    A labeled row that already has a split (a dataset's official one, in the manifest's ``split`` column) keeps
    it; the others are assigned by a hash of their patient.

    Args:
        manifest: rows with at least ``patient_id`` and a nullable ``label`` (and optionally ``split``:
            ``train`` / ``val`` / ``test`` or empty).
        val_fraction, test_fraction: fractions of labeled patients.
        seed: changes the assignment; the same seed always gives the same split.

    Returns:
        A copy of ``manifest`` with the ``split`` column.
    """
    out = manifest.copy()
    given = (out["split"].fillna("").astype(str) if "split" in out.columns
             else pd.Series("", index=out.index, dtype=str))
    unknown = sorted(set(given) - {"", "train", "val", "test"})
    if unknown:
        raise ValueError(f"manifest column 'split' has {unknown}; use train, val, test or empty (= assign by patient)")
    u = out["patient_id"].map(lambda pid: _unit_hash(f"{seed}:{pid}"))
    labeled = out["label"].notna()
    hashed = np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))
    out["split"] = np.where(given != "", given, hashed)
    out.loc[~labeled, "split"] = "unlabeled"
    return out


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def to_records(rows: pd.DataFrame) -> list[dict]:
    """Manifest rows → sample dicts with the fixed keys used by every transform."""
    labels = rows["label"].astype("Int64").fillna(UNLABELED).astype(int)
    return [
        {"image": str(img), "label": int(lab), "hospital": str(h), "patient_id": str(p)}
        for img, lab, h, p in zip(rows["image"], labels, rows["hospital"], rows["patient_id"])
    ]


class SampleDataset(CacheDataset):
    """:class:`monai.data.CacheDataset` that caches the deterministic transforms once and re-seeds its
    random transforms at each epoch (``set_epoch``), so an epoch's augmentation depends only on the
    global seed and the epoch number — which is what makes resumed training identical to an
    uninterrupted run."""

    def __init__(self, records: Sequence[Mapping], transform: Compose) -> None:
        super().__init__(data=list(records), transform=transform, cache_rate=1.0, num_workers=0, progress=False)

    def set_epoch(self, epoch: int) -> None:
        set_rnd(self.transform, seed=int(torch.randint(0, 2**31 - 1, (1,)).item()) + epoch)


def make_loader(dataset: SampleDataset, batch_size: int, *, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader over plain tensors; shuffling draws from the global torch RNG (seeded per epoch by fit)."""
    return DataLoader(dataset, batch_size=min(batch_size, max(1, len(dataset))), shuffle=shuffle,
                      num_workers=num_workers, drop_last=drop_last and len(dataset) > batch_size,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


class PairedLoader:
    """Yields ``{"source": batch, "target": batch}``: one pass over the source loader, cycling the
    target loader — the batches an adaptation objective needs."""

    def __init__(self, source: DataLoader, target: DataLoader) -> None:
        if len(target) == 0:
            raise ValueError("the target loader is empty: the target hospital has no unlabeled images to adapt on")
        self.source = source
        self.target = target

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        for loader in (self.source, self.target):
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        target_iter = iter(self.target)
        for source_batch in self.source:
            try:
                target_batch = next(target_iter)
            except StopIteration:
                target_iter = iter(self.target)
                target_batch = next(target_iter)
            yield {"source": source_batch, "target": target_batch}
