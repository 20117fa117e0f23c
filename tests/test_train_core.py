import numpy as np
import pytest
import torch
from safetensors import safe_open

from medtl.config import AugmentConfig, TrainConfig
from medtl.data.datasets import SampleDataset, make_loader
from medtl.data.transforms import train_transform
from medtl.train import Supervised, balanced_class_weights, fit, select_device
from medtl.train.core import CHECKPOINT_NAME, use_channels_last
from medtl.train.inference import positive_probability
from tests.conftest import TinyNet


def _loader(records, batch_size=8):
    t = train_transform(2, 16, (0.5,), (0.25,), AugmentConfig())
    return make_loader(SampleDataset(records, t), batch_size, shuffle=True, drop_last=True)


def _cfg(**kw):
    base = dict(epochs=4, batch_size=8, lr=3e-3, device="cpu", progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_learns_a_separable_task(array_records):
    torch.manual_seed(0)
    model = TinyNet()
    result = fit(model, Supervised(), _loader(array_records), _cfg(epochs=8))
    assert len(result.history) == 8
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    eval_t = train_transform(2, 16, (0.5,), (0.25,), AugmentConfig(rotate_deg=0, scale=0, prob=0))
    prob = positive_probability(model, make_loader(SampleDataset(array_records, eval_t), 16, shuffle=False), "cpu")
    labels = np.array([r["label"] for r in array_records])
    assert prob[labels == 1].min() > prob[labels == 0].max()  # every positive ranked above every negative


def test_two_seeded_runs_are_identical(array_records):
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyNet()
        fit(model, Supervised(), _loader(array_records), _cfg(epochs=2))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


class _Killed(Exception):
    """Stands in for SIGKILL: training stops in the middle of an epoch's bookkeeping."""


def _kill_at(epoch_index):
    def callback(epoch, model, logs):
        if epoch == epoch_index:
            raise _Killed

    return callback


def test_resume_from_checkpoint_equals_uninterrupted_run(array_records, tmp_path):
    torch.manual_seed(0)
    straight = TinyNet()
    fit(straight, Supervised(), _loader(array_records), _cfg(epochs=4))

    torch.manual_seed(0)
    interrupted = TinyNet()
    with pytest.raises(_Killed):  # killed during epoch 3: the checkpoint holds epochs 1-2
        fit(interrupted, Supervised(), _loader(array_records), _cfg(epochs=4), checkpoint_dir=tmp_path,
            callbacks=[_kill_at(2)])
    torch.manual_seed(123)  # the resumed process starts from other random weights; they must not matter
    resumed = TinyNet()
    result = fit(resumed, Supervised(), _loader(array_records), _cfg(epochs=4), checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def _weights(model):
    return torch.cat([v.detach().float().flatten() for v in model.state_dict().values()])


def test_weight_average_is_what_callbacks_and_the_caller_get_while_training_follows_the_raw_weights(array_records):
    torch.manual_seed(0)
    plain = TinyNet()
    plain_result = fit(plain, Supervised(), _loader(array_records), _cfg(epochs=3))

    seen = []
    torch.manual_seed(0)
    averaged = TinyNet()
    result = fit(averaged, Supervised(), _loader(array_records), _cfg(epochs=3, ema_decay=0.9),
                 callbacks=[lambda epoch, model, logs: seen.append(_weights(model))])
    # the optimizer never sees the average: the same losses, step for step, as without it
    assert [h["loss"] for h in result.history] == [h["loss"] for h in plain_result.history]
    assert not torch.allclose(_weights(averaged), _weights(plain))
    assert torch.equal(seen[-1], _weights(averaged))

    torch.manual_seed(0)
    barely = TinyNet()  # a decay near 0 averages over about one step: the raw weights again
    fit(barely, Supervised(), _loader(array_records), _cfg(epochs=3, ema_decay=1e-9))
    torch.testing.assert_close(_weights(barely), _weights(plain))


def test_resume_keeps_the_weight_average(array_records, tmp_path):
    cfg = _cfg(epochs=3, ema_decay=0.9)
    torch.manual_seed(0)
    straight = TinyNet()
    fit(straight, Supervised(), _loader(array_records), cfg)
    torch.manual_seed(0)
    with pytest.raises(_Killed):
        fit(TinyNet(), Supervised(), _loader(array_records), cfg, checkpoint_dir=tmp_path, callbacks=[_kill_at(1)])
    resumed = TinyNet()
    assert fit(resumed, Supervised(), _loader(array_records), cfg, checkpoint_dir=tmp_path).resumed_from_epoch == 0
    torch.testing.assert_close(_weights(resumed), _weights(straight))


def test_checkpoint_from_other_settings_is_not_resumed(array_records, tmp_path):
    fit(TinyNet(), Supervised(), _loader(array_records), _cfg(epochs=1), checkpoint_dir=tmp_path)
    result = fit(TinyNet(), Supervised(), _loader(array_records), _cfg(epochs=1, lr=1e-2), checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch is None


def test_checkpoint_is_safetensors_without_pickle(array_records, tmp_path):
    torch.manual_seed(0)
    fit(TinyNet(), Supervised(), _loader(array_records), _cfg(epochs=1), checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as handle:
        assert "medtl_checkpoint" in handle.metadata()
        assert any(k.startswith("optim::") for k in handle.keys())
    assert b"\x80\x04" not in path.read_bytes()[:8]  # not a pickle stream


def test_2d_nets_train_channels_last_and_3d_nets_keep_their_layout(array_records):
    model = TinyNet()
    fit(model, Supervised(), _loader(array_records), _cfg(epochs=1))
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    for device in ("cpu", "cuda"):  # a 5-D weight has no channels_last layout: converting it would raise
        assert not use_channels_last(TinyNet(spatial_dims=3), torch.device(device))
        assert use_channels_last(TinyNet(), torch.device(device))


def test_select_device_cpu_and_errors():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            select_device("cuda")


def test_empty_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        fit(TinyNet(), Supervised(), [], _cfg())


def test_fully_frozen_model_is_a_clear_error(array_records):
    model = TinyNet()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        fit(model, Supervised(), _loader(array_records), _cfg(epochs=1))


def test_class_weights_weigh_each_labeled_image_by_its_class():
    weights = balanced_class_weights(np.array([0, 1, 1, 1, -1]), num_classes=2)
    assert weights == pytest.approx([4 / (2 * 1), 4 / (2 * 3)])  # n / (classes x n_c); -1 (unknown) left out
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1, -1])
    loss, _ = Supervised(class_weights=weights)(torch.nn.Identity(), {"image": logits, "label": labels})
    per_image = torch.nn.functional.cross_entropy(logits[:3], labels[:3], reduction="none")
    w = torch.tensor(weights)[labels[:3]]
    assert loss.item() == pytest.approx(((w * per_image).sum() / w.sum()).item())


def test_class_weights_are_checked_with_messages_that_say_what_to_do():
    with pytest.raises(ValueError, match="one finite positive weight per class"):
        Supervised(class_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="have no labeled training image"):
        balanced_class_weights([1, 1, -1], num_classes=2)
    with pytest.raises(ValueError, match="outside 0..1"):
        balanced_class_weights([0, 1, 2], num_classes=2)
    with pytest.raises(ValueError, match="give one weight per class"):
        Supervised(class_weights=[1.0, 1.0, 1.0])(TinyNet(), {"image": torch.zeros(2, 1, 8, 8),
                                                              "label": torch.tensor([0, 1])})


def test_balanced_weights_move_the_operating_point_off_the_training_prevalence():
    # 80 % positives and one overlapping cue (image brightness, classes 1 sd apart): unweighted training calls
    # most images positive at 0.5; balanced training calls far fewer.
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(320, generator=g) < 0.8).long()
    brightness = torch.randn(320, 1, 1, 1, generator=g) + (labels.float().view(-1, 1, 1, 1) - 0.5)
    images = brightness.expand(-1, 1, 8, 8) + 0.05 * torch.randn(320, 1, 8, 8, generator=g)
    batches = [{"image": images[i:i + 32], "label": labels[i:i + 32]} for i in range(0, 320, 32)]
    rates = {}
    for name, weights in {"plain": None, "balanced": balanced_class_weights(labels.numpy(), 2)}.items():
        torch.manual_seed(0)
        model = TinyNet()
        fit(model, Supervised(class_weights=weights), batches, _cfg(epochs=15, lr=1e-2))
        model.eval()
        with torch.no_grad():
            rates[name] = (model(images).softmax(1)[:, 1] >= 0.5).float().mean().item()
    assert rates["plain"] > 0.85 and rates["balanced"] < rates["plain"] - 0.15, rates
