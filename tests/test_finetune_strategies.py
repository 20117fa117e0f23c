"""Fine-tuning strategies: early stopping, gradual unfreezing, LP-FT, L2-SP, BatchNorm policy, LoRA,
negative transfer (CPU, tiny networks, in-memory batches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtl.config import TrainConfig
from medtl.finetune import (
    L2SP,
    EarlyStopping,
    FrozenBatchNorm,
    GradualUnfreezing,
    LoRAConv,
    add_lora,
    apply_batchnorm_policy,
    lp_ft,
    merge_lora,
    negative_transfer,
    optimizer_groups,
    trainable_parameter_report,
    unfreeze_groups,
)
from medtl.train import Objective, Supervised, fit
from tests.conftest import TinyNet


def _batches(n: int = 3, size: int = 12, seed: int = 0) -> list[dict]:
    """``n`` batches of 8 one-channel images; label 1 images are brighter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 2, (8,), generator=g)
        out.append({"image": torch.randn(8, 1, size, size, generator=g) + y.view(-1, 1, 1, 1), "label": y})
    return out


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=1e-2, device="cpu", progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _scripted_monitor(values: list[float], calls: list[int]):
    def callback(epoch, model, logs):
        calls.append(epoch)
        logs["val_auc"] = values[epoch]

    return callback


def _recorder(states: list[dict]):
    def callback(epoch, model, logs):
        states.append({"state": _state(model),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    return callback


# ------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_patience_and_restores_best():
    torch.manual_seed(0)
    model = TinyNet()
    states, calls = [], []
    early = EarlyStopping("val_auc", mode="max", patience=3)
    values = [0.5, 0.7, 0.6, 0.65, 0.69, 0.95, 0.96, 0.97]
    result = fit(model, Supervised(), _batches(), _cfg(epochs=8),
                 callbacks=[_scripted_monitor(values, calls), _recorder(states), early])
    assert calls == [0, 1, 2, 3, 4]  # 3 epochs without improvement after epoch 2, then stop
    assert result.stopped_epoch == 5 and early.stopped_epoch == 5
    assert len(result.history) == 5 and result.history[-1]["stop_training"] is True
    assert early.best == 0.7 and early.best_epoch == 2
    for key, value in model.state_dict().items():  # best weights (end of epoch 2) restored
        torch.testing.assert_close(value, states[1]["state"][key], rtol=0, atol=0)
    assert not torch.equal(states[1]["state"]["classifier.weight"], states[4]["state"]["classifier.weight"])


def test_early_stopping_min_delta_and_min_mode_without_fit():
    early = EarlyStopping("val_loss", mode="min", patience=2, min_delta=0.1, restore_best=False)
    model = TinyNet()
    early.on_fit_start(model, [])
    stops = []
    for epoch, value in enumerate([1.0, 0.95, 0.85, 0.84, 0.83]):
        logs = {"epoch": epoch + 1, "val_loss": value}
        early(epoch, model, logs)
        stops.append(logs.get("stop_training", False))
    assert early.best == 0.85 and early.best_epoch == 3  # 0.95 is within min_delta of 1.0
    assert stops == [False, False, False, False, True]
    with pytest.raises(KeyError, match="before EarlyStopping"):
        early(5, model, {"epoch": 6, "loss": 0.1})
    for bad in (dict(patience=0), dict(mode="up"), dict(min_delta=-1.0), dict(monitor="")):
        with pytest.raises(ValueError):
            EarlyStopping(**bad)


def test_early_stopped_checkpoint_resumes_as_finished(tmp_path):
    values = [0.5, 0.7, 0.6, 0.6, 0.6, 0.9]
    torch.manual_seed(0)
    first = TinyNet()
    fit(first, Supervised(), _batches(), _cfg(epochs=6, checkpoint_every=4), checkpoint_dir=tmp_path,
        callbacks=[_scripted_monitor(values, []), EarlyStopping(patience=3)])
    torch.manual_seed(123)
    again, calls = TinyNet(), []
    result = fit(again, Supervised(), _batches(), _cfg(epochs=6, checkpoint_every=4), checkpoint_dir=tmp_path,
                 callbacks=[_scripted_monitor(values, calls), EarlyStopping(patience=3)])
    assert calls == []  # the stopped run is finished: nothing trains
    assert result.resumed_from_epoch == 4 and result.stopped_epoch == 5 and len(result.history) == 5
    for key, value in first.state_dict().items():  # the checkpoint holds the restored best weights
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- gradual unfreezing


def test_gradual_unfreezing_grows_trainable_groups_on_schedule():
    torch.manual_seed(0)
    model = TinyNet()
    initial = _state(model)
    groups, plan = optimizer_groups(model, 1e-2, freeze="all", include_frozen=True)
    assert [g["group"] for g in groups] == [0, 1, 2]
    head = sum(p.numel() for p in model.classifier.parameters())
    block = sum(p.numel() for p in model.block.parameters())
    assert plan.trainable_params == head and isinstance(model.stem[1], FrozenBatchNorm)
    states = []
    result = fit(model, Supervised(), _batches(), _cfg(epochs=3), param_groups=groups,
                 callbacks=[_recorder(states), GradualUnfreezing(1)])
    assert [s["trainable"] for s in states] == [head, head + block, plan.total_params]
    assert [h["trainable_groups"] for h in result.history] == [1, 2, 3]
    for key in ("stem.0.weight", "stem.1.weight", "stem.1.running_mean"):  # frozen for epochs 0 and 1
        assert torch.equal(states[0]["state"][key], initial[key]) and torch.equal(states[1]["state"][key], initial[key])
        assert not torch.equal(states[2]["state"][key], initial[key])
    for key in ("block.0.weight", "block.1.running_var"):  # frozen for epoch 0 only
        assert torch.equal(states[0]["state"][key], initial[key])
        assert not torch.equal(states[1]["state"][key], initial[key])
    assert isinstance(model.stem[1], nn.BatchNorm2d) and isinstance(model.block[1], nn.BatchNorm2d)


class _Killed(Exception):
    pass


def _kill_at(index: int):
    def callback(epoch, model, logs):
        if epoch == index:
            raise _Killed

    return callback


def test_gradual_unfreezing_resumes_exactly(tmp_path):
    def prepared(seed: int) -> tuple[TinyNet, list[dict]]:
        torch.manual_seed(seed)
        model = TinyNet()
        return model, optimizer_groups(model, 1e-2, freeze="all", layer_decay=0.5, include_frozen=True)[0]

    straight, groups = prepared(0)
    fit(straight, Supervised(), _batches(), _cfg(epochs=3), param_groups=groups, callbacks=[GradualUnfreezing(1)])
    interrupted, groups = prepared(0)
    with pytest.raises(_Killed):  # killed in epoch 2's callbacks: the checkpoint holds epoch 1
        fit(interrupted, Supervised(), _batches(), _cfg(epochs=3), param_groups=groups, checkpoint_dir=tmp_path,
            callbacks=[GradualUnfreezing(1), _kill_at(1)])
    resumed, groups = prepared(123)
    result = fit(resumed, Supervised(), _batches(), _cfg(epochs=3), param_groups=groups, checkpoint_dir=tmp_path,
                 callbacks=[GradualUnfreezing(1)])
    assert result.resumed_from_epoch == 0
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_gradual_unfreezing_checks_its_arguments_and_the_model():
    assert [GradualUnfreezing([2, 3]).trainable_groups(e) for e in range(5)] == [1, 1, 2, 3, 3]
    assert [GradualUnfreezing(2).trainable_groups(e) for e in range(5)] == [1, 1, 2, 2, 3]
    for bad in (0, [], [2, 1], [0, 1]):
        with pytest.raises(ValueError, match="schedule"):
            GradualUnfreezing(bad)
    with pytest.raises(ValueError, match="include_frozen=True"):
        GradualUnfreezing(1).on_fit_start(TinyNet(), [])


def test_freezing_keeps_timm_batchnorm_activation_and_is_reversible():
    from medtl.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("test_efficientnet.scratch", num_classes=2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
    names = model.layer_groups()
    optimizer_groups(model, 1e-3, freeze="all")
    assert model.layer_groups() == names  # frozen BatchNorm keeps its parameters
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)  # BatchNormAct's activation kept
    unfreeze_groups(model, "all")
    assert not any(isinstance(m, FrozenBatchNorm) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- LP-FT


def test_lp_ft_probes_the_head_then_fine_tunes_everything():
    torch.manual_seed(0)
    model = TinyNet()
    initial = _state(model)
    states = []
    probe, finetune = lp_ft(model, Supervised(), _batches(), _cfg(epochs=1, lr=1e-2), _cfg(epochs=1, lr=1e-3),
                            callbacks=[_recorder(states)])
    assert len(probe.history) == 1 and len(finetune.history) == 1
    after_probe, after_finetune = states[0]["state"], states[1]["state"]
    for key, value in initial.items():
        assert torch.equal(after_probe[key], value) != key.startswith("classifier."), key  # only the head moved
    for key in ("stem.0.weight", "stem.1.bias", "stem.1.running_mean", "block.0.weight"):
        assert not torch.equal(after_finetune[key], after_probe[key]), key
    assert states[1]["trainable"] == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, FrozenBatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------------------------------- L2-SP


class _ZeroTask(Objective):
    def forward(self, model, batch):
        loss = model(batch["image"]).sum() * 0.0
        return loss, {"loss": 0.0}


def test_l2sp_penalty_is_exact_and_pulls_towards_the_start():
    torch.manual_seed(0)
    model = TinyNet()
    objective = L2SP(_ZeroTask(), model, alpha=0.1, beta=0.2)
    head = 0.2 / 2 * sum((p.detach() ** 2).sum() for p in model.classifier.parameters())
    torch.testing.assert_close(objective.penalty(model), head)  # no pull at the start, only the head term
    assert L2SP(_ZeroTask(), model, alpha=0.1, beta=0.0).penalty(model).item() == 0.0

    with torch.no_grad():
        model.stem[0].weight += 0.5
    expected = 0.1 / 2 * model.stem[0].weight.numel() * 0.25 + head
    batch = {"image": torch.randn(2, 1, 12, 12)}
    loss, logs = objective(model, batch)
    torch.testing.assert_close(loss, expected)
    assert logs["l2sp"] == pytest.approx(expected.item()) and logs["task_loss"] == 0.0
    loss.backward()
    torch.testing.assert_close(model.stem[0].weight.grad, torch.full_like(model.stem[0].weight, 0.1 * 0.5))
    torch.testing.assert_close(model.classifier.weight.grad, 0.2 * model.classifier.weight.detach())
    assert model.block[0].weight.grad.abs().max() == 0  # at w0: no pull
    with pytest.raises(ValueError, match="head names"):
        L2SP(_ZeroTask(), model, head=["nope"])


# --------------------------------------------------------------------------------------------- BatchNorm policy


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_frozen_batchnorm_policy_fixes_statistics_and_trains_affine():
    torch.manual_seed(0)
    model = TinyNet()
    optimizer_groups(model, 1e-3, freeze=1)  # the stem's group is frozen
    assert apply_batchnorm_policy(model, "frozen") == 2
    stats, weight = model.block[1].running_mean.clone(), model.block[1].weight.detach().clone()
    _train_step(model, torch.randn(8, 1, 12, 12) * 3 + 2, torch.randint(0, 2, (8,)))
    assert torch.equal(model.block[1].running_mean, stats)
    assert not torch.equal(model.block[1].weight, weight)  # affine trainable
    assert apply_batchnorm_policy(model, "train") == 1
    assert isinstance(model.block[1], nn.BatchNorm2d)
    assert isinstance(model.stem[1], FrozenBatchNorm)  # a frozen layer group stays frozen


def test_adabn_policy_sets_batch_statistics_then_freezes_them():
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(16, 1, 12, 12) * 3 + 2
    with torch.no_grad():
        conv = model.stem[0](x)
    assert apply_batchnorm_policy(model, "adabn", [x]) == 2
    assert isinstance(model.stem[1], FrozenBatchNorm)
    torch.testing.assert_close(model.stem[1].running_mean, conv.mean((0, 2, 3)))
    torch.testing.assert_close(model.stem[1].running_var, conv.var((0, 2, 3), unbiased=True))
    stats = model.stem[1].running_mean.clone()
    _train_step(model, torch.randn(8, 1, 12, 12), torch.randint(0, 2, (8,)))
    assert torch.equal(model.stem[1].running_mean, stats)
    with pytest.raises(ValueError, match="batches"):
        apply_batchnorm_policy(model, "adabn")
    with pytest.raises(ValueError, match="only used by"):
        apply_batchnorm_policy(model, "frozen", [x])
    with pytest.raises(ValueError, match="policy"):
        apply_batchnorm_policy(model, "sometimes")


# ------------------------------------------------------------------------------------------------------ LoRA


def test_lora_starts_identical_trains_adapters_and_head_and_merges():
    torch.manual_seed(0)
    model = TinyNet(width=8)
    keys = set(model.state_dict())
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 2, (8,))
    with torch.no_grad():
        before = model.eval()(x)
    assert add_lora(model, rank=4, alpha=8) == ["stem.0", "block.0"]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)

    adapters = (1 * 4 * 9 + 4 * 8) + (8 * 4 * 9 + 4 * 8)  # A: in→r with the 3×3 kernel, B: r→out 1×1
    head, body = 8 * 2 + 2, (1 * 8 * 9 + 8) + 2 * 8 + (8 * 8 * 9 + 8) + 2 * 8
    report = trainable_parameter_report(model)
    assert report == {"trainable": adapters + head, "total": adapters + head + body,
                      "percent": pytest.approx(100 * (adapters + head) / (adapters + head + body))}

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # B moves in step 1, A (whose gradient is zero while B = 0) in step 2
        _train_step(model, x, y)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == {n for n, p in model.named_parameters() if "lora_" in n or n.startswith("classifier.")}

    with torch.no_grad():
        unmerged = model.eval()(x)
        assert merge_lora(model) == 2
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == keys
    TinyNet(width=8).load_state_dict(model.state_dict())


def test_lora_conv3d_stride_merge_and_grouped_convs_skipped():
    torch.manual_seed(0)
    model = TinyNet(spatial_dims=3, width=4)
    add_lora(model, rank=2, alpha=4)
    for module in model.modules():
        if isinstance(module, LoRAConv):
            nn.init.normal_(module.lora_B.weight)
    x = torch.randn(2, 1, 6, 6, 6)
    with torch.no_grad():
        unmerged = model.eval()(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)

    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Linear(8 * 9, 3))
    assert add_lora(net, rank=2, train_head=False) == ["1", "3"]
    assert isinstance(net[0], nn.Conv2d) and not net[0].weight.requires_grad
    with pytest.raises(ValueError, match="groups=4"):
        LoRAConv(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(net)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(TinyNet(), target="nothing_matches")


# --------------------------------------------------------------------------------------------- negative transfer


def test_negative_transfer_gate():
    verdict = negative_transfer(0.81, 0.84)
    assert verdict["negative"] is True and verdict["delta"] == pytest.approx(-0.03)
    assert verdict["message"] == "ImageNet initialisation is 0.030 AUC below scratch on validation: negative transfer"
    within = negative_transfer(0.83, 0.84, margin=0.02)
    assert within["negative"] is False and "within the 0.020 margin" in within["message"]
    better = negative_transfer(0.9, 0.8, transfer_name="SSL initialisation")
    assert better["negative"] is False
    assert better["message"] == "SSL initialisation is 0.100 AUC above scratch on validation: no negative transfer"
    for bad in ((float("nan"), 0.8), (1.2, 0.8), (0.8, None)):
        with pytest.raises(ValueError, match="AUC in"):
            negative_transfer(*bad)
    with pytest.raises(ValueError, match="margin"):
        negative_transfer(0.8, 0.8, margin=-0.1)
