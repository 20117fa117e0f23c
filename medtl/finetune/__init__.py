"""Fine-tuning strategies over the backbone's layer groups."""

from medtl.finetune.groups import FrozenBatchNorm, GroupPlan, optimizer_groups

__all__ = ["FrozenBatchNorm", "GroupPlan", "optimizer_groups"]
