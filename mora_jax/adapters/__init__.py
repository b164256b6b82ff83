"""Adapter methods on frozen models: MoRA, LoRA, DoRA, MokA (two-tower), the prompt baselines MMP and DCP, or none
(linear probe) on CLIP towers, in one partitioned tree; MokA and LoRA also on a decoder LM (the multimodal LLM).

    from mora_jax import adapters, clip
    cfg = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=10, rank=4, alpha=0.01, dropout=0.1)
    clf = adapters.build_classifier(clip.from_pretrained(path), cfg, num_classes=101, multi_label=False)
    logits = clf(pixel_values, input_ids, attention_mask)   # deterministic unless rngs is given
    adapters.count_parameters(clf)                          # {'backbone': N, 'trainable': M, 'per_partition': {...}}
    merged = adapters.merge(clf)                            # towers are plain CLIP weights
    adapters.from_config({"method": "lora", "rank": 8})     # a run config's adapter section -> LoRAConfig
    adapters.from_config(c.adapter.to_dict()).attach(lm, rngs=nnx.Rngs(seed))  # adapters on a decoder LM

What lives where:
- method.py: the contract every method keeps (`Method`: its facts and `attach`); registry.py: the methods by name,
  and how to add one.
- common.py: what the projection adapters share (the config base, targets in a CLIP tower or a decoder LM,
  dropout); mora.py, lora.py, dora.py, moka.py: one method each; prompts.py: MMP and DCP.
- classifier.py: the CLIP classifier (attached method, head, merge); mllm.py: the multimodal LLM (vision tower,
  projector, decoder LM); lm.py: a decoder LM's modality ids and generation.
- partition.py: the partitioned parameter tree; optim.py: optimizers over it; peft.py: LoRA/DoRA <-> PEFT files.

Imports: the adapters import mora_jax.models (the frozen backbones) and light leaves such as mora_jax.data.missing
(the missing codes, numpy only) and mora_jax.data.inputs (the batch forms, numpy and jax), never mora_jax.train
nor the data builders (TFDS, grain): importing the adapters stays cheap, and the trainer depends on them, not the
other way round (tests/test_imports.py).
"""

from mora_jax.adapters.classifier import Classifier, build_classifier, count_parameters, merge, mergeable
from mora_jax.adapters.common import AdapterConfig
from mora_jax.adapters.dora import DoRAConfig
from mora_jax.adapters.lora import LoRAConfig
from mora_jax.adapters.method import Attached, Method
from mora_jax.adapters.moka import MokAConfig
from mora_jax.adapters.mora import MoRAConfig
from mora_jax.adapters.partition import PARTITIONS, join, split, trainable
from mora_jax.adapters.prompts import DCPConfig, MMPConfig, PromptConfig
from mora_jax.adapters.registry import METHODS, from_config, to_config

__all__ = [
    "AdapterConfig", "Attached", "Classifier", "DCPConfig", "DoRAConfig", "LoRAConfig", "METHODS", "MMPConfig",
    "Method", "MoRAConfig", "MokAConfig", "PARTITIONS", "PromptConfig", "build_classifier", "count_parameters",
    "from_config", "join", "merge", "mergeable", "split", "to_config", "trainable",
]
