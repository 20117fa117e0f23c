"""Self-supervised objectives (SimCLR, MoCo, BYOL, VICReg) under the one training loop, and the k-NN monitor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from medtl.config import AugmentConfig, TrainConfig
from medtl.data.datasets import SampleDataset, make_loader
from medtl.data.transforms import ssl_views_transform
from medtl.models import create_backbone
from medtl.ssl import (BYOL, SSL_METHODS, KnnMonitor, MoCo, MomentumEncoder, VICReg, build_ssl_objective,
                       embed_loader)
from medtl.train import fit
from medtl.train.core import CHECKPOINT_NAME, trainable_parameters
from tests.conftest import TinyNet


def _toy_images(n: int, size: int = 16, spatial_dims: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct blocky random images; odd ones (label 1) carry a bright centre square or cube."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1) + (4,) * spatial_dims, generator=g)
    images = F.interpolate(coarse, size=(size,) * spatial_dims, mode="nearest")
    labels = torch.arange(n) % 2
    square = torch.zeros((1,) + (size,) * spatial_dims)
    square[(slice(None),) + (slice(size // 4, 3 * size // 4),) * spatial_dims] = 1.0
    images = images + labels.view((n,) + (1,) * (spatial_dims + 1)) * square
    return images, labels


def _view(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift of up to 2 pixels along each axis plus Gaussian noise: a cheap augmentation."""
    dims = tuple(range(2, images.ndim))
    shifted = torch.stack([torch.roll(img, tuple(torch.randint(-2, 3, (len(dims),), generator=g).tolist()),
                                      tuple(d - 1 for d in dims)) for img in images])
    return shifted + 0.1 * torch.randn(shifted.shape, generator=g)


def _view_batches(n_batches: int = 4, batch_size: int = 16, size: int = 16, spatial_dims: int = 2,
                  seed: int = 0) -> list[dict]:
    """Fixed two-view batches: every epoch sees the same data, so the loss must go down."""
    images, _ = _toy_images(n_batches * batch_size, size, spatial_dims, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return [{"view1": _view(chunk, g), "view2": _view(chunk, g)} for chunk in images.split(batch_size)]


def _labeled_batches(n: int, seed: int, batch_size: int = 16) -> list[dict]:
    images, labels = _toy_images(n, seed=seed)
    return [{"image": x, "label": y} for x, y in zip(images.split(batch_size), labels.split(batch_size))]


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=16, lr=3e-3, device="cpu", progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _small(method: str, backbone: nn.Module) -> nn.Module:
    """Each method with heads sized for a toy backbone (the paper defaults are 2048-8192 wide)."""
    if method == "moco":
        return MoCo(backbone, projection_dim=32, queue_size=32)
    if method == "byol":
        return BYOL(backbone, projection_dim=32, hidden_dim=64)
    if method == "vicreg":
        return VICReg(backbone.num_features, projection_dim=64)
    return build_ssl_objective(method, backbone, projection_dim=32)


def _momentum_params(objective: nn.Module) -> list[nn.Parameter]:
    return list(objective.momentum_encoder.parameters())


@pytest.mark.parametrize("method", sorted(SSL_METHODS))
def test_loss_is_finite_and_decreases(method: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet.scratch")
    objective = _small(method, backbone)
    history = fit(backbone, objective, _view_batches(), _cfg()).history
    losses = [h["loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    # MoCo's first epoch is easier than the rest: its queue starts with random negatives, not real keys.
    first = 1 if method == "moco" else 0
    assert losses[-1] < losses[first], losses


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_momentum_encoder_is_frozen_and_follows_the_ema(method: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    objective = MoCo(model, 16, queue_size=32, momentum=0.9) if method == "moco" else \
        BYOL(model, 16, hidden_dim=16, momentum=0.9)
    target = _momentum_params(objective)
    assert target and not any(p.requires_grad for p in target)
    optimised = {id(p) for p in trainable_parameters(model, objective)}
    assert optimised.isdisjoint(id(p) for p in target)  # what fit gives the optimizer
    assert {id(p) for p in objective.projection.parameters()} <= optimised

    with torch.no_grad():  # let the online network drift away from its copy
        for p in list(model.parameters()) + list(objective.projection.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    online = [p.detach().clone() for p in list(model.parameters()) + list(objective.projection.parameters())]
    before = [p.detach().clone() for p in target]
    loss, logs = objective(model, _view_batches(1, 8)[0])
    loss.backward()

    assert logs["momentum"] == pytest.approx(0.9)
    for new, old, current in zip(target, before, online, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * current)
        assert new.grad is None
    assert int(objective.momentum_encoder.step) == 1


def test_momentum_rises_along_a_cosine_to_one() -> None:
    model, head = TinyNet(), nn.Linear(8, 4)
    encoder = MomentumEncoder(model, head, momentum=0.9, total_steps=5)
    used = [encoder.update(model, head) for _ in range(6)]
    assert used[0] == pytest.approx(0.9)
    assert used == sorted(used) and used[-2] == used[-1] == pytest.approx(1.0)
    assert MomentumEncoder(model, head, momentum=0.9).current_momentum() == 0.9


def test_outside_training_the_queue_and_momentum_encoder_stay() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    objective = MoCo(model, 16, queue_size=32)
    batch = _view_batches(1, 8)[0]
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    loss, logs = objective.eval()(model, batch)
    assert not loss.requires_grad and "momentum" not in logs
    for key, value in objective.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():  # training mode: BatchNorm running statistics may move, nothing else
        objective.train()(model, batch)
    for key, value in objective.state_dict().items():
        assert "running_" in key or "num_batches" in key or torch.equal(value, before[key]), key


class _Killed(Exception):
    """Stands in for SIGKILL after the first epoch's checkpoint."""


def _kill_at(epoch_index: int):
    def callback(epoch, model, logs):
        if epoch == epoch_index:
            raise _Killed

    return callback


def test_moco_resumes_exactly_with_queue_and_momentum_encoder(tmp_path) -> None:
    batches, cfg = _view_batches(3, 8), _cfg(epochs=3)

    def build(seed: int) -> tuple[nn.Module, MoCo]:
        torch.manual_seed(seed)
        model = TinyNet()
        return model, MoCo(model, 16, queue_size=24, total_steps=cfg.epochs * len(batches))

    straight_model, straight = build(0)
    fit(straight_model, straight, batches, cfg)

    model, objective = build(0)
    with pytest.raises(_Killed):  # killed during epoch 2: the checkpoint holds epoch 1
        fit(model, objective, batches, cfg, checkpoint_dir=tmp_path, callbacks=[_kill_at(1)])
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as handle:
        saved = set(handle.keys())
    assert {"objective::criterion.memory_bank.bank", "objective::criterion.memory_bank.bank_ptr",
            "objective::momentum_encoder.step"} <= saved
    assert any(k.startswith("objective::momentum_encoder.backbone.") for k in saved)

    resumed_model, resumed = build(123)  # other random weights and queue; the checkpoint must replace them
    result = fit(resumed_model, resumed, batches, cfg, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0
    assert int(resumed.momentum_encoder.step) == cfg.epochs * len(batches)
    for expected, actual in [(straight_model, resumed_model), (straight, resumed)]:
        for (name, a), b in zip(expected.state_dict().items(), actual.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_byol_trains_a_3d_backbone() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet10_3d.scratch")
    assert backbone.spatial_dims == 3
    objective = BYOL(backbone, projection_dim=16, hidden_dim=32, total_steps=4)
    before = [p.detach().clone() for p in objective.momentum_encoder.backbone.parameters()]
    history = fit(backbone, objective, _view_batches(2, 4, size=16, spatial_dims=3), _cfg(epochs=2)).history
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = list(objective.momentum_encoder.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the target followed the online network


@pytest.mark.parametrize("method", sorted(SSL_METHODS))
def test_every_method_pretrains_a_3d_backbone_on_the_shared_3d_views(method: str, tmp_path) -> None:
    # the pretrain stage's path in 3D: volumes on disk -> MONAI 3D views -> the method's objective -> a MONAI 3D ResNet
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        np.save(tmp_path / f"vol{i}.npy", rng.random((1, 14, 12, 10), dtype=np.float32))
        records.append({"image": str(tmp_path / f"vol{i}.npy"), "label": -1})
    torch.manual_seed(0)
    backbone = create_backbone("resnet10_3d.scratch")
    views = ssl_views_transform(3, 16, backbone.cfg.mean, backbone.cfg.std, AugmentConfig())
    loader = make_loader(SampleDataset(records, views), 4, shuffle=True, drop_last=True)
    batch = next(iter(loader))
    assert batch["view1"].shape == batch["view2"].shape == (4, 1, 16, 16, 16)
    assert not torch.equal(batch["view1"], batch["view2"])  # two independent augmentations
    objective = build_ssl_objective(method, backbone, projection_dim=16, total_steps=2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    history = fit(backbone, objective, loader, _cfg(epochs=1)).history
    assert np.isfinite(history[0]["loss"])
    assert any(not torch.equal(before[k], v) for k, v in backbone.state_dict().items() if v.is_floating_point())


def test_knn_monitor_logs_at_the_right_epochs_and_beats_chance() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    monitor = KnnMonitor(_labeled_batches(32, seed=10), _labeled_batches(32, seed=11), every=2, epochs=3, k=5)
    history = fit(model, VICReg(model.num_features, 32), _view_batches(2, 16), _cfg(epochs=3),
                  callbacks=[monitor]).history
    assert ["knn_acc" in h for h in history] == [False, True, True]
    assert [epoch for epoch, _ in monitor.history_] == [2, 3]
    assert [acc for _, acc in monitor.history_] == [history[1]["knn_acc"], history[2]["knn_acc"]]
    assert min(acc for _, acc in monitor.history_) >= 0.8  # chance is 0.5
    flipped = [{"image": b["image"], "label": 1 - b["label"]} for b in _labeled_batches(32, seed=11)]
    logs: dict = {}
    KnnMonitor(_labeled_batches(32, seed=10), flipped, k=5)(0, model, logs)
    assert logs["knn_acc"] <= 0.2  # the same neighbours now vote against the (wrong) labels


@pytest.mark.parametrize("training", [True, False])
def test_knn_monitor_restores_the_training_mode(training: bool) -> None:
    model = TinyNet().train(training)
    logs: dict = {}
    KnnMonitor(_labeled_batches(8, seed=0), _labeled_batches(8, seed=1), k=3)(0, model, logs)
    assert model.training is training and 0.0 <= logs["knn_acc"] <= 1.0


def test_embed_loader_keeps_labels_aligned_and_monitor_skips_unlabeled() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    batches = _labeled_batches(20, seed=0, batch_size=8)
    features, labels = embed_loader(model, batches)
    assert features.shape == (20, model.num_features) and features.dtype == "float32"
    assert labels.tolist() == [i % 2 for i in range(20)]
    unlabeled = [{"image": b["image"], "label": torch.full_like(b["label"], -1)} for b in batches]
    with pytest.raises(ValueError, match="labeled"):
        KnnMonitor(unlabeled, batches)(0, model, {})


def test_build_ssl_objective_builds_every_method() -> None:
    model = TinyNet()
    for method, cls in SSL_METHODS.items():
        objective = build_ssl_objective(method, model, projection_dim=16, temperature=0.3, total_steps=10)
        assert type(objective) is cls
    with pytest.raises(ValueError, match="choose one of"):
        build_ssl_objective("dino", model)


@pytest.mark.parametrize(("build", "match"), [
    (lambda m: MoCo(m, temperature=0), "temperature"),
    (lambda m: MoCo(m, queue_size=0), "queue_size"),
    (lambda m: MoCo(m, momentum=1.5), "momentum"),
    (lambda m: MoCo(m, total_steps=0), "total_steps"),
    (lambda m: BYOL(m, projection_dim=0), "projection_dim"),
    (lambda m: BYOL(nn.Linear(2, 2)), "embed"),
    (lambda m: VICReg(0), "embedding_dim"),
    (lambda m: VICReg(8, mu_param=-1), "mu_param"),
    (lambda m: KnnMonitor([], [], every=0), "every"),
    (lambda m: KnnMonitor([], [], k=0), "k must be"),
])
def test_arguments_are_checked(build, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        build(TinyNet())
