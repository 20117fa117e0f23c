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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole suite: the networks here are tiny, and on a busy 2-core machine OpenMP's
    threads mostly wait for each other (a 16-pixel forward pass measured 9x slower with two). Results are then also
    bit-identical to the one-thread child processes of the DDP and fault tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


TINY_SOURCE, TINY_TARGET = "St. Aurelia General Hospital", "Harbor Valley Medical Center"


def ingest_two_hospital_cohort(tmp_path_factory: pytest.TempPathFactory, unlabeled_per_hospital: int = 0):
    """The source and target hospitals of configs/tiny.yaml, 32 labeled (plus ``unlabeled_per_hospital``) DICOM
    images each, written and ingested into a fresh workspace; the converted ImageNet weights go to a private
    cache, not the user's. Modules wrap this in a module-scoped fixture so that it runs once per module."""
    from medtl.config import DeidConfig, IngestConfig, load_config
    from medtl.ingest import ingest_folder
    from medtl.synth import write_cohort
    from medtl.workspace import Workspace

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE", str(tmp_path_factory.mktemp("medtl_cache")))
        synth = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").synth
        synth = synth.model_copy(update={
            "hospitals": [h for h in synth.hospitals if h.institution in (TINY_SOURCE, TINY_TARGET)],
            "labeled_per_hospital": 32, "unlabeled_per_hospital": unlabeled_per_hospital, "broken_files": 0,
            "workers": 1})
        ws = Workspace(tmp_path_factory.mktemp("cohort"))
        write_cohort(synth, ws.dicom)
        deid = DeidConfig(site_aliases=synth.site_aliases())  # the manifest names the hospitals as written
        ingest_folder(IngestConfig(input_dir=ws.dicom, image_size=32, workers=1, deid=deid), ws)
        yield ws


def run_folder_sharing_ingest(cohort, root: Path):
    """A fresh run folder at ``root`` whose ingest is the (read-only) ingest of ``cohort``."""
    from medtl.workspace import Workspace

    ws = Workspace(root)
    ws.root.mkdir()
    ws.ingest.symlink_to(cohort.ingest.resolve(), target_is_directory=True)
    return ws


@pytest.fixture(scope="module")
def prefect_harness():
    """A throw-away Prefect server (SQLite in a temporary folder) for the flows of one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
