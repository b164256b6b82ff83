"""The forms a CLIP classifier's batch inputs take: small pytrees (frozen dataclasses registered with jax), so that
a jitted step takes them as one argument, and the step, the classifier and the prefix cache dispatch on their type.

    Decoded     the pipeline's batches: uint8 pixels, tokens, missing codes (mora_jax.data.pipeline)
    Normalized  the same with float pixel_values, as a CLIP forward reads them (pipeline.normalize, on the devices)
    Prefix      the towers' inputs at the first adapted layer (a prefix cache's rows: mora_jax.train.prefix_cache)
    Features    the towers' final features (a final-features cache's rows: the linear probe, the test)
    Rows        row numbers into a cache held on the devices (prefix_cache.gather reads those rows there)

Every field is an array whose first axis is the batch (after a micro-batch axis, where a step has one). numpy
and jax only: the adapters and the data pipeline both import it (tests/test_imports.py).
"""

import dataclasses

import jax
import numpy as np

Array = jax.Array | np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoded:
  """pixels uint8 [B, H, W, 3] (a missing image's white dummy); input_ids, attention_mask int32 [B, L]; missing
  int8 [B], each sample's missing code (the all-ones image dummy and the prompt methods' prompts depend on it)."""
  pixels: Array
  input_ids: Array
  attention_mask: Array
  missing: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normalized:
  """`Decoded` with pixel_values float32 [B, 3, H, W] in place of the uint8 pixels."""
  pixel_values: Array
  input_ids: Array
  attention_mask: Array
  missing: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
  """vision_hidden [B, P + 1, Dv], text_hidden [B, L, Dt]: the towers' hidden states at the input of the first
  adapted layer; text_mask int32 [B, L]; text_pool int32 [B], the position the text tower pools."""
  vision_hidden: Array
  text_hidden: Array
  text_mask: Array
  text_pool: Array

  def take(self, vision_rows: Array, text_rows: Array) -> "Prefix":
    """Rows `vision_rows` of the vision tower's inputs with rows `text_rows` of the text tower's."""
    return Prefix(self.vision_hidden[vision_rows], self.text_hidden[text_rows], self.text_mask[text_rows],
                  self.text_pool[text_rows])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Features:
  """vision_features, text_features [B, projection_dim]: the towers' final (projected, unnormalised) features."""
  vision_features: Array
  text_features: Array

  def take(self, vision_rows: Array, text_rows: Array) -> "Features":
    """Rows `vision_rows` of the vision features with rows `text_rows` of the text features."""
    return Features(self.vision_features[vision_rows], self.text_features[text_rows])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
  """int32 [B] row numbers of each tower's input in a cache of `Prefix` or `Features` rows held on the devices."""
  vision_rows: Array
  text_rows: Array
