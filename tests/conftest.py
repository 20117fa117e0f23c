"""Shared test fixtures: tiny networks and tiny array datasets (CPU, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("MEDTL_UID_SECRET", "medtl-test-secret")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class TinyNet(nn.Module):
    """The backbone interface (embed / classify / layer_groups) at toy size, 2D or 3D."""

    def __init__(self, num_classes: int = 2, spatial_dims: int = 2, width: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.stem = nn.Sequential(conv(1, width, 3, padding=1), bn(width), nn.ReLU())
        self.block = nn.Sequential(conv(width, width, 3, padding=1, stride=2), bn(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.num_features = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.block(self.stem(x))).flatten(1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def layer_groups(self) -> list[list[str]]:
        return [[n for n, _ in self.named_parameters() if n.startswith(prefix)]
                for prefix in ("stem", "block", "classifier")]


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def array_records(tmp_path: Path) -> list[dict]:
    """40 tiny 24x24 images saved as .npy; label 1 images carry a bright square."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        label = i % 2
        img = rng.normal(0.4, 0.05, (1, 24, 24)).astype(np.float32)
        if label:
            img[:, 8:16, 8:16] += 0.4
        path = tmp_path / f"img{i:03d}.npy"
        np.save(path, np.clip(img, 0, 1))
        records.append({"image": str(path), "label": label, "hospital": "h1", "patient_id": f"p{i // 2}"})
    return records
