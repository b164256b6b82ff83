"""Adapters on frozen CLIP towers: MoRA, LoRA, DoRA, MokA (two-tower), the prompt baselines MMP and DCP, or none
(linear probe), on one partitioned tree.

    from mora_jax import adapters, clip
    cfg = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=10, rank=4, alpha=0.01, dropout=0.1)
    clf = adapters.build_classifier(clip.from_pretrained(path), cfg, num_classes=101, multi_label=False)
    logits = clf(pixel_values, input_ids, attention_mask)   # deterministic unless rngs is given
    adapters.count_parameters(clf)                          # {'backbone': N, 'trainable': M, 'per_partition': {...}}
    merged = adapters.merge(clf)                            # towers are plain CLIP weights
    adapters.from_config({"method": "lora", "rank": 8})     # a run config's adapter section -> LoRAConfig

Methods by name, and how to add one: mora_jax/adapters/registry.py.
"""

from mora_jax.adapters.classifier import Classifier, build_classifier, count_parameters, merge, mergeable
from mora_jax.adapters.common import AdapterConfig
from mora_jax.adapters.dora import DoRAConfig
from mora_jax.adapters.lora import LoRAConfig
from mora_jax.adapters.moka import MokAConfig
from mora_jax.adapters.mora import MoRAConfig
from mora_jax.adapters.partition import PARTITIONS, join, split, trainable
from mora_jax.adapters.prompts import DCPConfig, MMPConfig, PromptConfig
from mora_jax.adapters.registry import METHODS, from_config, to_config

__all__ = [
    "AdapterConfig", "Classifier", "DCPConfig", "DoRAConfig", "LoRAConfig", "METHODS", "MMPConfig", "MoRAConfig",
    "MokAConfig", "PARTITIONS", "PromptConfig", "build_classifier", "count_parameters", "from_config", "join",
    "merge", "mergeable", "split", "to_config", "trainable",
]
