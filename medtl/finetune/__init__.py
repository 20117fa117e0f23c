"""Fine-tuning strategies over the backbone's layer groups."""

from medtl.finetune.groups import FrozenBatchNorm, GroupPlan, optimizer_groups, unfreeze_groups
from medtl.finetune.strategies import (
    L2SP,
    EarlyStopping,
    GradualUnfreezing,
    LoRAConv,
    LoRALinear,
    LPFTResult,
    add_lora,
    apply_batchnorm_policy,
    lp_ft,
    merge_lora,
    negative_transfer,
    trainable_parameter_report,
)

__all__ = ["L2SP", "EarlyStopping", "FrozenBatchNorm", "GradualUnfreezing", "GroupPlan", "LPFTResult", "LoRAConv",
           "LoRALinear", "add_lora", "apply_batchnorm_policy", "lp_ft", "merge_lora", "negative_transfer",
           "optimizer_groups", "trainable_parameter_report", "unfreeze_groups"]
