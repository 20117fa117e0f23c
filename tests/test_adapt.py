import copy

import pytest
import torch

from medtl.adapt import CoralLoss, DANNLoss, NoAdaptation, coral_loss, gradient_reversal, recompute_batchnorm_statistics
from medtl.train import Supervised, TaskWithAdaptation
from medtl.train.objectives import DomainFeatures
from tests.conftest import TinyNet


def test_coral_is_zero_for_same_covariance_and_grows_with_shift():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    assert coral_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-9)
    assert coral_loss(x, x + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # means do not matter, covariance does
    assert coral_loss(x, 3 * x).item() > coral_loss(x, 1.5 * x).item() > 0


def test_coral_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal D"):
        coral_loss(torch.randn(4, 3), torch.randn(4, 5))


def test_gradient_reversal_flips_gradient():
    x = torch.ones(3, requires_grad=True)
    gradient_reversal(x, alpha=2.0).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))


def test_dann_discriminator_loss_is_bce_over_domains():
    torch.manual_seed(0)
    plugin = DANNLoss(embedding_dim=4, hidden_dim=8)
    s = DomainFeatures(torch.randn(5, 4), torch.randn(5, 2))
    t = DomainFeatures(torch.randn(7, 4), torch.randn(7, 2))
    loss = plugin(s, t)
    assert loss.ndim == 0 and 0.3 < loss.item() < 1.5


def test_zero_plugin_is_exactly_source_only():
    torch.manual_seed(0)
    model = TinyNet().train()
    xs, ys, xt = torch.randn(6, 1, 12, 12), torch.tensor([0, 1, 0, 1, 0, 1]), torch.randn(6, 1, 12, 12) * 5
    a = copy.deepcopy(model)
    loss_plugin, _ = TaskWithAdaptation(NoAdaptation(), reg=1.0)(a, {"source": {"image": xs, "label": ys},
                                                                      "target": {"image": xt, "label": -ys}})
    b = copy.deepcopy(model)
    loss_plain, _ = Supervised()(b, {"image": xs, "label": ys})
    assert loss_plugin.item() == pytest.approx(loss_plain.item())
    # the target batch never went through BatchNorm
    torch.testing.assert_close(a.stem[1].running_mean, b.stem[1].running_mean)


def test_the_task_loss_under_adaptation_is_the_fine_tuning_objective_with_its_class_weights():
    torch.manual_seed(0)
    model = TinyNet().eval()
    xs, ys = torch.randn(6, 1, 12, 12), torch.tensor([0, 1, 1, 1, 1, 1])
    batch = {"source": {"image": xs, "label": ys}, "target": {"image": torch.randn(6, 1, 12, 12), "label": -ys}}
    weighted = Supervised(class_weights=[2.5, 0.5])
    loss, logs = TaskWithAdaptation(NoAdaptation(), task=weighted)(model, batch)
    assert loss.item() == pytest.approx(weighted(model, {"image": xs, "label": ys})[0].item())
    assert logs["task"] != pytest.approx(TaskWithAdaptation(NoAdaptation())(model, batch)[1]["task"])


def test_task_with_coral_adds_weighted_adaptation_term():
    torch.manual_seed(0)
    model = TinyNet().eval()
    batch = {"source": {"image": torch.randn(6, 1, 12, 12), "label": torch.tensor([0, 1] * 3)},
             "target": {"image": torch.randn(6, 1, 12, 12) * 3, "label": torch.full((6,), -1)}}
    _, logs0 = TaskWithAdaptation(CoralLoss(), reg=0.0)(model, batch)
    loss2, logs2 = TaskWithAdaptation(CoralLoss(), reg=2.0)(model, batch)
    assert logs2["adaptation"] > 0
    assert loss2.item() == pytest.approx(logs0["task"] + 2.0 * logs2["adaptation"], rel=1e-5)


def test_adabn_replaces_running_stats_with_target_stats():
    torch.manual_seed(0)
    model = TinyNet().eval()
    target = [torch.randn(8, 1, 12, 12) * 3 + 2 for _ in range(4)]
    n = recompute_batchnorm_statistics(model, target)
    assert n == 2
    stem_out = torch.cat([model.stem[0](x) for x in target])
    expected = stem_out.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.stem[1].running_mean, expected, rtol=1e-4, atol=1e-4)
    assert not model.training
