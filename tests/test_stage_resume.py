"""A stage re-run resumes its checkpoint only when nothing that shapes the training changed: the pretraining
objective's settings, the shared transforms (image size, augmentation) and, for adaptation, the fine-tuned weights
(see also ``test_adapt_selection``). A stale checkpoint resumed under new settings would give old weights under a
card that describes the new ones. CPU; 16-pixel images, one epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtl import stages
from medtl.config import AugmentConfig, DataConfig, FinetuneConfig, PretrainConfig, TrainConfig
from medtl.workspace import Workspace

from tests.conftest import TINY_SOURCE, TINY_TARGET, ingest_two_hospital_cohort, run_folder_sharing_ingest

DATA = DataConfig(source_hospitals=[TINY_SOURCE], target_hospital=TINY_TARGET, image_size=16)
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=1e-3, device="cpu", progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    yield from ingest_two_hospital_cohort(tmp_path_factory)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pretrained(ws: Workspace, cfg: PretrainConfig, data: DataConfig) -> dict[str, torch.Tensor]:
    stages.run_pretrain(cfg, data, ws)
    return load_file(str(ws.weights / "efficientnet_lite0.ssl.safetensors"))


def test_pretraining_retrains_when_its_objective_or_views_change(cohort, tmp_path: Path) -> None:
    ws = run_folder_sharing_ingest(cohort, tmp_path / "run")
    cfg = PretrainConfig(method="simclr", train=TRAIN, knn_every=1)
    first = _pretrained(ws, cfg, DATA)
    card = json.loads((ws.pretrain / "card.json").read_text())
    assert [point["epoch"] for point in card["knn_curve"]] == [1] and 0 <= card["knn_curve"][0]["knn_acc"] <= 1
    assert card["views"] == stages.input_settings(DATA) and card["config"]["temperature"] == 0.2

    assert _same(_pretrained(ws, cfg, DATA), first)  # nothing changed: the finished run is taken as it is
    warmer = _pretrained(ws, cfg.model_copy(update={"temperature": 0.5}), DATA)
    assert not _same(warmer, first)
    rotated = DATA.model_copy(update={"augment": AugmentConfig(rotate_deg=30)})
    assert not _same(_pretrained(ws, cfg.model_copy(update={"temperature": 0.5}), rotated), warmer)


def test_fine_tuning_retrains_when_the_transforms_change(cohort, tmp_path: Path) -> None:
    ws = run_folder_sharing_ingest(cohort, tmp_path / "run")
    cfg = FinetuneConfig(backbone="efficientnet_lite0.imagenet", train=TRAIN)
    stages.run_finetune(cfg, DATA, ws)
    first = load_file(str(ws.finetune / "model.safetensors"))
    stages.run_finetune(cfg, DATA.model_copy(update={"image_size": 24}), ws)
    assert not _same(load_file(str(ws.finetune / "model.safetensors")), first)
