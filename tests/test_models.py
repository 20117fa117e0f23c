"""Backbone registry, interface, weight loading and safety (CPU, offline)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from skimage import color, data, transform

from medtl.models import (Backbone, UnsafeCheckpointError, create_backbone, get_backbone_cfg, list_backbones,
                          load_backbone_weights, read_state_dict, save_backbone)
from medtl.models.weights import map_state_in_order

EGYPTIAN_CAT = 285


class NotATensor:
    """Stands for an arbitrary pickled object, which loading must refuse."""


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep the converted ImageNet weights out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE", str(tmp_path_factory.mktemp("medtl_cache")))
        yield


@functools.lru_cache(maxsize=1)
def _cat_224() -> np.ndarray:
    """skimage's chelsea, shorter side resized to 224 and centre-cropped: (224, 224, 3) in [0, 1]."""
    img = data.chelsea().astype(np.float32) / 255
    h, w = img.shape[:2]
    scale = 224 / min(h, w)
    img = transform.resize(img, (round(h * scale), round(w * scale)), anti_aliasing=True)
    top, left = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    return img[top:top + 224, left:left + 224]


def _normalise(img: np.ndarray, backbone: Backbone) -> torch.Tensor:
    """(H, W, C) in [0, 1] → (1, C, H, W) normalised with the backbone's own mean/std."""
    x = (img - np.asarray(backbone.cfg.mean)) / np.asarray(backbone.cfg.std)
    return torch.from_numpy(x).float().permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def imagenet_rgb() -> Backbone:
    return create_backbone("efficientnet_lite0.imagenet", num_classes=1000, in_chans=3).eval()


@pytest.fixture(scope="module")
def imagenet_grey() -> Backbone:
    return create_backbone("efficientnet_lite0.imagenet", num_classes=1000, in_chans=1).eval()


def test_imagenet_weights_recognise_the_cat(imagenet_rgb: Backbone) -> None:
    with torch.no_grad():
        probs = imagenet_rgb(_normalise(_cat_224(), imagenet_rgb)).softmax(-1)[0]
    top = int(probs.argmax())
    print(f"RGB chelsea: class {top}, p={probs[top]:.3f}, top-5 {probs.topk(5).indices.tolist()}")
    assert top == EGYPTIAN_CAT


def test_grey_imagenet_weights_still_see_a_cat(imagenet_grey: Backbone) -> None:
    assert imagenet_grey.cfg.in_chans == 1 and len(imagenet_grey.cfg.mean) == 1
    grey = color.rgb2gray(_cat_224())[..., None]
    with torch.no_grad():
        probs = imagenet_grey(_normalise(grey, imagenet_grey)).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    print(f"grey chelsea: class {top5[0]}, p={probs[top5[0]]:.3f}, p(285)={probs[EGYPTIAN_CAT]:.3f}, top-5 {top5}")
    assert EGYPTIAN_CAT in top5


def test_grey_stem_equals_rgb_network_on_replicated_grey(imagenet_rgb: Backbone, imagenet_grey: Backbone) -> None:
    grey = color.rgb2gray(_cat_224())[..., None]
    with torch.no_grad():
        from_grey = imagenet_grey(_normalise(grey, imagenet_grey))
        from_rgb = imagenet_rgb(_normalise(np.repeat(grey, 3, axis=-1), imagenet_rgb))
    # EfficientNet-Lite normalises every channel alike, so summing the stem kernels is exact.
    torch.testing.assert_close(from_grey, from_rgb, atol=1e-3, rtol=1e-4)


def test_imagenet_head_is_replaced_unless_1000_classes() -> None:
    backbone = create_backbone("efficientnet_lite0.imagenet", num_classes=0)
    assert backbone.num_classes == 0 and backbone.eval()(torch.randn(1, 1, 32, 32)).shape == (1, backbone.num_features)
    assert create_backbone("efficientnet_lite0.imagenet", num_classes=2).num_classes == 2


INTERFACE_CASES = [
    ("efficientnet_lite0.scratch", (2, 1, 64, 64), 2),
    ("test_efficientnet.scratch", (2, 1, 32, 32), 2),
    ("resnet10_3d.scratch", (2, 1, 16, 16, 16), 3),
]


@pytest.mark.parametrize(("name", "shape", "spatial_dims"), INTERFACE_CASES)
def test_interface_shapes(name: str, shape: tuple[int, ...], spatial_dims: int) -> None:
    backbone = create_backbone(name, num_classes=3).eval()
    x = torch.randn(shape)
    assert backbone.spatial_dims == spatial_dims and backbone.cfg.spatial_dims == spatial_dims
    with torch.no_grad():
        features = backbone.forward_features(x)
        assert features.shape[:2] == (2, backbone.num_features) and features.ndim == len(shape)
        assert backbone.forward_head(features).shape == (2, 3)
        assert backbone.forward_head(features, pre_logits=True).shape == (2, backbone.num_features)
        assert backbone(x).shape == (2, 3)
        assert backbone.embed(x).shape == (2, backbone.num_features)
        backbone.reset_classifier(0)
        assert backbone.num_classes == 0 and backbone(x).shape == (2, backbone.num_features)
        backbone.reset_classifier(5)
        assert backbone.num_classes == 5 and backbone(x).shape == (2, 5)
    with pytest.raises(ValueError, match="expects"):
        backbone(torch.randn(2, 3, *shape[2:]))


@pytest.mark.parametrize(("name", "shape", "spatial_dims"), INTERFACE_CASES)
def test_layer_groups_partition_parameters_in_order(name: str, shape: tuple[int, ...], spatial_dims: int) -> None:
    backbone = create_backbone(name, num_classes=2)
    groups = backbone.layer_groups()
    flat = [n for group in groups for n in group]
    # Each parameter exactly once, and concatenated groups run from input to output.
    assert flat == [n for n, _ in backbone.named_parameters()]
    classifier = backbone.model.get_classifier()
    head_prefix = next(f"model.{n}." for n, m in backbone.model.named_modules() if m is classifier)
    assert groups[-1] == [n for n in flat if n.startswith(head_prefix)]
    assert len(groups) >= 5 and all(groups)
    backbone.reset_classifier(0)
    assert len(backbone.layer_groups()) == len(groups) - 1


def test_efficientnet_lite0_layer_groups() -> None:
    groups = create_backbone("efficientnet_lite0.scratch", num_classes=2).layer_groups()

    def label(group: list[str]) -> str:  # "model.blocks.3.0.conv_pw.weight" → "blocks.3"
        parts = group[0].split(".")[1:]
        return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]

    assert [label(g) for g in groups] == ["conv_stem", *[f"blocks.{i}" for i in range(7)], "conv_head", "classifier"]
    assert groups[-2] == ["model.conv_head.weight", "model.bn2.weight", "model.bn2.bias"]


def test_converted_imagenet_weights_are_cached(imagenet_rgb: Backbone) -> None:
    cached = Path(os.environ["MEDTL_CACHE"]) / "weights" / "efficientnet_lite0.imagenet.safetensors"
    state = safetensors.torch.load_file(cached)
    assert state.keys() == imagenet_rgb.model.state_dict().keys()
    torch.testing.assert_close(state["classifier.weight"], imagenet_rgb.model.classifier.weight)


def test_ssl_weights_round_trip(tmp_path: Path) -> None:
    backbone = create_backbone("efficientnet_lite0.scratch", num_classes=0, in_chans=1)
    with torch.no_grad():  # make the state differ from a fresh init, buffers included
        for tensor in backbone.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    written = save_backbone(backbone, tmp_path / "efficientnet_lite0.ssl", {"method": "simclr", "epochs": 5})
    assert written == tmp_path / "efficientnet_lite0.ssl.safetensors"
    card = json.loads((tmp_path / "efficientnet_lite0.ssl.json").read_text())
    assert card["method"] == "simclr" and card["arch"] == "efficientnet_lite0" and card["in_chans"] == 1
    assert "efficientnet_lite0.ssl" in list_backbones(tmp_path)

    loaded = create_backbone("efficientnet_lite0.ssl", num_classes=0, in_chans=1, weights_dir=tmp_path)
    assert loaded.cfg.source == f"file:{written}" and loaded.cfg.mean == backbone.cfg.mean
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), backbone.eval()(x), rtol=0, atol=0)
        by_path = create_backbone(f"file:{written}").eval()
        torch.testing.assert_close(by_path(x), backbone(x), rtol=0, atol=0)
    assert create_backbone("efficientnet_lite0.ssl", num_classes=2, weights_dir=tmp_path).num_classes == 2


def test_cardless_foreign_weights_in_weights_dir(tmp_path: Path) -> None:
    rgb = create_backbone("test_efficientnet.scratch", num_classes=10, in_chans=3)
    safetensors.torch.save_file(rgb.model.state_dict(), tmp_path / "test_efficientnet.foreign.safetensors")
    cfg = get_backbone_cfg("test_efficientnet.foreign", tmp_path)
    assert (cfg.in_chans, cfg.pretrained_classes) == (3, 10)
    grey = create_backbone("test_efficientnet.foreign", num_classes=10, in_chans=1, weights_dir=tmp_path)
    torch.testing.assert_close(grey.model.conv_stem.weight, rgb.model.conv_stem.weight.sum(1, keepdim=True))
    torch.testing.assert_close(grey.model.classifier.weight, rgb.model.classifier.weight)


def test_medicalnet_style_checkpoint_by_name_in_weights_dir(tmp_path: Path, caplog) -> None:
    # MedicalNet ships DataParallel-saved 3D ResNets ({"state_dict": {"module.conv1.weight", ...}}) with a
    # segmentation head the backbone does not have
    source = create_backbone("resnet10_3d.scratch")
    state = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(32, 512, 2, 2, 2)
    torch.save({"state_dict": state}, tmp_path / "resnet10_3d.medicalnet.pth")
    assert get_backbone_cfg("resnet10_3d.medicalnet", tmp_path).spatial_dims == 3
    loaded = create_backbone("resnet10_3d.medicalnet", num_classes=2, weights_dir=tmp_path)
    torch.testing.assert_close(loaded.model.conv1.weight, source.model.conv1.weight)
    torch.testing.assert_close(loaded.model.layer4[0].conv1.weight, source.model.layer4[0].conv1.weight)
    assert "conv_seg" in caplog.text
    by_path = create_backbone(f"file:{tmp_path / 'resnet10_3d.medicalnet.pth'}", num_classes=2)  # or by its path
    torch.testing.assert_close(by_path.model.conv1.weight, source.model.conv1.weight)
    assert by_path.cfg.arch == "resnet10_3d" and by_path.cfg.spatial_dims == 3
    (tmp_path / "downloaded.pth").write_bytes((tmp_path / "resnet10_3d.medicalnet.pth").read_bytes())
    with pytest.raises(ValueError, match=r"name the file <arch>.<tag>.pth \(e.g. resnet50.radimagenet.pth\)"):
        create_backbone(f"file:{tmp_path / 'downloaded.pth'}")
    del state["module.layer4.0.conv1.weight"]  # a backbone tensor missing is never glossed over
    torch.save({"state_dict": state}, tmp_path / "resnet10_3d.broken.pth")
    with pytest.raises(ValueError, match="missing"):
        create_backbone("resnet10_3d.broken", weights_dir=tmp_path)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"x": NotATensor()}, evil)
    backbone = create_backbone("test_efficientnet.scratch")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_backbone_weights(backbone, evil)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(evil)


def test_plain_tensor_pickles_load(tmp_path: Path) -> None:
    source = create_backbone("test_efficientnet.scratch", num_classes=4)
    torch.save(source.state_dict(), tmp_path / "ckpt.pt")  # Backbone names: "model."-prefixed
    target = load_backbone_weights(create_backbone("test_efficientnet.scratch", num_classes=4), tmp_path / "ckpt.pt")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_unknown_names_list_what_exists(tmp_path: Path) -> None:
    (tmp_path / "efficientnet_lite0.ssl.safetensors").touch()
    with pytest.raises(ValueError, match="efficientnet_lite0.imagenet") as err:
        create_backbone("efficientnet_lite0.nope", weights_dir=tmp_path)
    message = str(err.value)
    assert "efficientnet_lite0.ssl" in message and "resnet10_3d.scratch" in message
    assert "<arch>.<tag>.safetensors" in message and str(tmp_path) in message
    with pytest.raises(ValueError, match="<arch>.<tag>"):
        create_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match="unknown architecture"):
        get_backbone_cfg("no_such_net.scratch")


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="in_chans"):
        create_backbone("test_efficientnet.scratch", in_chans=0)
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("test_efficientnet.scratch", num_classes=-1)
    with pytest.raises(ValueError, match="taken from the backbone"):
        save_backbone(create_backbone("test_efficientnet.scratch"), Path("unused"), {"arch": "other"})


def test_hub_weights_load_from_the_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = "test_efficientnet.r160_in1k"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_backbone(name)

    # A cache entry as huggingface_hub lays it out, holding known weights.
    repo = tmp_path / "hf" / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    reference = create_backbone("test_efficientnet.scratch", num_classes=1000, in_chans=3)
    safetensors.torch.save_file(reference.model.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")

    backbone = create_backbone(name, num_classes=0, in_chans=1)
    assert backbone.cfg.source == "hf-hub:timm/test_efficientnet.r160_in1k" and backbone.num_classes == 0
    torch.testing.assert_close(backbone.model.conv_stem.weight, reference.model.conv_stem.weight.sum(1, keepdim=True))


def test_positional_mapping_rejects_other_architectures() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    assert list(map_state_in_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)) == ["a.weight", "b.weight"]
    with pytest.raises(ValueError, match="does not fit"):
        map_state_in_order({"x": torch.ones(3, 2), "y": torch.ones(4)}, target)
    with pytest.raises(ValueError, match="entries"):
        map_state_in_order({"x": torch.ones(2, 3)}, target)
