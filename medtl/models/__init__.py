"""Backbones for every stage: one timm-style interface over timm (2D) and MONAI (3D) networks.

>>> from medtl.models import create_backbone
>>> backbone = create_backbone("efficientnet_lite0.imagenet", num_classes=2, in_chans=1)
>>> backbone.layer_groups()[0]  # the stem, frozen first
['model.conv_stem.weight', 'model.bn1.weight', 'model.bn1.bias']
"""

from medtl.models.backbone import Backbone, ResNet3d
from medtl.models.registry import (BackboneCfg, create_backbone, get_backbone_cfg, list_backbones,
                                   load_backbone_weights, load_model, save_backbone)
from medtl.models.weights import UnsafeCheckpointError, read_state_dict

__all__ = ["Backbone", "BackboneCfg", "ResNet3d", "UnsafeCheckpointError", "create_backbone", "get_backbone_cfg",
           "list_backbones", "load_backbone_weights", "load_model", "read_state_dict", "save_backbone"]
