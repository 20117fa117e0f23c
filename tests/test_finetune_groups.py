import pytest
import torch

from medtl.finetune import FrozenBatchNorm, optimizer_groups
from tests.conftest import TinyNet


def test_freeze_first_k_groups():
    model = TinyNet()
    groups, plan = optimizer_groups(model, lr=1e-3, freeze=1)
    assert plan.frozen_groups == 1 and plan.n_groups == 3
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert isinstance(model.stem[1], FrozenBatchNorm)  # frozen statistics, not just frozen affine
    assert plan.trainable_params == sum(p.numel() for p in model.block.parameters()) + \
        sum(p.numel() for p in model.classifier.parameters())
    assert plan.trainable_params < plan.total_params


def test_freeze_all_is_linear_probe_and_zero_is_full():
    probe = TinyNet()
    _, plan = optimizer_groups(probe, lr=1e-3, freeze="all")
    assert plan.trainable_params == sum(p.numel() for p in probe.classifier.parameters())
    full = TinyNet()
    _, plan = optimizer_groups(full, lr=1e-3, freeze=0)
    assert plan.trainable_params == plan.total_params


def test_layer_decay_scales_learning_rates_towards_input():
    groups, _ = optimizer_groups(TinyNet(), lr=1.0, layer_decay=0.5)
    assert [g["lr"] for g in groups] == [0.25, 0.5, 1.0]


def test_frozen_batchnorm_keeps_statistics_in_train_mode_and_state_dict_keys():
    model = TinyNet()
    keys_before = set(model.state_dict())
    optimizer_groups(model, lr=1e-3, freeze=2)
    before = model.stem[1].running_mean.clone()
    model.train()(torch.randn(4, 1, 12, 12) * 10 + 3)
    torch.testing.assert_close(model.stem[1].running_mean, before)
    assert set(model.state_dict()) == keys_before


def test_bad_arguments():
    with pytest.raises(ValueError, match="layer_decay"):
        optimizer_groups(TinyNet(), lr=1e-3, layer_decay=0)
    with pytest.raises(ValueError, match="freeze"):
        optimizer_groups(TinyNet(), lr=1e-3, freeze=-1)
