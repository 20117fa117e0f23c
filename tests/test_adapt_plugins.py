"""Adaptation plugins: MK-MMD, DeepJDOT optimal transport, FixMatch pseudo-labels, TENT (tiny tensors, CPU)."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from medtl.adapt import (
    CoralLoss,
    DANNLoss,
    EntropyMinimisation,
    MMDLoss,
    NoAdaptation,
    OTAlignmentLoss,
    PseudoLabelLoss,
    exact_ot_plan,
    fixmatch_loss,
    jdot_cost,
    median_heuristic_bandwidths,
    mk_mmd,
    ot_alignment_loss,
    prediction_entropy,
    tent_parameters,
)
from medtl.config import TrainConfig
from medtl.train import Supervised, TaskWithAdaptation, fit
from medtl.train.objectives import AdaptationLoss, DomainFeatures
from tests.conftest import TinyNet


def _cfg(**kw):
    base = dict(epochs=1, batch_size=6, lr=1e-2, device="cpu", progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _paired_batches(n_batches=2, b=6, strong=True):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        target = {"image": torch.randn(b, 1, 12, 12, generator=g) * 2 + 1, "label": torch.full((b,), -1)}
        if strong:
            target["image_strong"] = target["image"] + 0.5 * torch.randn(b, 1, 12, 12, generator=g)
        source = {"image": torch.randn(b, 1, 12, 12, generator=g), "label": torch.tensor([0, 1] * (b // 2))}
        out.append({"source": source, "target": target})
    return out


class _Spy(AdaptationLoss):
    """Records what the objective hands to a plugin."""

    def __init__(self, strong=False):
        super().__init__()
        self.uses_strong_view = strong
        self.seen = None

    def forward(self, source, target):
        self.seen = (source, target)
        return source.embedding.sum() * 0


# ----------------------------------------------------------------------------------------------- MK-MMD


def test_mk_mmd_is_zero_for_identical_samples_and_permutations():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    assert mk_mmd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert mk_mmd(x, x[torch.randperm(32)]).item() == pytest.approx(0.0, abs=1e-6)  # same set, other order


def test_mk_mmd_matches_hand_computed_value():
    s, t = torch.tensor([[0.0]]), torch.tensor([[1.0]])  # one point each, distance 1
    assert mk_mmd(s, t, bandwidths=[1.0]).item() == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-6)
    k = (math.exp(-0.5) + math.exp(-1 / 8)) / 2  # equal-weight combination of σ = 1 and σ = 2
    assert mk_mmd(s, t, bandwidths=[1.0, 2.0]).item() == pytest.approx(2 - 2 * k, rel=1e-6)


def test_mk_mmd_default_bandwidths_are_median_heuristic():
    torch.manual_seed(0)
    s, t = torch.randn(10, 4), torch.randn(12, 4) + 1
    z = torch.cat([s, t])
    d = torch.cdist(z, z)[~torch.eye(22, dtype=torch.bool)]
    sigma = median_heuristic_bandwidths(s, t)
    torch.testing.assert_close(sigma, d.median() * torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0]), rtol=1e-4, atol=1e-5)
    assert mk_mmd(s, t).item() == pytest.approx(mk_mmd(s, t, bandwidths=sigma.tolist()).item(), rel=1e-6)


def test_mk_mmd_is_larger_for_shifted_distributions_and_grows_with_the_shift():
    torch.manual_seed(0)
    s, same = torch.randn(64, 8), torch.randn(64, 8)  # two samples of one distribution
    bw = [2.0]  # fixed: the median heuristic would widen with the shift itself
    values = [mk_mmd(s, same + shift, bandwidths=bw).item() for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values[0] < 0.05
    assert values[0] < values[1] < values[2] < values[3]
    assert mk_mmd(s, same).item() < mk_mmd(s, same + 1.0).item()  # also with the default bandwidths


def test_mk_mmd_gradient_flows_and_a_step_reduces_it():
    torch.manual_seed(0)
    s = torch.randn(16, 4, requires_grad=True)
    t = (torch.randn(16, 4) + 2).requires_grad_(True)
    loss = mk_mmd(s, t)
    loss.backward()
    for x in (s, t):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        t_moved = t - 1.0 * t.grad / t.grad.norm()
    assert mk_mmd(s.detach(), t_moved).item() < loss.item()


def test_mmd_plugin_checks_bandwidths_and_uses_embeddings():
    with pytest.raises(ValueError, match="positive kernel widths"):
        MMDLoss(bandwidths=[1.0, 0.0])
    with pytest.raises(ValueError, match="positive kernel widths"):
        MMDLoss(bandwidths=[])
    torch.manual_seed(0)
    s, t = DomainFeatures(torch.randn(5, 3), torch.randn(5, 2)), DomainFeatures(torch.randn(7, 3), torch.randn(7, 2))
    assert MMDLoss([1.0])(s, t).item() == pytest.approx(mk_mmd(s.embedding, t.embedding, [1.0]).item())


# ---------------------------------------------------------------------------------------- optimal transport


def test_ot_plan_has_uniform_marginals():
    torch.manual_seed(0)
    plan = exact_ot_plan(torch.rand(5, 7))
    assert plan.shape == (5, 7) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.full((5,), 1 / 5))
    torch.testing.assert_close(plan.sum(0), torch.full((7,), 1 / 7))


def test_ot_plan_is_the_optimal_assignment_for_equal_batches():
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    cost = jdot_cost(s, t)
    plan = exact_ot_plan(cost)
    rows, cols = linear_sum_assignment(cost.numpy())
    expected = torch.zeros(8, 8)
    expected[rows, cols] = 1 / 8
    torch.testing.assert_close(plan, expected)
    assert ot_alignment_loss(s, t).item() == pytest.approx(cost.numpy()[rows, cols].mean(), rel=1e-5)


def test_ot_loss_is_zero_for_identical_batches_and_decreases_as_target_moves_to_source():
    torch.manual_seed(0)
    s = torch.randn(12, 4)
    assert ot_alignment_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert ot_alignment_loss(s, s[torch.randperm(12)]).item() == pytest.approx(0.0, abs=1e-5)
    far = torch.randn(12, 4) + 3.0
    values = [ot_alignment_loss(s, s + a * (far - s)).item() for a in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] > 1.0


def test_ot_gradient_goes_through_cost_only():
    torch.manual_seed(0)
    s, t = torch.randn(4, 2), torch.randn(6, 2).requires_grad_(True)
    loss = ot_alignment_loss(s, t)
    loss.backward()
    plan = exact_ot_plan(jdot_cost(s, t.detach()))
    assert not plan.requires_grad
    # d/dt_j Σ_i γ_ij ||s_i - t_j||² = Σ_i γ_ij 2 (t_j - s_i): the plan acts as a constant
    expected = 2 * (plan.sum(0)[:, None] * t.detach() - plan.T @ s)
    torch.testing.assert_close(t.grad, expected, rtol=1e-4, atol=1e-5)


def test_jdot_cost_label_term_is_cross_entropy_against_source_labels():
    torch.manual_seed(0)
    s, t = torch.randn(3, 2), torch.randn(4, 2)
    logits = torch.randn(4, 3)
    labels = torch.tensor([2, 0, -1])
    cost = jdot_cost(s, t, labels, logits, label_weight=0.5)
    log_p = torch.log_softmax(logits, 1)
    for i in range(3):
        for j in range(4):
            label_term = 0.0 if labels[i] < 0 else -log_p[j, labels[i]].item()  # -1: no label term
            assert cost[i, j].item() == pytest.approx(((s[i] - t[j]) ** 2).sum().item() + 0.5 * label_term, rel=1e-5)
    with pytest.raises(ValueError, match="source_labels"):
        jdot_cost(s, t, None, logits, label_weight=1.0)


def test_ot_plugin_checks_arguments_and_needs_source_labels():
    with pytest.raises(ValueError, match="label_weight must be >= 0"):
        OTAlignmentLoss(label_weight=-1.0)
    s, t = DomainFeatures(torch.randn(4, 3), torch.randn(4, 2)), DomainFeatures(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="TaskWithAdaptation"):
        OTAlignmentLoss(label_weight=1.0)(s, t)
    assert OTAlignmentLoss()(s, t).item() == pytest.approx(ot_alignment_loss(s.embedding, t.embedding).item())


def test_objective_gives_plugins_source_labels_but_not_target_labels():
    torch.manual_seed(0)
    spy = _Spy()
    batch = _paired_batches(1)[0]
    TaskWithAdaptation(spy)(TinyNet().eval(), batch)
    source, target = spy.seen
    assert torch.equal(source.labels, batch["source"]["label"])
    assert target.labels is None and target.strong_logits is None and source.strong_logits is None


# ----------------------------------------------------------------------------------- FixMatch pseudo-labels


def test_fixmatch_mask_follows_threshold_and_loss_is_masked_mean_over_batch():
    weak = torch.log(torch.tensor([[0.97, 0.03], [0.40, 0.60], [0.10, 0.90], [0.50, 0.50]]))
    strong = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    loss, mask = fixmatch_loss(weak, strong, threshold=0.8)
    assert mask.tolist() == [True, False, True, False]
    ce = torch.nn.functional.cross_entropy(strong, torch.tensor([0, 1, 1, 0]), reduction="none")
    assert loss.item() == pytest.approx((ce[0] + ce[2]).item() / 4, rel=1e-6)  # averaged over all 4
    assert fixmatch_loss(weak, strong, threshold=0.55)[1].tolist() == [True, True, True, False]
    assert fixmatch_loss(weak, strong, threshold=0.0)[1].all()


def test_fixmatch_no_gradient_through_pseudo_labels():
    torch.manual_seed(0)
    weak = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])).requires_grad_(True)
    strong = torch.randn(3, 3, requires_grad=True)
    loss, mask = fixmatch_loss(weak, strong, threshold=0.6)
    assert mask.tolist() == [True, False, True]
    loss.backward()
    assert weak.grad is None
    assert (strong.grad[~mask] == 0).all() and (strong.grad[mask].abs().sum(1) > 0).all()


def test_fixmatch_zero_loss_when_nothing_is_confident():
    weak = torch.zeros(5, 2, requires_grad=True)  # every prediction 50/50
    strong = torch.randn(5, 2, requires_grad=True)
    loss, mask = fixmatch_loss(weak, strong, threshold=0.95)
    assert not mask.any() and loss.item() == 0.0
    loss.backward()
    assert (strong.grad == 0).all()


def test_pseudo_label_plugin_checks_threshold_and_records_mask_rate():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PseudoLabelLoss(threshold=1.5)
    plugin = PseudoLabelLoss(threshold=0.8)
    weak = torch.log(torch.tensor([[0.97, 0.03], [0.40, 0.60], [0.10, 0.90], [0.50, 0.50]]))
    target = DomainFeatures(torch.zeros(4, 3), weak, strong_logits=torch.zeros(4, 2))
    plugin(DomainFeatures(torch.zeros(4, 3), torch.zeros(4, 2)), target)
    assert plugin.last_mask_rate == 0.5 and plugin.extra_logs() == {"mask_rate": 0.5}
    with pytest.raises(ValueError, match="strong_logits"):
        plugin(target, DomainFeatures(torch.zeros(4, 3), weak))


def test_objective_forwards_strong_view_and_explains_a_missing_one():
    torch.manual_seed(0)
    model = TinyNet().eval()  # eval: BatchNorm uses running statistics, so one joint pass = separate passes
    batch = _paired_batches(1)[0]
    spy = _Spy(strong=True)
    TaskWithAdaptation(spy)(model, batch)
    source, target = spy.seen
    with torch.no_grad():
        torch.testing.assert_close(target.strong_logits, model(batch["target"]["image_strong"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(target.logits, model(batch["target"]["image"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(source.logits, model(batch["source"]["image"]), rtol=1e-4, atol=1e-5)
    del batch["target"]["image_strong"]
    with pytest.raises(ValueError, match="image_strong.*strong augmentation"):
        TaskWithAdaptation(PseudoLabelLoss())(model, batch)
    _, logs = TaskWithAdaptation(PseudoLabelLoss(threshold=0.0))(model, _paired_batches(1)[0])
    assert logs["mask_rate"] == 1.0


# ------------------------------------------------------------------------------------------------- TENT


def _target_loader(n=4, b=8):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(b, 1, 12, 12, generator=g) * 2 + 1} for _ in range(n)]


def _mean_entropy(model, loader):
    with torch.no_grad():
        return torch.cat([prediction_entropy(model(batch["image"])) for batch in loader]).mean().item()


def test_prediction_entropy_values():
    ent = prediction_entropy(torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]]))
    torch.testing.assert_close(ent, torch.tensor([math.log(3), 0.0]), atol=1e-6, rtol=0)
    model = TinyNet().eval()
    x = torch.randn(4, 1, 12, 12)
    loss, logs = EntropyMinimisation()(model, {"image": x})
    assert loss.item() == pytest.approx(prediction_entropy(model(x)).mean().item()) == pytest.approx(logs["loss"])
    with pytest.raises(ValueError, match="PairedLoader"):
        EntropyMinimisation()(model, _paired_batches(1)[0])


def test_tent_parameters_are_batchnorm_affine_only():
    model = TinyNet()
    params = tent_parameters(model)
    bn = [model.stem[1].weight, model.stem[1].bias, model.block[1].weight, model.block[1].bias]
    assert [id(p) for p in params] == [id(p) for p in bn]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "stem.1.weight", "stem.1.bias", "block.1.weight", "block.1.bias"}
    assert model.stem[1].running_mean is None and not model.stem[1].track_running_stats
    with pytest.raises(ValueError, match="no BatchNorm"):
        tent_parameters(torch.nn.Linear(3, 2))


def test_tent_fit_changes_only_batchnorm_affine_and_lowers_entropy():
    torch.manual_seed(0)
    model = TinyNet()
    loader = _target_loader()
    params = tent_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    entropy_before = _mean_entropy(model.eval(), loader)
    result = fit(model, EntropyMinimisation(), loader, _cfg(epochs=3, lr=5e-2), param_groups=[{"params": params}])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"stem.1.weight", "stem.1.bias", "block.1.weight", "block.1.bias"}
    entropy_after = _mean_entropy(model, loader)  # model.eval(): BatchNorm still uses batch statistics
    assert entropy_after < entropy_before - 1e-3
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_tent_tracking_target_statistics_keeps_state_dict_keys():
    torch.manual_seed(0)
    model = TinyNet()
    keys = set(model.state_dict())
    params = tent_parameters(model, track_target_statistics=True)
    loader = _target_loader(n=2)
    fit(model, EntropyMinimisation(), loader, _cfg(lr=1e-2), param_groups=[{"params": params}])
    assert set(model.state_dict()) == keys
    bn = model.stem[1]
    assert bn.num_batches_tracked.item() == 2  # running stats restarted and averaged over the target batches
    # first BatchNorm's input does not depend on trained parameters: its running mean is the target mean
    expected = torch.cat([model.stem[0](b["image"]) for b in loader]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ through the one loop


def _weights(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def _source_only_weights(initial):
    model = copy.deepcopy(initial)
    fit(model, Supervised(), [b["source"] for b in _paired_batches()], _cfg())
    return _weights(model)


@pytest.mark.parametrize("make_plugin", [
    CoralLoss,
    lambda: DANNLoss(embedding_dim=8, hidden_dim=8),
    MMDLoss,
    lambda: OTAlignmentLoss(label_weight=0.5),
    lambda: PseudoLabelLoss(threshold=0.0),
], ids=["coral", "dann", "mmd", "ot", "pseudo_label"])
def test_each_plugin_trains_through_fit(make_plugin):
    torch.manual_seed(0)
    initial = TinyNet()
    model = copy.deepcopy(initial)
    plugin = make_plugin()
    plugin_before = _weights(plugin)
    result = fit(model, TaskWithAdaptation(plugin, reg=1.0), _paired_batches(), _cfg())
    logs = result.history[0]
    assert all(np.isfinite(logs[k]) for k in ("loss", "task", "adaptation"))
    assert logs["adaptation"] > 0
    after = _weights(model)
    source_only = _source_only_weights(initial)
    start = _weights(initial)
    assert any(not torch.equal(after[k], start[k]) for k in after)  # parameters updated
    assert any(not torch.equal(after[k], source_only[k]) for k in after)  # and the adaptation term mattered
    for k, v in _weights(plugin).items():  # the plugin's own parameters (DANN's discriminator) train too
        assert not torch.equal(v, plugin_before[k])
    if isinstance(plugin, PseudoLabelLoss):
        assert logs["mask_rate"] == 1.0


def test_no_adaptation_reproduces_source_only_exactly():
    torch.manual_seed(0)
    initial = TinyNet()
    model = copy.deepcopy(initial)
    result = fit(model, TaskWithAdaptation(NoAdaptation(), reg=1.0), _paired_batches(), _cfg())
    assert result.history[0]["adaptation"] == 0.0
    plain = copy.deepcopy(initial)
    plain_result = fit(plain, Supervised(), [b["source"] for b in _paired_batches()], _cfg())
    for k, v in _weights(plain).items():
        assert torch.equal(model.state_dict()[k], v), k  # bit for bit, BatchNorm statistics included
    assert result.history[0]["loss"] == plain_result.history[0]["loss"]
