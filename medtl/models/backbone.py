"""The one network interface every stage uses: :class:`Backbone`, timm-style, 2D or 3D.

A :class:`Backbone` wraps a timm model (2D) or :class:`ResNet3d` (MONAI's 3D ResNet given timm's
methods), so SSL, selection, fine-tuning and adaptation code never branches on where a network
came from. Build one with :func:`medtl.models.create_backbone`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_inplanes
from timm.models import group_parameters
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

if TYPE_CHECKING:
    from medtl.models.registry import BackboneCfg

__all__ = ["Backbone", "ResNet3d"]

_TIMM_METHODS = ("forward_features", "forward_head", "reset_classifier", "group_matcher")


class Backbone(nn.Module):
    """A feature extractor with a replaceable linear classifier head.

    Shapes below use ``S`` for the spatial dimensions: ``(H, W)`` when ``spatial_dims == 2``,
    ``(D, H, W)`` when ``spatial_dims == 3``.

    Args:
        model: a timm model, or any module with timm's ``forward_features``, ``forward_head``,
            ``reset_classifier``, ``group_matcher`` methods and ``num_features`` / ``num_classes``.
        cfg: what the weights are and how inputs must be normalised (``cfg.in_chans`` channels).

    Attributes:
        model: the wrapped network; parameter names of this module are ``model.<name in the network>``.
        cfg: the :class:`~medtl.models.registry.BackboneCfg` it was created from.
    """

    def __init__(self, model: nn.Module, cfg: BackboneCfg) -> None:
        super().__init__()
        missing = [name for name in _TIMM_METHODS if not callable(getattr(model, name, None))]
        if missing:
            raise TypeError(f"{type(model).__name__} lacks the timm methods {missing}; wrap it like "
                            "medtl.models.backbone.ResNet3d does for MONAI networks")
        self.model = model
        self.cfg = cfg

    @property
    def num_features(self) -> int:
        """Channels of the feature map, and length of :meth:`embed`'s vectors."""
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier head; 0 when the head is the identity."""
        return int(self.model.num_classes)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.cfg.spatial_dims

    @property
    def in_chans(self) -> int:
        """Input channels (1 = grey)."""
        return self.cfg.in_chans

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features of the last stage.

        Args:
            x: ``(B, in_chans, *S)`` images normalised with ``cfg.mean`` / ``cfg.std``.

        Returns:
            ``(B, num_features, *S')``, ``S'`` the input size divided by the network's stride (32).
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            axes = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(f"{self.cfg.name} expects {axes} input with C={self.in_chans}, got {tuple(x.shape)}")
        return self.model.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global-average-pool the features and apply the classifier.

        Args:
            features: ``(B, num_features, *S')`` from :meth:`forward_features`.
            pre_logits: return the pooled vector and skip the classifier.

        Returns:
            ``(B, num_classes)`` logits, or ``(B, num_features)`` when ``pre_logits`` or ``num_classes == 0``.
        """
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, *S)`` → ``(B, num_classes)`` logits (``(B, num_features)`` when ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features, the representation SSL trains and selection scores.

        Args:
            x: ``(B, in_chans, *S)``.

        Returns:
            ``(B, num_features)``.
        """
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Apply only the classifier to pooled features, so an objective can use one forward pass for both
        the embedding and the logits.

        Args:
            embedding: ``(B, num_features)`` from :meth:`embed`.

        Returns:
            ``(B, num_classes)`` logits (the input unchanged when ``num_classes == 0``).
        """
        return self.model.get_classifier()(embedding)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised ``num_features → num_classes`` linear layer.

        Args:
            num_classes: outputs of the new head; 0 makes the head the identity.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")
        self.model.reset_classifier(num_classes)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names grouped from input to output, for freezing and layer-wise learning rates.

        Derived from the network's own timm ``group_matcher(coarse=True)``: the stem, then one group per
        stage, then layers after the last stage (EfficientNet's ``conv_head``/``bn2``, which timm folds into
        the last stage and which get a group of their own here), then the classifier as the last group
        (absent when ``num_classes == 0``). Every parameter appears in exactly one group.

        Returns:
            Groups of names as in ``self.named_parameters()`` (``model.``-prefixed).
        """
        matcher = _separate_merged_groups(self.model.group_matcher(coarse=True))
        groups = group_parameters(self.model, matcher)
        return [[f"model.{name}" for name in groups[i]] for i in sorted(groups)]


def _separate_merged_groups(matcher: dict | object) -> dict | object:
    """Give timm's ``MATCH_PREV_GROUP`` layers their own group instead of merging them into the previous one.

    The ordinal one below ``MATCH_PREV_GROUP`` still sorts after every numbered stage.
    """
    if not isinstance(matcher, dict):
        return matcher
    separate = (MATCH_PREV_GROUP[0] - 1,)
    return {name: [(pattern, separate if suffix == MATCH_PREV_GROUP else suffix) for pattern, suffix in spec]
            if isinstance(spec, (list, tuple)) else spec
            for name, spec in matcher.items()}


_RESNET3D_LAYOUTS: dict[int, tuple[type[nn.Module], list[int]]] = {
    10: (ResNetBlock, [1, 1, 1, 1]),
    18: (ResNetBlock, [2, 2, 2, 2]),
    34: (ResNetBlock, [3, 4, 6, 3]),
    50: (ResNetBottleneck, [3, 4, 6, 3]),
}


class ResNet3d(ResNet):
    """MONAI's 3D ResNet with timm's interface (``forward_features``, ``forward_head``, ``group_matcher``).

    Parameter names are MONAI's own (``conv1``, ``layer1`` … ``layer4``, ``fc``), so MONAI / MedicalNet
    ResNet state dicts load unchanged.

    Args:
        depth: 10, 18, 34 or 50.
        in_chans: input channels.
        num_classes: classifier outputs; 0 = no classifier (``forward`` returns pooled features).
    """

    def __init__(self, depth: int = 10, *, in_chans: int = 1, num_classes: int = 0) -> None:
        if depth not in _RESNET3D_LAYOUTS:
            raise ValueError(f"3D ResNet depth must be one of {sorted(_RESNET3D_LAYOUTS)}, got {depth}")
        block, layers = _RESNET3D_LAYOUTS[depth]
        super().__init__(block=block, layers=layers, block_inplanes=get_inplanes(), spatial_dims=3,
                         n_input_channels=in_chans, feed_forward=False)
        self.num_features = get_inplanes()[-1] * block.expansion
        self.num_classes = 0
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, D, H, W)`` → ``(B, num_features, D/32, H/32, W/32)`` (sizes rounded up)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, num_features, D', H', W')`` → ``(B, num_classes)``, or ``(B, num_features)`` if ``pre_logits``."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then one group per ``layer<i>``; ``coarse`` changes nothing (stages are the finest grouping)."""
        # Same layout as timm's 2D ResNet; the unmatched classifier lands in the last group.
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}
