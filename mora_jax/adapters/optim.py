"""The optimizer over the trainable partitions (AdamW per partition, as the MoRA recipe).

The backbone is frozen by construction: gradients are taken with respect to `adapters.trainable(params)`
only, so no weight gradient of a frozen matrix is ever built and the optimizer holds no state for it.
`optax.partition` gives each trainable partition its own learning-rate and weight-decay multiplier; a
learning-rate multiplier of 0 freezes that partition too (`optax.set_to_zero`, no state), e.g. for ablations.
"""

from collections.abc import Callable, Mapping

import jax
import optax

from mora_jax.adapters import partition

FROZEN = "frozen"


def labels(trainable: dict, lr_mults: Mapping[str, float]) -> dict:
  """Same structure as `trainable`, each leaf labelled with its partition name (or FROZEN)."""

  def label(tree, prefix):
    if isinstance(tree, dict):
      return {k: label(v, f"{prefix}/{k}" if prefix else k) for k, v in tree.items()}
    name = FROZEN if lr_mults.get(prefix, 1.0) == 0 else prefix
    return jax.tree.map(lambda _: name, tree)

  return label(trainable, "")


def adamw(learning_rate: float | Callable[[int], float], weight_decay: float, *,
          lr_mults: Mapping[str, float] | None = None, wd_mults: Mapping[str, float] | None = None,
          b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW (weight decay on every trainable leaf) with per-partition multipliers.

  lr_mults / wd_mults: partition name ("adapter/common", "adapter/specific/vision", "adapter/specific/text",
  "head") -> multiplier, default 1.
  """
  lr_mults, wd_mults = dict(lr_mults or {}), dict(wd_mults or {})
  unknown = sorted((set(lr_mults) | set(wd_mults)) - set(partition.TRAINABLE_PARTITIONS))
  if unknown:
    raise ValueError(f"Unknown partitions {unknown} in lr_mults/wd_mults; use {partition.TRAINABLE_PARTITIONS}.")
  schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
  transforms = {FROZEN: optax.set_to_zero()}
  for name in partition.TRAINABLE_PARTITIONS:
    mult = lr_mults.get(name, 1.0)
    transforms[name] = optax.adamw(lambda step, mult=mult: mult * schedule(step), b1=b1, b2=b2, eps=eps,
                                   weight_decay=weight_decay * wd_mults.get(name, 1.0))
  return optax.partition(transforms, lambda trainable: labels(trainable, lr_mults))
