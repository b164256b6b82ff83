"""What every adapter method shares: target selection, input dropout, and the config base."""

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.models.clip import CLIP, EncoderLayer

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_TARGETS = ("fc1", "fc2")
TOWERS = ("vision", "text")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which projections are adapted: `targets` by Hugging Face name, in `towers`, in layers >= start_layer."""
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  start_layer: int = 10
  rank: int = 4
  dropout: float = 0.1
  towers: tuple[str, ...] = TOWERS

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "towers", tuple(self.towers))
    unknown = [t for t in self.targets if t not in ATTENTION_TARGETS + MLP_TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"targets {self.targets}: each must be one of {ATTENTION_TARGETS + MLP_TARGETS}.")
    if not set(self.towers) <= set(TOWERS) or not self.towers:
      raise ValueError(f"towers {self.towers}: use a non-empty subset of {TOWERS}.")
    if self.rank < 1 or not 0 <= self.dropout < 1 or self.start_layer < 0:
      raise ValueError(f"rank={self.rank} must be >= 1, dropout={self.dropout} in [0, 1), "
                       f"start_layer={self.start_layer} >= 0.")


def tower_layers(model: CLIP, tower: str) -> nnx.List:
  return (model.vision_model if tower == "vision" else model.text_model).encoder.layers


def targets(model: CLIP, cfg: AdapterConfig) -> Iterator[tuple[str, int, nnx.Module, str]]:
  """(tower, layer index, parent module, attribute name) of every projection `cfg` adapts."""
  for tower in cfg.towers:
    layers = tower_layers(model, tower)
    if cfg.start_layer >= len(layers):
      raise ValueError(f"start_layer={cfg.start_layer} but the {tower} tower has only {len(layers)} layers.")
    for index in range(cfg.start_layer, len(layers)):
      layer: EncoderLayer = layers[index]
      for name in cfg.targets:
        yield tower, index, (layer.self_attn if name in ATTENTION_TARGETS else layer.mlp), name


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout with a fresh key from `rngs.dropout` per call; identity when rngs is None."""
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
